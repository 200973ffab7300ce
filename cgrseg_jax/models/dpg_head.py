"""Dynamic Prototype Guided (DPG) head pieces, NHWC.

The first prediction of the decoder weights the pixels of the feature map
(softmax over space, one distribution per class) to gather one prototype per
class; attention pooling over the class prototypes gives a single context
vector, and a sigmoid of a small MLP on it gates the features channel-wise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgrseg_jax.models.layers import conv

Dtype = Any


def spatial_gather(feats, probs, scale: float = 1.0):
  """Class prototypes: for each class k, sum_p softmax_p(scale * probs[p, k]) * feats[p].

  feats (B, H, W, C), probs (B, H, W, K) -> (B, K, 1, C): the K prototypes laid
  out as a K x 1 map, as the upstream head treats them.
  """
  b, h, w, c = feats.shape
  k = probs.shape[-1]
  weights = jax.nn.softmax(scale * probs.reshape(b, h * w, k).astype(jnp.float32), axis=1)
  protos = jnp.einsum('bpk,bpc->bkc', weights.astype(feats.dtype), feats.reshape(b, h * w, c))
  return protos.reshape(b, k, 1, c)


class ChannelMlp(nn.Module):
  """1x1 conv, LayerNorm over channels, ReLU, 1x1 conv (children '0', '1', '3').

  The last conv starts at zero so the gate starts at sigmoid(0) = 0.5, as upstream."""

  dim: int
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.hidden, 1, dtype=self.dtype, name='0')(x)
    x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32, name='1')(x)
    x = jax.nn.relu(x)
    return conv(self.dim, 1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name='3')(x)


class DPGHead(nn.Module):
  """Attention-pool the context map into one vector and gate `x` channel-wise."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = context.shape
    mask = conv(
      1, 1, dtype=self.dtype, kernel_init=nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'), name='conv_mask'
    )(context)
    mask = jax.nn.softmax(mask.reshape(b, h * w).astype(jnp.float32), axis=1).astype(context.dtype)
    pooled = jnp.einsum('bp,bpc->bc', mask, context.reshape(b, h * w, c))
    # The 1x1 convs of a 1x1 map run on the (b, c) vectors: LiteRT's converter
    # mislowers a matmul of one (1, 1, 1, c) pixel.
    gate = jax.nn.sigmoid(ChannelMlp(x.shape[-1], self.hidden, dtype=self.dtype, name='channel_mul_conv')(pooled))
    return x * gate.reshape(b, 1, 1, -1)
