"""The whole segmentor against the PyTorch reference, for every variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax import convert
from cgrseg_jax.models import build_segmentor, family_of, key_layout
from flax_torch import assert_close, nchw, nhwc

# Learnable parameters of the upstream code with 150 classes (SPEC §1).
UPSTREAM_PARAMS = {'t': 9_364_647, 'b': 19_114_871, 'l': 35_677_703}


def _num_params(variant, num_classes=150):
  shapes = family_of('cgrseg_t').variable_shapes(f'cgrseg_{variant}', num_classes)
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


@pytest.mark.parametrize('variant', ['t', 'b', 'l'])
def test_parameter_count_equals_upstream(variant):
  assert _num_params(variant) == UPSTREAM_PARAMS[variant]
  torch_count = ref.count_learnable_params(ref.build_torch_segmentor(variant))
  assert torch_count == UPSTREAM_PARAMS[variant]


def _reference(variant, seed, num_classes=150, dropout=True):
  torch_mod = ref.randomize_(ref.build_torch_segmentor(variant, num_classes), seed=seed)
  if not dropout:
    torch_mod.decode_head.dropout = None
  variables, _ = convert.state_dict_to_variables(torch_mod.state_dict(), variant, num_classes)
  return torch_mod, jax.tree_util.tree_map(jnp.asarray, variables)


def _eval_all(variables, x, model):
  feats = model.apply(variables, x, train=False, method='extract_features')
  head = model.apply(variables, x, train=False, method='decode')
  return feats, head, model.apply(variables, x, train=False)


_eval_all = jax.jit(_eval_all, static_argnames='model')


# Every size at 512x512; the 480x640 case (attention-bias tables resized away from
# the 512 layout, padding to 32 in one axis) on T, whose code path B and L share.
@pytest.mark.parametrize('variant,hw', [('t', (512, 512)), ('b', (512, 512)), ('l', (512, 512)), ('t', (480, 640))])
def test_eval_forward_matches_reference(variant, hw):
  torch_mod, variables = _reference(variant, seed=11)
  torch_mod.eval()
  x = np.random.default_rng(0).standard_normal((1, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    feats_t = torch_mod.extract_features(nchw(x))
    head_t = torch_mod.decode(feats_t)
    want = nhwc(torch.nn.functional.interpolate(head_t, size=hw, mode='bilinear', align_corners=False))
  want_feats, want_head = [nhwc(f) for f in feats_t], nhwc(head_t)
  feats, head, logits = _eval_all(variables, x, model=build_segmentor(variant))
  for f, w in zip(feats, want_feats):
    assert_close(f, w, rtol=1e-4)
  assert_close(head, want_head, rtol=1e-4)
  assert logits.shape == (1, *hw, 150)
  assert_close(logits, want, rtol=1e-4)
  assert np.mean(np.asarray(logits).argmax(-1) == want.argmax(-1)) >= 0.999


def test_accelerator_forms_match_the_reference():
  """The model built for TPU / GPU (grouped convolutions, resampling by products with
  the interpolation matrices), run here on the CPU, against PyTorch; at 96x128 the
  attention biases are resized too."""
  torch_mod, variables = _reference('tiny', seed=4, num_classes=7)
  torch_mod.eval()
  model = build_segmentor('tiny', 7, platform='tpu')
  assert model.resize_impl == model.backbone.resize_impl == 'matmul' and model.backbone.depthwise == 'xla'
  x = np.random.default_rng(5).standard_normal((1, 96, 128, 3)).astype(np.float32)
  with torch.no_grad():
    head = torch_mod.decode(torch_mod.extract_features(nchw(x)))
    want = nhwc(torch.nn.functional.interpolate(head, size=(96, 128), mode='bilinear', align_corners=False))
  assert_close(jax.jit(model.apply)(variables, x), want, rtol=1e-4)


@pytest.mark.parametrize(
  'variant,hw,backbone_bn', [('tiny', (128, 160), 'frozen'), ('tiny', (128, 160), 'batch'), ('t', (256, 256), 'frozen')]
)
def test_train_forward_matches_reference(variant, hw, backbone_bn):
  """Training mode as upstream trains ('frozen': the backbone's BNs in eval mode
  by its `train()` rule, the head's with batch statistics) and with batch
  statistics everywhere ('batch'); running statistics updated as PyTorch does
  (unbiased variance, momentum 0.1); dropout off so both are deterministic."""
  torch_mod, variables = _reference(variant, seed=5, num_classes=19, dropout=False)
  torch_mod.backbone.frozen_bn = backbone_bn == 'frozen'
  model = build_segmentor(variant, 19, dropout_ratio=0.0, backbone_bn=backbone_bn)
  x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
  torch_mod.train()  # mmcv's runner: model.train(), which the backbone's rule follows
  with torch.no_grad():
    want = nhwc(torch_mod(nchw(x)))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = apply(variables, x)
  assert_close(logits, want, rtol=1e-4)
  after, _ = convert.state_dict_to_variables(torch_mod.state_dict(), variant, 19)
  flat_ours = key_layout.flatten(updates)
  flat_ref = key_layout.flatten(after)
  assert flat_ours.keys() == {k for k in flat_ref if k[0] == 'batch_stats'}
  for k, v in flat_ours.items():
    np.testing.assert_allclose(v, flat_ref[k], rtol=1e-4, atol=1e-5, err_msg=str(k))
  before = key_layout.flatten({'batch_stats': variables['batch_stats']})
  changed = {k[1][0] for k, v in flat_ours.items() if not np.array_equal(np.asarray(v), np.asarray(before[k]))}
  # frozen: the backbone's running statistics are bit-unchanged, the head's move
  assert changed == ({'decode_head'} if backbone_bn == 'frozen' else {'backbone', 'decode_head'})


def test_backbone_bn_is_checked():
  with pytest.raises(ValueError, match="backbone_bn='sync'.*expected one of"):
    build_segmentor('tiny', 5, backbone_bn='sync')


# Compiling once is a property of the jitted function, not of the model size: the S0
# structure is enough. The weights come from the reference (no init to compile). The
# gradient of every parameter, against PyTorch's, is test_optim's one-step parity.
def test_jit_forward_compiles_once():
  _, variables = _reference('tiny', seed=2, num_classes=7)
  model = build_segmentor('tiny', num_classes=7)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 64, 96, 3)), jnp.float32)

  @jax.jit
  def forward(variables, x):
    return model.apply(variables, x, train=False)

  for i in range(2):  # a second call at the same shapes must not retrace
    out = forward(variables, x + i)
  assert out.shape == (2, 64, 96, 7) and np.all(np.isfinite(np.asarray(out)))
  assert forward._cache_size() == 1


def test_bfloat16_compute_tracks_float32():
  model32 = build_segmentor('tiny', num_classes=5)
  model16 = build_segmentor('tiny', num_classes=5, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128, 128, 3)), jnp.float32)
  torch_mod, variables = _reference('tiny', seed=3, num_classes=5)
  del torch_mod
  out32 = jax.jit(lambda v, x: model32.apply(v, x))(variables, x)
  out16 = jax.jit(lambda v, x: model16.apply(v, x))(variables, x)
  assert out16.dtype == jnp.float32  # logits come back in float32
  params16 = jax.tree_util.tree_leaves(variables['params'])
  assert all(p.dtype == jnp.float32 for p in params16)
  err = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert err < 0.1, err
  assert float(jnp.mean(out16.argmax(-1) == out32.argmax(-1))) > 0.8
