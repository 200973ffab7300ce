"""grid_sample, align-corners resizing and the spatial block against PyTorch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgrseg_jax.models import sfc
from cgrseg_jax.torch_reference import csfcn as ref
from csfcn_helpers import compare
from flax_torch import nchw, nhwc


@pytest.mark.parametrize('hw,out_hw', [((7, 9), (5, 11)), ((1, 6), (3, 3)), ((16, 32), (16, 32))])
def test_grid_sample_matches_torch_including_points_outside(hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
  grid = rng.uniform(-1.6, 1.6, size=(2, *out_hw, 2)).astype(np.float32)
  grid[0, 0, 0] = (-1.0, 1.0)  # exact corners
  grid[0, 0, 1] = (1.0, -1.0)
  grid[1, 0, 0] = (1.2, 0.3)  # one neighbour column outside
  outside = (np.abs(grid) > 1).any(-1).mean()
  assert outside > 0.3
  want = F.grid_sample(nchw(x), torch.from_numpy(grid), mode='bilinear', padding_mode='zeros', align_corners=True)
  got = sfc.grid_sample(jnp.asarray(x), jnp.asarray(grid))
  np.testing.assert_allclose(got, nhwc(want), rtol=1e-5, atol=1e-6)
  assert np.abs(nhwc(want)).sum() > 0


def test_grid_sample_far_outside_is_zero_and_identity_grid_is_identity():
  x = np.random.default_rng(1).standard_normal((1, 4, 6, 2)).astype(np.float32)
  far = np.full((1, 2, 2, 2), 3.0, np.float32)
  assert np.all(np.asarray(sfc.grid_sample(jnp.asarray(x), jnp.asarray(far))) == 0)
  ident = sfc.identity_grid(4, 6)[None]
  np.testing.assert_allclose(sfc.grid_sample(jnp.asarray(x), jnp.asarray(ident)), x, atol=1e-6)


@pytest.mark.parametrize('n', [1, 2, 5, 60, 64, 101])
def test_torch_linspace_within_an_ulp(n):
  ours, want = sfc.torch_linspace(-1.0, 1.0, n), torch.linspace(-1.0, 1.0, n).numpy()
  assert ours.dtype == np.float32 and ours[0] == want[0] and ours[-1] == want[-1]
  np.testing.assert_allclose(ours, want, rtol=0, atol=6e-8)


@pytest.mark.parametrize('impl', ['taps', 'matmul'])  # the CPU form, the TPU / GPU one
@pytest.mark.parametrize('hw,out', [((4, 8), (32, 64)), ((3, 5), (23, 30)), ((9, 9), (4, 5)), ((1, 3), (2, 3))])
def test_resize_align_corners_matches_torch(hw, out, impl):
  x = np.random.default_rng(2).standard_normal((1, *hw, 3)).astype(np.float32)
  want = F.interpolate(nchw(x), size=out, mode='bilinear', align_corners=True)
  got = sfc.resize_bilinear_align_corners(jnp.asarray(x), out, impl)
  np.testing.assert_allclose(got, nhwc(want), rtol=1e-5, atol=1e-6)
  # and the x8 scale_factor form of the Tiny head
  want8 = F.interpolate(nchw(x), scale_factor=8, mode='bilinear', align_corners=True)
  got8 = sfc.resize_bilinear_align_corners(jnp.asarray(x), (8 * hw[0], 8 * hw[1]), impl)
  np.testing.assert_allclose(got8, nhwc(want8), rtol=1e-5, atol=1e-6)


def test_grouped_offset_sample_group_and_axis_order():
  """Group g (channels g*C/G..) moves by offsets (2g = x, 2g+1 = y) in units of size / pixel."""
  h, w = 6, 8
  x = np.random.default_rng(3).standard_normal((1, h, w, 4)).astype(np.float32)
  off = np.zeros((1, h, w, 4), np.float32)
  off[..., 0] = 2 * w / (w - 1)  # group 0: +1 pixel in x (grid units 2/(w-1) per pixel, times w)
  off[..., 3] = -2 * h / (h - 1)  # group 1: -1 pixel in y
  got = np.asarray(sfc.grouped_offset_sample(jnp.asarray(x), jnp.asarray(off), 2))
  np.testing.assert_allclose(got[0, :, :-1, :2], x[0, :, 1:, :2], atol=1e-5)
  np.testing.assert_allclose(got[0, 1:, :, 2:], x[0, :-1, :, 2:], atol=1e-5)
  # shifted in from outside: zeros (up to the rounding of the grid at the border)
  assert np.abs(got[0, :, -1, :2]).max() < 1e-5 and np.abs(got[0, 0, :, 2:]).max() < 1e-5


@pytest.mark.parametrize('tiny', [False, True])
@pytest.mark.parametrize('train', [False, True])
def test_spatial_block_matches_torch(tiny, train):
  rng = np.random.default_rng(4)
  cp = rng.standard_normal((2, 12, 20, 128)).astype(np.float32)
  sp = rng.standard_normal((2, 3, 5, 256)).astype(np.float32)
  torch_mod = ref.SpatialBlock(tiny)
  ref.randomize_(torch_mod, seed=5, offset_scale=3.0)
  torch_mod.eval()
  with torch.no_grad():
    _, off = torch_mod(nchw(cp), nchw(sp), return_offsets=True)
  # some sample points land outside the map
  off = off.numpy()
  assert (np.abs(off[:, 0::2, :, 0]) * 19 / 40 > 1).any()
  compare(torch_mod, sfc.SpatialBlock(proj_channels=None if tiny else 32), [cp, sp], train=train, tol=1e-5)
