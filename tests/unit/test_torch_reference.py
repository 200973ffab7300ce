"""Checks of the pure-PyTorch CGRSeg reference (cgrseg_jax/torch_reference/cgrseg.py)
against the upstream-built fixture and the upstream parameter counts."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from cgrseg_jax.torch_reference.cgrseg import (
  VARIANTS,
  build_torch_segmentor,
  count_learnable_params,
  load_upstream_checkpoint,
  randomize_,
)

FIXTURE_STEM = 'cgrseg_t_512x512'
# learnable parameters with 150 classes, counted on the upstream code
UPSTREAM_PARAM_COUNTS = {'t': 9_364_647, 'b': 19_114_871, 'l': 35_677_703}


def _fixture_paths(shared_dir: Path):
  fx = shared_dir / 'fixtures'
  pth, npz = fx / f'{FIXTURE_STEM}.pth', fx / f'{FIXTURE_STEM}.npz'
  if not (pth.is_file() and npz.is_file()):
    pytest.skip(f'upstream fixture {FIXTURE_STEM}.{{pth,npz}} not found in {fx}')
  return pth, npz


def _assert_close(name, got, ref, rel=1e-5):
  scale = float(np.abs(ref).max())
  tol = rel * max(scale, 1e-6)
  np.testing.assert_allclose(got, ref, rtol=rel, atol=tol, err_msg=name)


@pytest.fixture(scope='module')
def fixture_run(shared_dir):
  pth, npz = _fixture_paths(shared_dir)
  data = dict(np.load(npz))
  model = build_torch_segmentor('t', num_classes=150)
  load_upstream_checkpoint(model, str(pth))
  model.eval()
  x = torch.from_numpy(data['x'])
  with torch.no_grad():
    feats = model.extract_features(x)
    head = model.decode(feats)
    full = torch.nn.functional.interpolate(head, size=x.shape[2:], mode='bilinear', align_corners=False)
  return data, [f.numpy() for f in feats], head.numpy(), full.numpy()


@pytest.mark.parametrize('stage', [0, 1, 2, 3])
def test_fixture_backbone_features(fixture_run, stage):
  data, feats, _, _ = fixture_run
  ref = data[f'feat{stage}']
  assert feats[stage].shape == ref.shape
  _assert_close(f'feat{stage}', feats[stage], ref)


def test_fixture_head_logits(fixture_run):
  data, _, head, _ = fixture_run
  assert head.shape == data['head_logits'].shape
  _assert_close('head_logits', head, data['head_logits'])


def test_fixture_full_resolution_logits(fixture_run):
  data, _, _, full = fixture_run
  idx = data['sample_idx']
  sampled = full[idx[:, 0], :, idx[:, 1], idx[:, 2]]
  _assert_close('sample_logits', sampled, data['sample_logits'])
  agreement = float((full.argmax(1) == data['argmax']).mean())
  assert agreement >= 0.999, agreement


def test_forward_matches_decode_then_resize(fixture_run, shared_dir):
  """``forward`` = head logits resized to the input size."""
  data, _, _, full = fixture_run
  pth, _ = _fixture_paths(shared_dir)
  model = build_torch_segmentor('t')
  load_upstream_checkpoint(model, str(pth))
  model.eval()
  # cheap check on a crop of the fixture input; the full-size path is above
  x = torch.from_numpy(data['x'][:, :, :128, :160].copy())
  with torch.no_grad():
    out = model(x)
    head = model.decode(x)
  assert out.shape == (1, 150, 128, 160)
  assert head.shape == (1, 150, 16, 20)
  ref = torch.nn.functional.interpolate(head, size=(128, 160), mode='bilinear', align_corners=False)
  assert torch.equal(out, ref)


def test_state_dict_layout_matches_fixture(shared_dir):
  pth, _ = _fixture_paths(shared_dir)
  ckpt = torch.load(str(pth), map_location='cpu', weights_only=False)
  ref = ckpt['state_dict']
  ours = build_torch_segmentor('t', num_classes=150).state_dict()
  assert len(ref) == 952
  assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
  bad = {k: (tuple(ours[k].shape), tuple(ref[k].shape)) for k in ref if tuple(ours[k].shape) != tuple(ref[k].shape)}
  assert not bad, bad
  # index tables are built, not learned: ours must equal upstream's
  for k in ref:
    if k.endswith('attention_bias_idxs_seg'):
      assert torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize('variant', sorted(UPSTREAM_PARAM_COUNTS))
def test_param_counts_match_upstream(variant):
  model = build_torch_segmentor(variant, num_classes=150)
  assert count_learnable_params(model) == UPSTREAM_PARAM_COUNTS[variant]


def test_randomize_is_deterministic_and_finite():
  a = randomize_(build_torch_segmentor('tiny'), seed=7)
  b = randomize_(build_torch_segmentor('tiny'), seed=7)
  c = randomize_(build_torch_segmentor('tiny'), seed=8)
  sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
  assert all(torch.equal(sa[k], sb[k]) for k in sa)
  assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
  for k, v in sa.items():
    if k.endswith('running_var'):
      assert float(v.min()) > 0.0, k
  a.eval()
  x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    out = a(x)
  assert out.shape == (1, 150, 96, 128)
  assert torch.isfinite(out).all()
  assert 1e-2 < float(out.std()) < 1e2


def test_train_mode_runs_with_drop_path_and_dropout():
  model = randomize_(build_torch_segmentor('tiny', drop_path_rate=0.1), seed=0)
  model.train()
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  out = model(x)
  out.square().mean().backward()
  assert torch.isfinite(out).all()
  grads = [p.grad for p in model.parameters() if p.requires_grad]
  assert all(g is not None for g in grads)
  # upstream's rule: the backbone's BNs stay in eval mode, the head's update
  assert not model.backbone.patch_embed[1].training
  assert int(model.backbone.patch_embed[1].num_batches_tracked) == 0
  assert int(model.decode_head.linear_fuse.bn.num_batches_tracked) == 1
  batch = randomize_(build_torch_segmentor('tiny', drop_path_rate=0.1, backbone_bn='batch'), seed=0).train()
  batch(x)
  assert int(batch.backbone.patch_embed[1].num_batches_tracked) == 1


def test_variant_table_has_required_entries():
  for name in ('t', 'b', 'l', 'tiny'):
    cfg = VARIANTS[name]
    for key in ('backbone', 'in_channels', 'channels', 'next_repeat', 'band_kernel', 'drop_path_rate'):
      assert key in cfg, (name, key)
