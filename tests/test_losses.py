"""The mmseg 0.27 decode-head loss against PyTorch."""

import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax import losses

torch = pytest.importorskip('torch')


def test_loss_matches_mmseg_formula():
  rng = np.random.default_rng(0)
  logits8 = rng.normal(size=(2, 8, 12, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 6, size=(2, 64, 96))
  labels[0, :20] = 255
  got = float(losses.segmentation_loss(jnp.asarray(logits8), jnp.asarray(labels)))
  t = torch.from_numpy(logits8.transpose(0, 3, 1, 2))
  up = torch.nn.functional.interpolate(t, size=(64, 96), mode='bilinear', align_corners=False)
  per_pixel = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels), ignore_index=255, reduction='none')
  ref = float(per_pixel.mean())  # avg_non_ignore=False: ignored pixels count in the denominator
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # and it is not the mean over labelled pixels only
  assert abs(got - float(per_pixel.sum() / (labels != 255).sum())) > 1e-3


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='disagree'):
    losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5), jnp.int32))
