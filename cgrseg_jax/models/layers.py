"""Building blocks with PyTorch semantics, shared by the backbone and the head.

Submodule names follow the PyTorch module names (`'0'`, `'1'` for the children
of an `nn.Sequential`, `conv`/`bn` for an mmcv `ConvModule`), so that a Flax
variable path is the PyTorch state-dict key split at the dots; see convert.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgrseg_jax.platforms import target_platform

Dtype = Any


def gelu(x):
  """Exact (erf) GELU, PyTorch's default; the tanh form drifts by ~1e-3.

  Written as PyTorch writes it, x/2 * (1 + erf(x/sqrt 2)): XLA's CPU erf is a
  vectorised rational approximation, 7x faster than the erfc that
  `jax.nn.gelu(approximate=False)` uses, and agrees with PyTorch as closely."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16: one conversion, not one per op
  return (0.5 * xf * (1.0 + jax.lax.erf(xf * math.sqrt(0.5)))).astype(x.dtype)


def hard_sigmoid(x):
  """relu6(x + 3) / 6."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


# PyTorch's default Conv2d weight init (kaiming_uniform with a=sqrt(5)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
trunc_normal_02 = nn.initializers.truncated_normal(0.02)


# Depthwise implementations, a model field (`depthwise=`): 'shifts' (shifted sums
# with a hand-written gradient) or 'xla' (`conv_general_dilated` with
# `feature_group_count`, what the op is mathematically). 'auto' picks per backend.
DEPTHWISE_IMPLS = ('auto', 'shifts', 'xla')


def resolve_depthwise(impl: str, platform: Optional[str] = None) -> str:
  """'auto' -> 'shifts' for CPU, where XLA lowers a grouped convolution to a slow
  generic loop (forward and both gradients); 'xla' for GPU/TPU, where cuDNN and
  the TPU convolution emitter have native depthwise kernels and a chain of 9-121
  elementwise slices would only add memory traffic. `platform`: the target
  (`platforms.target_platform`); model builders resolve 'auto' with it, so layers see the choice."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'depthwise={impl!r}; expected one of {DEPTHWISE_IMPLS}')
  if impl == 'auto':
    return 'shifts' if target_platform(platform) == 'cpu' else 'xla'
  return impl


def _view(xp, i: int, j: int, stride: int, out_hw: tuple[int, int]):
  """xp[:, s*oh + i, s*ow + j, :] for every output position (oh, ow)."""
  n, _, _, c = xp.shape
  (ho, wo), s = out_hw, stride
  return jax.lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1))


def _taps(xp, kernel, stride: int, out_hw: tuple[int, int]):
  """sum_ij view_ij(xp) * kernel[i, j]: XLA fuses it into one elementwise loop."""
  out = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      tap = _view(xp, i, j, stride, out_hw) * kernel[i, j]
      out = tap if out is None else out + tap
  return out


