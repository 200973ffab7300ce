"""Checkpoint conversion: upstream layout in, upstream layout out, clear errors."""

import jax
import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax import convert, loader, torch_files
from cgrseg_jax.models import build_segmentor, family_of, key_layout

CGRSEG = family_of('cgrseg_t')


def _random_variables(variant, num_classes, seed=0):
  """Flax variables with every leaf random (BN statistics too)."""
  shapes = CGRSEG.variable_shapes(f'cgrseg_{variant}', num_classes)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
    treedef, [np.abs(rng.standard_normal(l.shape)).astype(np.float32) + 0.1 for l in leaves]
  )


def _torch_state(variant='tiny', num_classes=11, seed=0):
  return ref.randomize_(ref.build_torch_segmentor(variant, num_classes), seed=seed).state_dict()


@pytest.mark.parametrize('variant', ['tiny', 't'])
def test_flax_torch_flax_round_trip_is_bit_exact(variant):
  variables = _random_variables(variant, 13)
  state = convert.variables_to_state_dict(variables, f'cgrseg_{variant}')
  # The exported layout is exactly the upstream one: the reference loads it strictly.
  torch_mod = ref.build_torch_segmentor(variant, 13)
  torch_mod.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  back, report = convert.state_dict_to_variables(torch_mod.state_dict())
  assert (report.model, report.num_classes) == (f'cgrseg_{variant}', 13)
  flat, flat_back = key_layout.flatten(variables), key_layout.flatten(back)
  assert flat.keys() == flat_back.keys()
  for k in flat:
    assert np.array_equal(np.asarray(flat[k]), np.asarray(flat_back[k])), k


def test_fixture_round_trip(shared_dir):
  """Upstream-built checkpoint -> Flax -> upstream layout reproduces every tensor."""
  path = shared_dir / 'fixtures' / 'cgrseg_t_512x512.pth'
  if not path.exists():
    pytest.skip(f'{path} not found')
  variables, report = convert.state_dict_to_variables(torch_files.read_state_dict(str(path)))
  assert (report.model, report.num_classes) == ('cgrseg_t', 150)
  # the parity tools' entry point gives the same variables
  again = key_layout.flatten(convert.load_torch_checkpoint(str(path), variant='t', num_classes=150))
  assert all(np.array_equal(v, again[k]) for k, v in key_layout.flatten(variables).items())
  state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
  assert len(report.used) + len(report.skipped) == len(state) == 952
  assert set(report.skipped) == {
    k
    for k in state
    if k.endswith(('num_batches_tracked', 'attention_biases', 'attention_bias_idxs', 'attention_bias_idxs_seg'))
  }
  exported = convert.variables_to_state_dict(variables, 'cgrseg_t')
  assert exported.keys() == state.keys()
  for k, v in state.items():
    if not k.endswith('num_batches_tracked') and not k.endswith('.attention_biases'):
      np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


def test_file_and_orbax_round_trip(tmp_path):
  import convert_checkpoint_cli as cli

  state = _torch_state()
  src = tmp_path / 'in.pth'
  torch.save({'meta': {'iter': 1}, 'state_dict': state}, src)
  assert cli.main([str(src), str(tmp_path / 'orbax')]) == 0
  assert cli.main(['--to-torch', str(tmp_path / 'orbax'), str(tmp_path / 'out.pth')]) == 0
  out = torch.load(tmp_path / 'out.pth', map_location='cpu', weights_only=True)
  assert out['state_dict'].keys() == state.keys()
  for k, v in state.items():
    if not k.endswith(('num_batches_tracked', '.attention_biases')):
      assert torch.equal(out['state_dict'][k], v), k
  loaded = loader.load(str(tmp_path / 'orbax'))
  assert (loaded.kind, loaded.model, loaded.num_classes) == ('converted', 'cgrseg_tiny', 11)
  logits = jax.jit(build_segmentor('tiny', 11).apply)(loaded.variables, np.zeros((1, 64, 64, 3), np.float32))
  assert logits.shape == (1, 64, 64, 11)


def test_renamed_key_is_named():
  state = _torch_state()
  state['decode_head.lgc.conv_mask.weights'] = state.pop('decode_head.lgc.conv_mask.weight')
  with pytest.raises(convert.ConversionError, match=r"missing key 'decode_head\.lgc\.conv_mask\.weight'"):
    convert.state_dict_to_variables(state)


