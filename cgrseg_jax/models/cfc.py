"""Context feature calibration (`cfc`, upstream `CFC_CRB`): pyramid-pooled
attention followed by a tanh local attention, NHWC.

x = ConvBNReLU3x3(x); query = conv1x1(x) (32 ch, per pixel); key / value =
Conv1d(k=1) over pyramid-pooled bins of x; context = softmax_bins(query . key)
weighted sum of values; context += context * tanh(local(context)); out = x + context.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgrseg_jax.models.layers import ConvBN, conv
from cgrseg_jax.models.resize import adaptive_avg_pool

Dtype = Any
GRIDS = (6, 3, 2, 1)


def conv_bn_relu(features: int, kernel: int, dtype: Dtype, name: str) -> ConvBN:
  """Upstream `ConvBNReLU` (bias-free conv, BN, ReLU; children `conv`, `bn`), 'same' padding."""
  return ConvBN(
    features, kernel, padding=kernel // 2, bias=False, act=nn.relu, names=('conv', 'bn'), dtype=dtype, name=name
  )


def pyramid_bins(h: int, w: int, grids: Sequence[int] = GRIDS) -> list[tuple[int, int]]:
  """Pooled sizes (g, max(1, round(ar * g))), ar = w / h, with Python's round
  (ties to even) on the same float product as upstream."""
  ar = w / h
  return [(g, max(1, round(ar * g))) for g in grids]


def pyramid_pool(x, grids: Sequence[int] = GRIDS):
  """(N, H, W, C) -> (N, S, C): PyTorch adaptive average pools to each bin size,
  flattened row-major and concatenated (the order of upstream's `view(b, c, -1)`)."""
  n, h, w, c = x.shape
  return jnp.concatenate([adaptive_avg_pool(x, size).reshape(n, -1, c) for size in pyramid_bins(h, w, grids)], axis=1)


class ConvBNReLUConv(nn.Module):
  """nn.Sequential(ConvBNReLU1x1 -> `inter`, bias-free conv3x3 -> `features`):
  children `0` and `1` (the local attention's `conv` and the offset branch's `conv_offset`)."""

  inter_channels: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv_bn_relu(self.inter_channels, 1, self.dtype, '0')(x, train)
    return conv(self.features, 3, padding=1, bias=False, dtype=self.dtype, name='1')(y)


class LocalAttention(nn.Module):
  """out = x + x * tanh(conv(x)), `conv` a `ConvBNReLUConv`."""

  channels: int
  inter_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = ConvBNReLUConv(self.inter_channels, self.channels, dtype=self.dtype, name='conv')(x, train)
    return x * jnp.tanh(y) + x


class PointwiseConv1d(nn.Module):
  """`nn.Conv1d(kernel_size=1)` over (N, S, C): a dense layer on the channel
  axis whose kernel keeps PyTorch's (O, I) order (the state dict's (O, I, 1)
  minus the unit axis), so conversion is a reshape. Init as PyTorch's fan-in scale."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=1, out_axis=0)
    kernel = self.param('kernel', init, (self.features, x.shape[-1]), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.einsum('nsc,oc->nso', x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class ContextBlock(nn.Module):
  """Upstream `CFC_CRB` (in 512, inner 256, key channels 32)."""

  inter_channels: int = 256
  key_channels: int = 32
  local_channels: int = 64  # 32 in CSFCN-Tiny
  grids: Sequence[int] = GRIDS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    x = conv_bn_relu(self.inter_channels, 3, d, 'reduce_channel')(x, train)
    n, h, w, _ = x.shape
    query = conv(self.key_channels, 1, dtype=d, name='query_conv')(x).reshape(n, h * w, self.key_channels)
    pooled = pyramid_pool(x, self.grids)  # one pooling serves key_psp and value_psp (identical, parameter-free)
    key = PointwiseConv1d(self.key_channels, dtype=d, name='key_conv')(pooled)
    value = PointwiseConv1d(self.inter_channels, dtype=d, name='value_conv')(pooled)
    attn = jax.nn.softmax(jnp.einsum('nqc,nsc->nqs', query, key).astype(jnp.float32), axis=-1).astype(d)
    context = jnp.einsum('nqs,nsc->nqc', attn, value).reshape(n, h, w, self.inter_channels)
    context = LocalAttention(self.inter_channels, self.local_channels, dtype=d, name='local_attention')(context, train)
    return x + context
