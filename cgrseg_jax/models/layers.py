"""Building blocks with PyTorch semantics, shared by the backbone and the head.

Submodule names follow the PyTorch module names (`'0'`, `'1'` for the children
of an `nn.Sequential`, `conv`/`bn` for an mmcv `ConvModule`), so that a Flax
variable path is the PyTorch state-dict key split at the dots; see convert.py.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def gelu(x):
  """Exact (erf) GELU, PyTorch's default; the tanh form drifts by ~1e-3."""
  return jax.nn.gelu(x, approximate=False)


def hard_sigmoid(x):
  """relu6(x + 3) / 6."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


# PyTorch's default Conv2d weight init (kaiming_uniform with a=sqrt(5)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
trunc_normal_02 = nn.initializers.truncated_normal(0.02)


_depthwise_as_shifts = True


@contextlib.contextmanager
def depthwise_as_grouped_conv():
  """Trace depthwise convolutions as `conv_general_dilated` (what they are
  mathematically) instead of shifted sums, e.g. to count multiply-adds."""
  global _depthwise_as_shifts
  saved, _depthwise_as_shifts = _depthwise_as_shifts, False
  try:
    yield
  finally:
    _depthwise_as_shifts = saved


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
  name: Optional[str] = None,
) -> nn.Module:
  """An `nn.Conv2d` equivalent: symmetric explicit padding, groups, HWIO kernel.
  Depthwise convolutions (groups == features) go through `DepthwiseConv`."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  if groups > 1 and groups == features and _depthwise_as_shifts:
    return DepthwiseConv(features, kernel, stride, padding, bias, dtype, kernel_init, name=name)
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


class DepthwiseConv(nn.Module):
  """Depthwise conv (PyTorch `groups == in == out channels`) as a sum of shifted,
  per-channel-scaled views of the padded input.

  XLA's CPU backend runs grouped convolutions through a slow generic path (60% of
  the CGRSeg-T forward); the shifted sum fuses into one elementwise loop and is
  ~50x faster for a 3x3 kernel there. Same `kernel` (kh, kw, 1, C) and `bias`
  variables as `nn.Conv`, so checkpoints do not change.
  """

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = torch_default_kernel_init

  @nn.compact
  def __call__(self, x):
    c = self.features
    if x.shape[-1] != c:
      raise ValueError(f'{self.name}: depthwise conv of {c} channels applied to {x.shape[-1]} channels')
    (kh, kw), (ph, pw), s = self.kernel, self.padding, self.stride
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, c), jnp.float32).astype(self.dtype)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    ho, wo = (x.shape[1] - kh) // s + 1, (x.shape[2] - kw) // s + 1
    out = None
    for i in range(kh):
      for j in range(kw):
        tap = x[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    if self.bias:
      out = out + self.param('bias', nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
    return out


class BatchNorm(nn.Module):
  """`nn.BatchNorm2d` / SyncBN over the last axis.

  Training normalises with the biased batch variance but, like PyTorch, feeds
  the *unbiased* variance into the running estimate (momentum 0.1). Statistics
  are reduced over every axis but channels of the (global, possibly sharded)
  batch, so under `jit` with a batch sharded over devices this is SyncBN.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass: no cancellation
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
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
      name=self.names[0],
    )(x)
    x = BatchNorm(dtype=self.dtype, name=self.names[1])(x, train)
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
