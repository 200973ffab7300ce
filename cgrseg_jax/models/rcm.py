"""Rectangular Self-Calibration Attention (RCA) and Module (RCM), NHWC.

RCA gathers context along rows and columns (mean over W plus mean over H),
calibrates it with a band-shaped pair of depthwise convolutions (1 x k, then
k x 1) and a sigmoid, and uses the result to gate a local 3x3 depthwise branch.
RCM is a MetaNeXt-style block around it: RCA, BN, conv MLP, layer scale,
residual.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgrseg_jax.models.layers import BatchNorm, DropPath, conv, gelu

Dtype = Any

LAYER_SCALE_INIT = 1e-6


class Excite(nn.Module):
  """(1 x k) depthwise conv, BN, ReLU, (k x 1) depthwise conv, sigmoid
  (an `nn.Sequential` upstream: children '0', '1', '3')."""

  dim: int
  groups: int
  band_kernel: int
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.band_kernel
    x = conv(
      self.groups, (1, k), padding=(0, k // 2), groups=self.groups, dtype=self.dtype, depthwise=self.depthwise, name='0'
    )(x)
    x = jax.nn.relu(BatchNorm(dtype=self.dtype, name='1')(x, train))
    x = conv(
      self.dim, (k, 1), padding=(k // 2, 0), groups=self.groups, dtype=self.dtype, depthwise=self.depthwise, name='3'
    )(x)
    return jax.nn.sigmoid(x)


class RCA(nn.Module):
  """Rectangular self-calibration attention."""

  band_kernel: int = 11
  square_kernel: int = 3
  ratio: int = 1
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    local = conv(
      c,
      self.square_kernel,
      padding=self.square_kernel // 2,
      groups=c,
      dtype=self.dtype,
      depthwise=self.depthwise,
      name='dwconv_hw',
    )(x)
    # Row context (pooled over W) plus column context (pooled over H), broadcast to H x W.
    context = jnp.mean(x, axis=2, keepdims=True) + jnp.mean(x, axis=1, keepdims=True)
    gate = Excite(c, c // self.ratio, self.band_kernel, dtype=self.dtype, depthwise=self.depthwise, name='excite')(
      context, train
    )
    return gate * local


class ConvMlp(nn.Module):
  """1x1 conv, GELU, 1x1 conv."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = gelu(conv(self.hidden, 1, dtype=self.dtype, name='fc1')(x))
    return conv(c, 1, dtype=self.dtype, name='fc2')(x)


class RCM(nn.Module):
  """Rectangular self-calibration module: x + gamma * mlp(bn(rca(x)))."""

  band_kernel: int = 11
  square_kernel: int = 3
  mlp_ratio: float = 2.0
  ratio: int = 1
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    y = RCA(
      self.band_kernel, self.square_kernel, self.ratio, dtype=self.dtype, depthwise=self.depthwise, name='token_mixer'
    )(x, train)
    y = BatchNorm(dtype=self.dtype, name='norm')(y, train)
    y = ConvMlp(int(self.mlp_ratio * c), dtype=self.dtype, name='mlp')(y)
    gamma = self.param('gamma', nn.initializers.constant(LAYER_SCALE_INIT), (c,), jnp.float32)
    return x + DropPath(self.drop_path)(y * gamma.astype(y.dtype), train)