def test_unexpected_key_is_named():
  state = _torch_state()
  state['auxiliary_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
  with pytest.raises(convert.ConversionError, match=r"unexpected key 'auxiliary_head\.conv_seg\.weight'"):
    convert.state_dict_to_variables(state)


def test_wrong_shape_names_key_and_shapes():
  state = _torch_state()
  state['backbone.network.2.1.mlp.fc1.weight'] = torch.zeros(10, 48, 1, 1)
  with pytest.raises(convert.ConversionError) as e:
    convert.state_dict_to_variables(state)
  msg = str(e.value)
  assert 'backbone.network.2.1.mlp.fc1.weight' in msg and '(10, 48, 1, 1)' in msg and '(192, 48, 1, 1)' in msg


def test_wrong_variant_and_classes_are_named(tmp_path):
  path = tmp_path / 'tiny.pth'
  torch.save({'state_dict': _torch_state()}, path)
  with pytest.raises(convert.ConversionError, match=r"tiny\.pth: checkpoint is cgrseg_tiny .* variant 't'"):
    convert.load_torch_checkpoint(str(path), variant='t')
  with pytest.raises(convert.ConversionError, match=r"tiny\.pth: checkpoint is cgrseg_tiny .* model 'cgrseg_b'"):
    convert.load_torch_checkpoint(str(path), model='cgrseg_b')
  with pytest.raises(convert.ConversionError, match='tiny.pth: checkpoint has 11 classes.*num_classes=150'):
    convert.load_torch_checkpoint(str(path), num_classes=150)
  # the one loader says the same
  with pytest.raises(loader.LoadError, match=r"tiny\.pth: checkpoint is cgrseg_tiny .* variant 't'"):
    loader.load(str(path), variant='t')


def test_unreadable_file_is_named(tmp_path):
  path = tmp_path / 'garbage.pth'
  path.write_bytes(b'not a checkpoint')
  with pytest.raises(convert.ConversionError, match='garbage.pth: cannot read as a PyTorch checkpoint'):
    convert.load_torch_checkpoint(str(path))
  with pytest.raises(loader.LoadError, match='garbage.pth'):
    loader.load(str(path))


def test_imagenet_backbone_checkpoint(tmp_path):
  """An EfficientFormerV2 classification checkpoint initialises the backbone
  non-strictly: classifier keys and ImageNet biases skipped, seg biases zero."""
  backbone = ref.randomize_(ref.EfficientFormerV2Backbone('S1'), seed=3)
  state = {k: v for k, v in backbone.state_dict().items() if not k.endswith('attention_biases_seg')}
  state.update(
    {
      'norm.weight': torch.ones(224),
      'norm.bias': torch.zeros(224),
      'head.weight': torch.zeros(1000, 224),
      'head.bias': torch.zeros(1000),
      'dist_head.weight': torch.zeros(1000, 224),
      'dist_head.bias': torch.zeros(1000),
    }
  )
  path = tmp_path / 'eformer_s1_450.pth'
  torch.save({'model': state}, path)
  loaded = loader.load(str(path))
  assert (loaded.kind, loaded.model) == ('backbone', 'cgrseg_t')
  variables, report = {c: t['backbone'] for c, t in loaded.variables.items()}, loaded.report
  assert {k for k, why in report.skipped.items() if why == 'ImageNet classifier'} == {
    'norm.weight',
    'norm.bias',
    'head.weight',
    'head.bias',
    'dist_head.weight',
    'dist_head.bias',
  }
  assert sorted(report.missing) == sorted(k for k in backbone.state_dict() if k.endswith('attention_biases_seg'))
  attn = variables['params']['network_4']['7']['token_mixer']
  assert not np.any(attn['attention_biases_seg'])
  np.testing.assert_array_equal(
    attn['talking_head1']['kernel'][0, 0], state['network.4.7.token_mixer.talking_head1.weight'][:, :, 0, 0].numpy().T
  )
  np.testing.assert_array_equal(
    variables['batch_stats']['patch_embed']['1']['var'], state['patch_embed.1.running_var'].numpy()
  )
  # the result slots into a full segmentor
  full = CGRSEG.variable_shapes('cgrseg_t', 150)
  assert jax.tree_util.tree_structure(full['params']['backbone']) == jax.tree_util.tree_structure(variables['params'])
  with pytest.raises(loader.LoadError, match="backbone for cgrseg_t, but model='cgrseg_b'"):
    loader.load(str(path), model='cgrseg_b')
  # scripts/convert_checkpoint.py --backbone with a short variant name (was passed through as a backbone size)
  import convert_checkpoint_cli as cli

  assert cli.main(['--backbone', str(path), '--variant', 't']) == 0
  assert cli.main(['--backbone', str(path), '--variant', 'b']) == 2


def test_torch_key_mapping_examples():
  cases = {
    (
      'params',
      ('backbone', 'network_4', '7', 'token_mixer', 'talking_head1', 'kernel'),
    ): 'backbone.network.4.7.token_mixer.talking_head1.weight',
    ('batch_stats', ('backbone', 'patch_embed', '1', 'var')): 'backbone.patch_embed.1.running_var',
    ('params', ('decode_head', 'SIM_2', 'fuse1', 'bn', 'scale')): 'decode_head.SIM.2.fuse1.bn.weight',
    (
      'params',
      ('decode_head', 'trans', 'transformer_blocks_4', 'gamma'),
    ): 'decode_head.trans.transformer_blocks.4.gamma',
    ('params', ('backbone', 'network_6', '0', 'layer_scale_2')): 'backbone.network.6.0.layer_scale_2',
  }
  for (collection, path), key in cases.items():
    assert CGRSEG.key_layout.torch_key(collection, path) == key
