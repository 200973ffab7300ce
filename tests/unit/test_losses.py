"""The mmseg 0.27 decode-head loss against PyTorch."""

import jax
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


def _torch_decode_loss(logits8, labels):
  t = torch.from_numpy(logits8.transpose(0, 3, 1, 2)).requires_grad_(True)
  up = torch.nn.functional.interpolate(t, size=labels.shape[1:], mode='bilinear', align_corners=False)
  loss = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255, reduction='sum')
  loss = loss / labels.size
  loss.backward()
  return loss.item(), t.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
  'logit_hw, label_hw, banded',
  [((16, 12), (64, 48), True), ((6, 10), (48, 80), True), ((7, 9), (21, 18), False)],
)
def test_loss_value_and_gradient_match_pytorch(logit_hw, label_hw, banded):
  """Training crops (integer factor) take the band-by-band path with its own
  gradient; other sizes resize and autodiff. Both against PyTorch autograd,
  border rows (clamped taps) and ignored pixels included."""
  rng = np.random.default_rng(1)
  logits8 = rng.normal(size=(2, *logit_hw, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=(2, *label_hw)).astype(np.uint8)
  labels[1, :, :7] = 255
  assert (losses._band_plan(logits8.shape, labels.shape) is not None) == banded
  value, grad = jax.value_and_grad(losses.segmentation_loss)(jnp.asarray(logits8), jnp.asarray(labels))
  ref_value, ref_grad = _torch_decode_loss(logits8, labels)
  np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())
  assert float(jax.jit(losses.segmentation_loss)(jnp.asarray(logits8), jnp.asarray(labels))) == pytest.approx(
    ref_value, rel=1e-5
  )
