"""Resampling against torch.nn.functional (the upstream semantics)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgrseg_jax.models import resize
from flax_torch import nchw, nhwc

SIZES = [
  ((8, 8), (16, 16)),
  ((16, 16), (8, 8)),
  ((7, 5), (32, 20)),
  ((64, 48), (13, 11)),
  ((15, 20), (30, 40)),
  ((30, 40), (480, 640)),
  ((9, 9), (9, 9)),
  ((1, 3), (4, 7)),
]


# 'taps' (the CPU form) and 'matmul' (TPU and GPU), both run here on the CPU.
IMPLS = ('taps', 'matmul')


def test_auto_follows_the_target_platform():
  assert resize.resolve_resize('auto', 'cpu') == 'taps'
  assert resize.resolve_resize('auto', 'tpu') == resize.resolve_resize('auto', 'gpu') == 'matmul'
  assert resize.resolve_resize('taps', 'tpu') == 'taps'
  with pytest.raises(ValueError, match="resize='gather'"):
    resize.resolve_resize('gather')


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('src,dst', SIZES)
def test_bilinear_matches_torch(src, dst, impl):
  x = np.random.default_rng(0).standard_normal((2, *src, 3)).astype(np.float32)
  ref = nhwc(F.interpolate(nchw(x), size=dst, mode='bilinear', align_corners=False))
  np.testing.assert_allclose(resize.resize_bilinear(x, dst, impl=impl), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('src,dst', [((8, 8), (64, 64)), ((15, 20), (30, 40)), ((7, 5), (32, 20)), ((3, 4), (24, 8))])
def test_bilinear_gradient_matches_torch(src, dst, impl):
  """Integer factors take the gather-free path (phases of shifted slices), whose
  gradient autodiff derives; others the gather path; 'matmul' the transposed
  products. All against autograd."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, *src, 3)).astype(np.float32)
  r = rng.standard_normal((2, *dst, 3)).astype(np.float32)
  xt = nchw(x).requires_grad_(True)
  (F.interpolate(xt, size=dst, mode='bilinear', align_corners=False) * nchw(r)).sum().backward()
  got = jax.grad(lambda x: jnp.sum(resize.resize_bilinear(x, dst, impl=impl) * r))(x)
  np.testing.assert_allclose(got, nhwc(xt.grad), rtol=1e-5, atol=1e-5)


def test_bilinear_scale_factor_two_equals_upsample_module():
  # Attention4D's nn.Upsample(scale_factor=2) path.
  x = np.random.default_rng(1).standard_normal((1, 15, 20, 4)).astype(np.float32)
  ref = nhwc(torch.nn.Upsample(scale_factor=2, mode='bilinear')(nchw(x)))
  np.testing.assert_allclose(resize.resize_bilinear(x, (30, 40)), ref, rtol=1e-5, atol=1e-6)


def test_bilinear_does_not_antialias():
  # Downsampling 4x by bilinear samples two source pixels, unlike jax.image.resize.
  x = np.zeros((1, 8, 1, 1), np.float32)
  x[0, 0] = 1.0
  out = np.asarray(resize.resize_bilinear(x, (2, 1)))[0, :, 0, 0]
  np.testing.assert_allclose(out, [0.0, 0.0])  # src rows 1.5 and 5.5: pixel 0 not touched


@pytest.mark.parametrize(
  'src,dst',
  [((256, 256), (300, 300)), ((256, 1024), (300, 1200)), ((16, 16), (16, 16)), ((20, 30), (11, 17)), ((5, 6), (23, 9))],
)
@pytest.mark.parametrize('impl', IMPLS)
def test_bicubic_matches_torch(src, dst, impl):
  x = np.random.default_rng(2).standard_normal((1, 4, *src)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x), size=dst, mode='bicubic', align_corners=False).numpy()
  np.testing.assert_allclose(resize.resize_bicubic(x, dst, impl=impl), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'src,dst',
  [((64, 64), (8, 8)), ((15, 20), (8, 10)), ((30, 40), (8, 10)), ((7, 9), (4, 5)), ((5, 5), (5, 5)), ((3, 4), (6, 7))],
)
def test_adaptive_avg_pool_matches_torch(src, dst):
  x = np.random.default_rng(3).standard_normal((2, *src, 5)).astype(np.float32)
  ref = nhwc(F.adaptive_avg_pool2d(nchw(x), dst))
  np.testing.assert_allclose(resize.adaptive_avg_pool(x, dst), ref, rtol=1e-5, atol=1e-6)


def test_adaptive_pool_bins_formula():
  # Bin i covers [floor(i*in/out), ceil((i+1)*in/out)): 5 -> 3 gives [0,2), [1,4), [3,5).
  m = resize.adaptive_pool_matrix(5, 3)
  expected = np.array([[0.5, 0.5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 0.5, 0.5]], np.float32)
  np.testing.assert_allclose(m, expected, rtol=1e-6)