def _pad_hw(x, ph: int, pw: int):
  return jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph, ph, 0), (pw, pw, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def depthwise_shifts(x, kernel, bias, stride: int, padding: tuple[int, int]):
  """Depthwise conv of NHWC `x` with a (kh, kw, C) kernel and optional (C,)
  bias, PyTorch semantics (symmetric zero padding), as shifted sums."""
  (ph, pw), (kh, kw) = padding, kernel.shape[:2]
  ho = (x.shape[1] + 2 * ph - kh) // stride + 1
  wo = (x.shape[2] + 2 * pw - kw) // stride + 1
  # Accumulate in float32 whatever the storage dtype: XLA CPU has no bf16
  # arithmetic and would round to bf16 after every multiply and add (81 converts
  # for a 3x3 kernel, 5x slower than float32); one conversion at the end instead.
  acc = jnp.promote_types(x.dtype, jnp.float32)
  out = _taps(_pad_hw(x, ph, pw).astype(acc), kernel.astype(acc), stride, (ho, wo))
  out = out if bias is None else out + bias.astype(acc)
  return out.astype(x.dtype)


def _depthwise_shifts_fwd(x, kernel, bias, stride, padding):
  return depthwise_shifts(x, kernel, bias, stride, padding), (x, kernel, bias)


def _depthwise_shifts_bwd(stride, padding, res, g):
  """Input gradient: the output gradient dilated by the stride, correlated with
  the flipped kernel (shifted sums again, one fused loop). Kernel gradient:
  `_kernel_grad`. Bias gradient: a plain sum of g."""
  x, kernel, bias = res
  (ph, pw), (kh, kw), s = padding, kernel.shape[:2], stride
  h, w = x.shape[1:3]
  ho, wo = g.shape[1:3]
  # dx[y] = sum_i gd[y + ph - i] k[i], gd = g placed on every s-th row (zeros
  # between). gp[t] = gd[t - (kh-1-ph)]: one lax.pad dilates and pads (or crops,
  # negative padding) the edges, covering every stride / padding / size case.
  gp = jax.lax.pad(
    g,
    jnp.zeros((), g.dtype),
    (
      (0, 0, 0),
      (kh - 1 - ph, h + ph - 1 - s * (ho - 1), s - 1),
      (kw - 1 - pw, w + pw - 1 - s * (wo - 1), s - 1),
      (0, 0, 0),
    ),
  )
  acc = jnp.promote_types(g.dtype, jnp.float32)
  gp = gp.astype(acc)
  dx = _taps(gp, kernel[::-1, ::-1].astype(acc), 1, (h, w))
  dk = _kernel_grad(x.astype(acc), gp, (kh, kw)).astype(kernel.dtype)
  db = None if bias is None else jnp.sum(g.astype(acc), axis=(0, 1, 2)).astype(bias.dtype)
  return dx.astype(x.dtype), dk, db


def _kernel_grad(x, gp, kernel_hw: tuple[int, int]):
  """dk[i, j] = sum over (n, u, v) of x[n, u, v] * gp[n, u + kh-1-i, v + kw-1-j]
  with the dilated, padded output gradient gp of the input gradient (the same
  correlation, read the other way round; any stride and padding), in two
  passes. XLA CPU emits a reduction that reads a shifted slice as a slow scalar
  loop, about 10x slower than the same reduction of an unsliced array, which
  goes to its vectorised library kernel. So the first pass only multiplies and
  adds: for each tap, the products of every R-th row are summed into one row
  (an elementwise loop writing taps/R times the size of x); the second pass
  reduces that. 3x faster than one variadic reduction over all taps for
  8x128x128x128 on 2 Zen 5 cores, and x is read unpadded."""
  kh, kw = kernel_hw
  n, h, w, c = x.shape
  most = max(1, min(16, 144 // (kh * kw)))  # terms per fused loop stay few enough to compile quickly
  rows = max(r for r in range(1, most + 1) if h % r == 0)
  taps = []
  for i in range(kh):
    for j in range(kw):
      total = None
      for q in range(rows):
        xq = jax.lax.slice(x, (0, q, 0, 0), (n, h, w, c), (1, rows, 1, 1))
        start = (0, q + kh - 1 - i, kw - 1 - j, 0)
        gq = jax.lax.slice(gp, start, (n, start[1] + h - rows + 1, start[2] + w, c), (1, rows, 1, 1))
        total = xq * gq if total is None else total + xq * gq
      taps.append(total)
  partial = jax.lax.optimization_barrier(jnp.stack(taps))  # keeps the sum below out of the loop above
  return jnp.sum(partial, axis=(1, 2, 3)).reshape(kh, kw, c)


depthwise_shifts.defvjp(_depthwise_shifts_fwd, _depthwise_shifts_bwd)


def depthwise_xla(x, kernel, bias, stride: int, padding: tuple[int, int]):
  """The same convolution as one grouped `conv_general_dilated` (autodiff gives
  grouped convolutions for both gradients)."""
  c = x.shape[-1]
  out = jax.lax.conv_general_dilated(
    x,
    kernel[:, :, None, :],
    (stride, stride),
    [(padding[0], padding[0]), (padding[1], padding[1])],
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=c,
  )
  return out if bias is None else out + bias


def conv(
  features: int,
  kernel: int | Sequence[int],
  *,
  stride: int = 1,
  padding: int | Sequence[int] = 0,
  groups: int = 1,
  bias: bool = True,
  dtype: Dtype = jnp.float32,
  kernel_init: Callable = torch_default_kernel_init,
  depthwise: str = 'auto',
  name: Optional[str] = None,
) -> nn.Module:
  """An `nn.Conv2d` equivalent: symmetric explicit padding, groups, HWIO kernel.
  Depthwise convolutions (groups == features) go through `DepthwiseConv`, with
  the implementation `depthwise` ('auto' | 'shifts' | 'xla')."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  if groups > 1 and groups == features:
    return DepthwiseConv(features, kernel, stride, padding, bias, dtype, kernel_init, depthwise, name=name)
  if kernel == (1, 1) and stride == 1 and padding == (0, 0) and groups == 1:
    return PointwiseConv(features, bias, dtype, kernel_init, name=name)
  return nn.Conv(
    features,
    kernel,
    strides=(stride, stride),
    padding=[(padding[0], padding[0]), (padding[1], padding[1])],
    feature_group_count=groups,
    use_bias=bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=nn.initializers.zeros,
    name=name,
  )


@jax.custom_vjp
def channel_matmul(x, w):
  """x (..., I) @ w (I, O) with both gradients written as GEMMs on the
  flattened (pixels, channels) activations: dw = x^T g contracts the pixel
  axis of both operands where they lie, which XLA CPU runs as one GEMM. The
  autodiff form computes (g^T x)^T, and XLA then writes the activation
  gradient a second time, transposed (a 128x128x128x8 tensor costs ~55 ms)."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _channel_matmul_fwd(x, w):
  return channel_matmul(x, w), (x, w)


def _channel_matmul_bwd(res, g):
  x, w = res
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


class PointwiseConv(nn.Module):
  """1x1 convolution as a matmul over the channel axis. As `conv_general_dilated`
  its kernel gradient is a convolution with batch and feature dimensions
  swapped, which XLA's CPU backend runs behind two layout transposes of the
  activations (10% of the CGRSeg-T train step); as a `dot_general` both
  gradients are plain GEMMs. Same `kernel` (1, 1, in, out) and `bias` as `nn.Conv`."""

  features: int
  bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = torch_default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    x = x.astype(self.dtype)
    y = channel_matmul(x, kernel[0, 0].astype(self.dtype))
    if self.bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


class DepthwiseConv(nn.Module):
  """Depthwise conv (PyTorch `groups == in == out channels`).

  `impl='shifts'`: a sum of shifted, per-channel-scaled views of the padded
  input, with the hand-written gradient of `depthwise_shifts`. XLA's CPU backend
  runs grouped convolutions through a slow generic path (60% of the CGRSeg-T
  forward, and both gradients); the shifted sum fuses into one elementwise loop
  and is ~25x faster for a 3x3 kernel there, forward and backward. `impl='xla'`:
  `conv_general_dilated` with `feature_group_count`; 'auto' (`resolve_depthwise`)
  picks per backend. Same `kernel` (kh, kw, 1, C) and `bias` variables as
  `nn.Conv` either way, so checkpoints do not change.
  """

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = torch_default_kernel_init
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    c = self.features
    if x.shape[-1] != c:
      raise ValueError(f'{self.name}: depthwise conv of {c} channels applied to {x.shape[-1]} channels')
    kh, kw = self.kernel
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, c), jnp.float32).astype(self.dtype)
    bias = None
    if self.bias:
      bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
    fn = depthwise_shifts if resolve_depthwise(self.impl) == 'shifts' else depthwise_xla
    return fn(x.astype(self.dtype), kernel[:, :, 0, :], bias, self.stride, tuple(self.padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """Training-mode batch norm over every axis but the last, in float32:
  (y, batch mean, biased batch variance). The variance is two-pass (no
  cancellation). The hand-written gradient is the textbook one: two
  reductions (sum g, sum g * xhat) and one elementwise pass, where autodiff
  through mean and variance gives three gradient paths into x, summed in
  extra passes over the activation (a tenth of the CGRSeg-T train step)."""
  return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  var = jnp.mean(jnp.square(xf - mean), axes)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (xf - mean) * (scale * rstd) + bias
  return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_train_bwd(epsilon, res, cotangents):
  # The mean and variance outputs only feed the running statistics, which are
  # not differentiated: their cotangents are zero and ignored.
  del epsilon
  x, mean, rstd, scale = res
  gy = cotangents[0]
  axes = tuple(range(x.ndim - 1))
  m = math.prod(x.shape[:-1])
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dbias = jnp.sum(gy, axes)
  dscale = jnp.sum(gy * xhat, axes)
  dx = (scale * rstd) * (gy - dbias / m - xhat * (dscale / m))
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
  """`nn.BatchNorm2d` / SyncBN over the last axis.

  Training normalises with the biased batch variance but, like PyTorch, feeds
  the *unbiased* variance into the running estimate (momentum 0.1). Statistics
  are reduced over every axis but channels of the (global, possibly sharded)
  batch, so under `jit` with a batch sharded over devices this is SyncBN.

  `frozen`: a PyTorch BN kept in eval mode inside a training model (upstream's
  EfficientFormer backbone puts its BNs back in eval mode in `train()`): it
  normalises with the running statistics in training too and never updates
  them; its scale and bias still learn.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  frozen: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if train and not self.frozen:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
      y = (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype or x.dtype)


class ConvBN(nn.Module):
  """Conv2d followed by BatchNorm2d (and an optional activation).

  `names` are the PyTorch names of the two children: `('0', '1')` for an
  `nn.Sequential(conv, bn)`, `('conv', 'bn')` for an mmcv `ConvModule`.
  """

  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  groups: int = 1
  bias: bool = True
  act: Optional[Callable] = None
  names: tuple[str, str] = ('0', '1')
  kernel_init: Callable = torch_default_kernel_init
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'
  frozen_bn: bool = False  # see BatchNorm.frozen

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(
      self.features,
      self.kernel,
      stride=self.stride,
      padding=self.padding,
      groups=self.groups,
      bias=self.bias,
      dtype=self.dtype,
      kernel_init=self.kernel_init,
      depthwise=self.depthwise,
      name=self.names[0],
    )(x)
    x = BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name=self.names[1])(x, train)
    return self.act(x) if self.act is not None else x


class DropPath(nn.Module):
  """Stochastic depth per sample (timm's DropPath): zero a sample's residual
  branch with probability `rate` and scale survivors by 1 / (1 - rate)."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def dropout2d(rate: float, name: Optional[str] = None) -> nn.Dropout:
  """`nn.Dropout2d`: one Bernoulli draw per (sample, channel), shared over H and W."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), name=name)
