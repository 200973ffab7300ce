"""Resampling with PyTorch's exact index arithmetic, on NHWC arrays.

`jax.image.resize` antialiases when downsampling and places samples slightly
differently from `torch.nn.functional.interpolate`; the upstream model resizes
features, attention biases and logits with the PyTorch rules, so parity needs
them reproduced. All index/weight tables depend only on static shapes: they are
built with numpy at trace time and become constants, so nothing recompiles per
call and the work is a gather plus a few multiply-adds per output sample.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _source_coords(in_size: int, out_size: int) -> np.ndarray:
  """Half-pixel source coordinates, in float32 arithmetic as PyTorch's CPU
  kernels compute them (float64 here would shift weights by ~1e-5)."""
  scale = np.float64(np.float32(np.float32(in_size) / np.float32(out_size)))
  # One rounding of scale * (dst + 0.5) - 0.5, as a fused multiply-add gives.
  return (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)


@functools.lru_cache(maxsize=None)
def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """2-tap indices and weights of PyTorch bilinear, align_corners=False.

  source = (dst + 0.5) * in/out - 0.5, clamped below at 0; the upper neighbour
  is clamped to the last index.
  """
  src = np.maximum(_source_coords(in_size, out_size), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
  return i0, i1, np.float32(1) - w1, w1


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 (a=-0.75)."""
  a = np.float32(_CUBIC_A)
  t = t.astype(np.float32)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """4-tap indices (clamped to the border) and weights of PyTorch bicubic."""
  src = _source_coords(in_size, out_size)  # not clamped for cubic
  base = np.floor(src)
  idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  return idx, _cubic_weights(src - base).astype(np.float32)


def _resize_axis_linear(x, axis: int, out_size: int):
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  i0, i1, w0, w1 = linear_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w0 = jnp.asarray(w0, x.dtype).reshape(shape)
  w1 = jnp.asarray(w1, x.dtype).reshape(shape)
  return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def _resize_axis_cubic(x, axis: int, out_size: int):
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  idx, w = cubic_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  out = 0
  for k in range(4):
    out = out + jnp.take(x, idx[:, k], axis=axis) * jnp.asarray(w[:, k], x.dtype).reshape(shape)
  return out


def resize_bilinear(x, size: Sequence[int], axes: tuple[int, int] = (1, 2)):
  """`F.interpolate(mode='bilinear', align_corners=False)` on the given axes (NHWC: 1, 2)."""
  x = _resize_axis_linear(x, axes[0], int(size[0]))
  return _resize_axis_linear(x, axes[1], int(size[1]))


def resize_bicubic(x, size: Sequence[int], axes: tuple[int, int] = (-2, -1)):
  """`F.interpolate(mode='bicubic', align_corners=False)` on the given axes."""
  x = _resize_axis_cubic(x, axes[0], int(size[0]))
  return _resize_axis_cubic(x, axes[1], int(size[1]))


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging matrix of PyTorch's adaptive average pooling bins:
  bin i covers [floor(i*in/out), ceil((i+1)*in/out))."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size: Sequence[int]):
  """`F.adaptive_avg_pool2d` on an NHWC array."""
  mh = jnp.asarray(adaptive_pool_matrix(x.shape[1], int(size[0])), x.dtype)
  mw = jnp.asarray(adaptive_pool_matrix(x.shape[2], int(size[1])), x.dtype)
  x = jnp.einsum('oh,nhwc->nowc', mh, x, precision='highest')
  return jnp.einsum('pw,nowc->nopc', mw, x, precision='highest')
