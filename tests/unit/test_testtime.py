"""The test-time pipeline (testtime.py): the crop + resize of the logits against
torch.nn.functional.interpolate, and mmseg's slide windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax import testtime


@pytest.mark.parametrize('valid,orig', [((32, 48), (70, 101)), ((40, 40), (23, 17)), ((13, 64), (13, 64))])
def test_crop_and_resize_matches_torch(valid, orig):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  padded = rng.normal(size=(64, 64, 5)).astype(np.float32)
  out_shape = (96, 128)
  got = jax.jit(testtime.crop_and_resize, static_argnums=3)(
    jnp.asarray(padded), jnp.asarray(valid, jnp.int32), jnp.asarray(orig, jnp.int32), out_shape
  )
  t = torch.from_numpy(padded.transpose(2, 0, 1)[None, :, : valid[0], : valid[1]].copy())
  ref = torch.nn.functional.interpolate(t, size=orig, mode='bilinear', align_corners=False)[0].numpy()
  ref = ref.transpose(1, 2, 0)
  np.testing.assert_allclose(np.asarray(got)[: orig[0], : orig[1]], ref, rtol=1e-5, atol=1e-5)


def test_slide_windows_follow_mmseg():
  # 100 x 70 image, crop 64, stride 30: rows at 0, 30, then 36 (clamped: 36 + 64 = 100).
  wins = testtime.slide_windows((100, 70), (64, 64), (30, 30))
  ys = sorted({(y1, y2) for y1, y2, _, _ in wins})
  xs = sorted({(x1, x2) for _, _, x1, x2 in wins})
  assert ys == [(0, 64), (30, 94), (36, 100)]
  assert xs == [(0, 64), (6, 70)]
  # Smaller than the crop: one window of the image's own size, no padding.
  assert testtime.slide_windows((32, 40), (64, 64), (48, 48)) == [(0, 32, 0, 40)]
