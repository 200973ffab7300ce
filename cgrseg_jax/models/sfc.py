"""Spatial feature calibration (`sfc`, upstream `SFC_G2`), NHWC, plus the two
PyTorch samplers it needs: `grid_sample` (bilinear, zeros padding,
align_corners=True) and bilinear resizing with align_corners=True.

sp = ConvBNReLU3x3(context) resized to the stride-8 size; cp = ConvBNReLU3x3(feat8).
A small branch predicts 10 channels: 0-3 offsets for cp, 4-7 offsets for sp
(group g: channel 2g is x, 2g + 1 is y, in pixels / size), 8-9 attention.
Each half of the channels (group) of cp and sp is resampled with its own
offsets around the identity grid; out = sp' (1 + tanh a8) + cp' (1 + tanh a9).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cgrseg_jax.models import resize
from cgrseg_jax.models.cfc import ConvBNReLUConv, conv_bn_relu
from cgrseg_jax.models.layers import conv

Dtype = Any


@functools.lru_cache(maxsize=None)
def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace` in float32 as its scalar kernel computes it (the first half
  counts up from `start`, the second down from `end`): exact endpoints, within
  one ulp elsewhere (torch's vectorised kernel rounds some points differently)."""
  if steps == 1:
    return np.array([start], np.float32)
  step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
  i = np.arange(steps)
  up = np.float32(start) + i.astype(np.float32) * step
  down = np.float32(end) - (steps - 1 - i).astype(np.float32) * step
  return np.where(i < steps // 2, up, down).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _align_corners_taps(in_size: int, out_size: int):
  """Indices and weights of PyTorch bilinear with align_corners=True:
  source = dst * (in - 1) / (out - 1), in float32 as PyTorch's CPU kernel."""
  scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
  src = (np.float32(scale) * np.arange(out_size, dtype=np.float32)).astype(np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  i0, i1, w0, w1 = _align_corners_taps(in_size, out_size)
  return resize.taps_to_matrix(np.stack([i0, i1], -1), np.stack([w0, w1], -1), in_size)


def resize_bilinear_align_corners(x, size: Sequence[int], impl: str = 'auto'):
  """`F.interpolate(x, size, mode='bilinear', align_corners=True)` on NHWC; `impl`
  as `resize.resolve_resize` (gathers, or products with the interpolation matrix)."""
  impl = resize.resolve_resize(impl)
  for axis, out in zip((1, 2), size):
    if x.shape[axis] == out:
      continue
    if impl == 'matmul':
      x = resize.apply_matrix(x, axis, _align_corners_matrix(x.shape[axis], int(out)))
      continue
    i0, i1, w0, w1 = _align_corners_taps(x.shape[axis], int(out))
    shape = [1] * x.ndim
    shape[axis] = int(out)
    x = jnp.take(x, i0, axis=axis) * jnp.asarray(w0, x.dtype).reshape(shape) + jnp.take(x, i1, axis=axis) * jnp.asarray(
      w1, x.dtype
    ).reshape(shape)
  return x


def grid_sample(x, grid):
  """`F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=True)`.

  x: (N, H, W, C); grid: (N, Ho, Wo, 2) with (x, y) in [-1, 1] for the corner
  pixel centres. Source pixel = (g + 1) / 2 * (size - 1); each of the four
  neighbours outside the map contributes zero.
  """
  n, h, w, c = x.shape
  ho, wo = grid.shape[1:3]
  gx = grid[..., 0].astype(jnp.float32)
  gy = grid[..., 1].astype(jnp.float32)
  ix = (gx + 1.0) / 2.0 * (w - 1)
  iy = (gy + 1.0) / 2.0 * (h - 1)
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  tx, ty = ix - x0, iy - y0
  flat = x.reshape(n, h * w, c)
  out = jnp.zeros((n, ho * wo, c), x.dtype)
  for dy, wy in ((0, 1.0 - ty), (1, ty)):
    for dx, wx in ((0, 1.0 - tx), (1, tx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32).reshape(n, ho * wo, 1)
      weight = jnp.where(inside, wx * wy, 0.0).reshape(n, ho * wo, 1).astype(x.dtype)
      out = out + jnp.take_along_axis(flat, idx, axis=1) * weight
  return out.reshape(n, ho, wo, c)


def identity_grid(h: int, w: int) -> np.ndarray:
  """(H, W, 2) float32: x = linspace(-1, 1, W) along columns, y = linspace(-1, 1, H) along rows."""
  gx = np.broadcast_to(torch_linspace(-1.0, 1.0, w)[None, :], (h, w))
  gy = np.broadcast_to(torch_linspace(-1.0, 1.0, h)[:, None], (h, w))
  return np.stack([gx, gy], axis=-1)


def grouped_offset_sample(x, offsets, groups: int):
  """Split x's channels into `groups` consecutive parts and sample part g at
  identity + offsets[..., 2g:2g+2] / (W, H) (offsets in the upstream units)."""
  n, h, w, c = x.shape
  xg = x.reshape(n, h, w, groups, c // groups).transpose(0, 3, 1, 2, 4).reshape(n * groups, h, w, c // groups)
  off = offsets.reshape(n, h, w, groups, 2).transpose(0, 3, 1, 2, 4).reshape(n * groups, h, w, 2)
  norm = jnp.asarray([w, h], jnp.float32)
  grid = jnp.asarray(identity_grid(h, w)) + off.astype(jnp.float32) / norm
  out = grid_sample(xg, grid)
  return out.reshape(n, groups, h, w, c // groups).transpose(0, 2, 3, 1, 4).reshape(n, h, w, c)


class SpatialBlock(nn.Module):
  """Upstream `SFC_G2`. `proj_channels` None = CSFCN-Tiny (the offset branch
  reads cp and sp themselves), else both are projected by bias-free 1x1 convs."""

  channels: int = 128
  proj_channels: Optional[int] = 32
  offset_channels: int = 64
  groups: int = 2
  dtype: Dtype = jnp.float32
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize

  @nn.compact
  def __call__(self, cp, sp, train: bool = False, return_offsets: bool = False):
    d, c = self.dtype, self.channels
    h, w = cp.shape[1:3]
    sp = conv_bn_relu(c, 3, d, 'conv_32')(sp, train)
    sp = resize_bilinear_align_corners(sp, (h, w), self.resize_impl)
    cp = conv_bn_relu(c, 3, d, 'conv_8')(cp, train)
    if self.proj_channels is None:
      both = jnp.concatenate([cp, sp], axis=-1)
    else:
      p = self.proj_channels
      both = jnp.concatenate(
        [conv(p, 1, bias=False, dtype=d, name='cp1x1')(cp), conv(p, 1, bias=False, dtype=d, name='sp1x1')(sp)], -1
      )
    o = ConvBNReLUConv(self.offset_channels, self.groups * 4 + 2, dtype=d, name='conv_offset')(both, train)
    g2 = 2 * self.groups
    cp = grouped_offset_sample(cp, o[..., :g2], self.groups)
    sp = grouped_offset_sample(sp, o[..., g2 : 2 * g2], self.groups)
    att = 1.0 + jnp.tanh(o[..., 2 * g2 :])
    out = sp * att[..., 0:1] + cp * att[..., 1:2]
    return (out, o) if return_offsets else out
