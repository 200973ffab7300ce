"""CSFCN's OHEM cross-entropy against the PyTorch re-statement of upstream's
`OhemCrossEntropy2d` (kaigelee/CSFCN utils/loss.py) in
`cgrseg_jax.torch_reference.training`, and the configs' loss on both sides."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgrseg_jax import config_files, losses
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.torch_reference import training
from paths import REPO


# OhemCrossEntropy2d's defaults upstream, the values CSFCN trains with; 255 the ignore label of the labels here.
UPSTREAM = dict(thresh=0.9, min_kept=110_000)
IGNORE = 255


def _crafted(seed, n=2, h=12, w=16, k=5, ignore_frac=0.3, confident_frac=0.5):
  """Logits where some pixels are confidently right (p > 0.9), others not."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, size=(n, h, w))
  logits = rng.normal(size=(n, h, w, k)).astype(np.float32)
  confident = rng.random((n, h, w)) < confident_frac
  onehot = np.eye(k, dtype=np.float32)[labels]
  logits += onehot * np.where(confident, rng.uniform(3, 9, (n, h, w)), 0)[..., None].astype(np.float32)
  labels[rng.random((n, h, w)) < ignore_frac] = 255
  return logits, labels


def _both(logits, labels, **kw):
  ours_val, ours_grad = jax.value_and_grad(lambda x: losses.ohem_cross_entropy(x, jnp.asarray(labels), **kw))(
    jnp.asarray(logits)
  )
  t = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).requires_grad_()
  ref = training.ohem_cross_entropy(t, torch.from_numpy(labels).long(), ignore_index=IGNORE, **{**UPSTREAM, **kw})
  ref.backward()
  return float(ours_val), np.asarray(ours_grad), float(ref.detach()), t.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
  'min_kept,case',
  [
    (400, 'below'),  # fewer valid pixels (~270) than min_kept: plain CE over every valid pixel
    (None, 'exact'),  # exactly min_kept valid pixels: OHEM branch, threshold = the largest p: keeps all
    (40, 'thresh'),  # the 40th smallest p is below 0.9: threshold stays 0.9
    (200, 'raised'),  # the 200th smallest p is above 0.9: threshold raised to it
    (0, 'thresh'),  # min_kept 0: threshold 0.9
  ],
)
def test_matches_upstream(min_kept, case):
  logits, labels = _crafted(0)
  num_valid = int((labels != 255).sum())
  min_kept = num_valid if min_kept is None else min_kept
  ours, ours_g, ref, ref_g = _both(logits, labels, min_kept=min_kept)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-7)
  # the crafted inputs really take the branch the case is about
  p = np.take_along_axis(jax.nn.softmax(logits, -1), np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
  p = np.sort(p[labels != 255])
  t = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy())
  plain = float(F.cross_entropy(t, torch.from_numpy(labels).long(), ignore_index=255))
  if case in ('below', 'exact'):
    np.testing.assert_allclose(ours, plain, rtol=1e-5)
  else:
    assert abs(ours - plain) > 1e-3
    if min_kept:
      assert (p[min_kept - 1] > 0.9) == (case == 'raised')
    kept = (p <= max(0.9, p[min_kept - 1] if min_kept else 0)).sum()
    assert 0 < kept < num_valid


def test_defaults_are_upstream_recipe():
  # 2 x 256 x 256 = 131072 pixels, ~111k valid: above min_kept 110000
  logits, labels = _crafted(1, n=2, h=256, w=256, k=4, ignore_frac=0.15, confident_frac=0.7)
  assert (labels != 255).sum() > 110000
  ours, _, ref, _ = _both(logits, labels)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  jitted = jax.jit(losses.ohem_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(jitted), ref, rtol=1e-5)


def test_all_ignored_gives_zero_not_nan():
  logits, labels = _crafted(2)
  labels[:] = 255
  assert float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), min_kept=0)) == 0.0


def test_config_loss_is_upstream_ohem_on_both_sides():
  """configs/cityscapes_csfcn.py's loss, built from the config on each side (the
  dataset's ignore index, `ohem.thresh / min_kept`), is upstream's OHEM."""
  config = config_files.load(os.path.join(REPO, 'configs', 'cityscapes_csfcn.py'))
  with config.unlocked():
    config.ohem.min_kept = 200  # the 'raised' case above: the threshold moves
  ignore = input_pipeline.dataset_info(config).ignore_index
  assert ignore == IGNORE  # Cityscapes' labels as converted
  logits, labels = _crafted(0)
  t = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels).long()
  want = float(training.ohem_cross_entropy(t, y, ignore_index=IGNORE, thresh=0.9, min_kept=200))
  assert float(training.build_loss(config)(t, y)) == pytest.approx(want, rel=1e-6)
  ours = losses.build_loss('ohem', config, ignore)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(ours), want, rtol=1e-5)
  # Logits at another size are resized to the labels first, on both sides alike.
  half = t[:, :, ::2, ::2].contiguous()
  resized = F.interpolate(half, size=labels.shape[1:], mode='bilinear', align_corners=False)
  want = float(training.ohem_cross_entropy(resized, y, ignore_index=IGNORE, thresh=0.9, min_kept=200))
  assert float(training.build_loss(config)(half, y)) == pytest.approx(want, rel=1e-6)
  ours = losses.build_loss('ohem', config, ignore)(jnp.asarray(logits[:, ::2, ::2]), jnp.asarray(labels))
  np.testing.assert_allclose(float(ours), want, rtol=1e-5)
