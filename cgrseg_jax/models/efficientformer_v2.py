"""EfficientFormerV2 backbone (Li et al., ICCV 2023) as CGRSeg uses it, NHWC.

The segmentation flavour: four stage outputs (strides 4, 8, 16, 32), attention
biases `attention_biases_seg` laid out for a 512x512 crop and resized bicubically
to the runtime attention size on every forward.

Module names mirror the upstream PyTorch names (`patch_embed`, `network_<i>`,
`token_mixer`, `mlp`, `fc1`, ...) so that conversion is mechanical.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors
from cgrseg_jax.models import resize
from cgrseg_jax.models.layers import BatchNorm, ConvBN, DropPath, conv, gelu, trunc_normal_02

Dtype = Any

# Widths, depths, per-block MLP expansion ratios, and how many of the last
# blocks of stages 3 and 4 carry attention.
BACKBONES = {
  's0': dict(
    widths=(32, 48, 96, 176),
    depths=(2, 2, 6, 4),
    vit_num=2,
    mlp_ratios=((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
  ),
  's1': dict(
    widths=(32, 48, 120, 224),
    depths=(3, 3, 9, 6),
    vit_num=2,
    mlp_ratios=((4, 4, 4), (4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
  ),
  's2': dict(
    widths=(32, 64, 144, 288),
    depths=(4, 4, 12, 8),
    vit_num=4,
    mlp_ratios=((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
  ),
  'l': dict(
    widths=(40, 80, 192, 384),
    depths=(5, 5, 15, 10),
    vit_num=6,
    mlp_ratios=((4,) * 5, (4,) * 5, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)),
  ),
}

LAYER_SCALE_INIT = 1e-5


@functools.lru_cache(maxsize=None)
def attention_bias_index(resolution: int, downsample: bool = False) -> tuple[np.ndarray, int]:
  """The `attention_bias_idxs_seg` table and the number of distinct offsets.

  Queries sit on a `resolution` grid (or every other point of it when
  `downsample`), keys on the full grid; each (|dy|, |dx|) offset gets an index in
  order of first appearance, scanning queries then keys in row-major order.
  """
  grid = np.stack(np.meshgrid(np.arange(resolution), np.arange(resolution), indexing='ij'), -1).reshape(-1, 2)
  if downsample:
    res2 = -(-resolution // 2)
    step = -(-resolution // res2)
    q = np.stack(np.meshgrid(np.arange(res2), np.arange(res2), indexing='ij'), -1).reshape(-1, 2) * step
  else:
    q = grid
  offsets = np.abs(q[:, None, :] - grid[None, :, :]).reshape(-1, 2)
  code = offsets[:, 0] * (resolution + 1) + offsets[:, 1]
  uniq, first = np.unique(code, return_index=True)
  rank = np.empty(len(uniq), np.int64)
  rank[np.argsort(first)] = np.arange(len(uniq))
  idx = rank[np.searchsorted(uniq, code)].reshape(len(q), len(grid))
  return idx, len(uniq)


def _attention_bias(
  module: nn.Module, num_heads: int, resolution: int, downsample: bool, n_query: int, n_key: int, impl: str = 'auto'
):
  """Gather the learned per-offset biases into a (heads, Nq, Nk) map for the
  reference resolution, then resize it bicubically to the runtime token counts."""
  idx, n_offsets = attention_bias_index(resolution, downsample)
  table = module.param('attention_biases_seg', nn.initializers.zeros, (num_heads, n_offsets), jnp.float32)
  return resize.resize_bicubic(table[:, idx], (n_query, n_key), impl=impl)


@jax.custom_vjp
def add_to_every_sample(x, bias):
  """x + bias[None]: the same (heads, Nq, Nk) bias added to every sample."""
  return x + bias[None]


def _add_to_every_sample_fwd(x, bias):
  return add_to_every_sample(x, bias), None


def _add_to_every_sample_bwd(_, g):
  # The bias gradient sums g over the batch. As one reduction over the leading
  # axis, XLA CPU takes 50 ms for 8x8x256x1024 floats; as a sum of the batch's
  # slices (one elementwise loop), 1 ms.
  total = g[0]
  for i in range(1, g.shape[0]):
    total = total + g[i]
  return g, total


add_to_every_sample.defvjp(_add_to_every_sample_fwd, _add_to_every_sample_bwd)


class HeadMix(nn.Module):
  """A 1x1 conv across attention heads (`talking_head1/2`) on (B, heads, N, M)."""

  num_heads: int

  @nn.compact
  def __call__(self, attn):
    h = self.num_heads
    kernel = self.param(
      'kernel', nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'), (1, 1, h, h), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (h,), jnp.float32)
    out = jnp.einsum('bhnm,hg->bgnm', attn, kernel[0, 0].astype(attn.dtype))
    return out + bias.astype(attn.dtype)[None, :, None, None]


class Attention4D(nn.Module):
  """Multi-head self-attention on a 2-D map with a local value branch and
  talking heads. With `stride`, attention runs on a strided depthwise-conv
  summary and the result is upsampled bilinearly before the projection."""

  dim: int
  resolution: int
  stride: int | None = None
  key_dim: int = 32
  num_heads: int = 8
  attn_ratio: int = 4
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    nh, kd, d = self.num_heads, self.key_dim, self.attn_ratio * self.key_dim
    resolution = self.resolution
    if self.stride is not None:
      resolution = math.ceil(resolution / self.stride)
      x = ConvBN(
        self.dim,
        3,
        stride=self.stride,
        padding=1,
        groups=self.dim,
        dtype=self.dtype,
        frozen_bn=self.frozen_bn,
        depthwise=self.depthwise,
        name='stride_conv',
      )(x, train)
    b, h, w, _ = x.shape
    n = h * w
    q = ConvBN(nh * kd, dtype=self.dtype, frozen_bn=self.frozen_bn, name='q')(x, train).reshape(b, n, nh, kd)
    k = ConvBN(nh * kd, dtype=self.dtype, frozen_bn=self.frozen_bn, name='k')(x, train).reshape(b, n, nh, kd)
    v_map = ConvBN(nh * d, dtype=self.dtype, frozen_bn=self.frozen_bn, name='v')(x, train)
    v_local = ConvBN(
      nh * d,
      3,
      padding=1,
      groups=nh * d,
      dtype=self.dtype,
      frozen_bn=self.frozen_bn,
      depthwise=self.depthwise,
      name='v_local',
    )(v_map, train)
    v = v_map.reshape(b, n, nh, d)

    attn = jnp.einsum('bnhc,bmhc->bhnm', q, k) * (kd**-0.5)
    bias = _attention_bias(self, nh, resolution, False, n, n, self.resize_impl)
    attn = add_to_every_sample(attn, bias.astype(attn.dtype))
    attn = HeadMix(nh, name='talking_head1')(attn)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(self.dtype)
    attn = HeadMix(nh, name='talking_head2')(attn)
    out = jnp.einsum('bhnm,bmhc->bnhc', attn, v).reshape(b, h, w, nh * d) + v_local
    if self.stride is not None:
      out = resize.resize_bilinear(out, (h * self.stride, w * self.stride), impl=self.resize_impl)
    return ConvBN(self.dim, names=('1', '2'), dtype=self.dtype, frozen_bn=self.frozen_bn, name='proj')(gelu(out), train)


class StridedDepthwise(nn.Module):
  """3x3 stride-2 depthwise conv, child '0' of an `nn.Sequential` upstream."""

  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    return conv(c, 3, stride=2, padding=1, groups=c, dtype=self.dtype, depthwise=self.depthwise, name='0')(x)


class LGQuery(nn.Module):
  """Query of the downsampling attention: strided depthwise conv + 2x subsampling."""

  out_dim: int
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    local = StridedDepthwise(dtype=self.dtype, depthwise=self.depthwise, name='local')(x)
    q = local + x[:, ::2, ::2, :]  # AvgPool2d(kernel 1, stride 2) is plain subsampling
    return ConvBN(self.out_dim, dtype=self.dtype, frozen_bn=self.frozen_bn, name='proj')(q, train)


class Attention4DDownsample(nn.Module):
  """Attention whose queries live on the 2x-subsampled grid (stage 3 -> 4)."""

  dim: int
  out_dim: int
  resolution: int
  key_dim: int = 16
  num_heads: int = 8
  attn_ratio: int = 4
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    nh, kd, d = self.num_heads, self.key_dim, self.attn_ratio * self.key_dim
    b, h, w, _ = x.shape
    q = LGQuery(nh * kd, dtype=self.dtype, frozen_bn=self.frozen_bn, depthwise=self.depthwise, name='q')(x, train)
    hq, wq = q.shape[1], q.shape[2]
    q = q.reshape(b, hq * wq, nh, kd)
    k = ConvBN(nh * kd, dtype=self.dtype, frozen_bn=self.frozen_bn, name='k')(x, train).reshape(b, h * w, nh, kd)
    v_map = ConvBN(nh * d, dtype=self.dtype, frozen_bn=self.frozen_bn, name='v')(x, train)
    v_local = ConvBN(
      nh * d,
      3,
      stride=2,
      padding=1,
      groups=nh * d,
      dtype=self.dtype,
      frozen_bn=self.frozen_bn,
      depthwise=self.depthwise,
      name='v_local',
    )(v_map, train)
    v = v_map.reshape(b, h * w, nh, d)

    attn = jnp.einsum('bnhc,bmhc->bhnm', q, k) * (kd**-0.5)
    attn = add_to_every_sample(
      attn, _attention_bias(self, nh, self.resolution, True, hq * wq, h * w, self.resize_impl).astype(attn.dtype)
    )
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhnm,bmhc->bnhc', attn, v).reshape(b, hq, wq, nh * d) + v_local
    return ConvBN(self.out_dim, names=('1', '2'), dtype=self.dtype, frozen_bn=self.frozen_bn, name='proj')(
      gelu(out), train
    )


class Mlp(nn.Module):
  """1x1 conv, BN, GELU, 3x3 depthwise conv, BN, GELU, 1x1 conv, BN."""

  dim: int
  hidden: int
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.hidden, 1, dtype=self.dtype, kernel_init=trunc_normal_02, name='fc1')(x)
    x = gelu(BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='norm1')(x, train))
    x = conv(self.hidden, 3, padding=1, groups=self.hidden, dtype=self.dtype, depthwise=self.depthwise, name='mid')(x)
    x = gelu(BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='mid_norm')(x, train))
    x = conv(self.dim, 1, dtype=self.dtype, kernel_init=trunc_normal_02, name='fc2')(x)
    return BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='norm2')(x, train)


class Block(nn.Module):
  """FFN block, or attention + FFN block when `attention` (AttnFFN upstream)."""

  dim: int
  mlp_ratio: float
  attention: bool = False
  resolution: int = 7
  stride: int | None = None
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    drop = DropPath(self.drop_path)
    init = nn.initializers.constant(LAYER_SCALE_INIT)
    if self.attention:
      ls1 = self.param('layer_scale_1', init, (self.dim,), jnp.float32)
      y = Attention4D(
        self.dim,
        self.resolution,
        self.stride,
        dtype=self.dtype,
        frozen_bn=self.frozen_bn,
        depthwise=self.depthwise,
        resize_impl=self.resize_impl,
        name='token_mixer',
      )(x, train)
      x = x + drop(ls1.astype(y.dtype) * y, train)
    ls2 = self.param('layer_scale_2', init, (self.dim,), jnp.float32)
    y = Mlp(
      self.dim,
      int(self.dim * self.mlp_ratio),
      dtype=self.dtype,
      frozen_bn=self.frozen_bn,
      depthwise=self.depthwise,
      name='mlp',
    )(x, train)
    return x + drop(ls2.astype(y.dtype) * y, train)


class Embedding(nn.Module):
  """Downsampling between stages: 3x3 stride-2 conv + BN, plus (before the last
  stage) a downsampling-attention branch."""

  out_dim: int
  attention: bool = False
  resolution: int = 7
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    if not self.attention:
      x = conv(self.out_dim, 3, stride=2, padding=1, dtype=self.dtype, name='proj')(x)
      return BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='norm')(x, train)
    y = conv(self.out_dim, 3, stride=2, padding=1, dtype=self.dtype, name='conv')(x)
    y = BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='bn')(y, train)
    return (
      Attention4DDownsample(
        x.shape[-1],
        self.out_dim,
        self.resolution,
        dtype=self.dtype,
        frozen_bn=self.frozen_bn,
        depthwise=self.depthwise,
        resize_impl=self.resize_impl,
        name='attn',
      )(x, train)
      + y
    )


class Stage(nn.Module):
  """The blocks of one stage (an `nn.Sequential` upstream: children '0', '1', ...)."""

  dim: int
  mlp_ratios: Sequence[float]
  num_attention: int
  resolution: int
  stride: int | None
  drop_paths: Sequence[float]
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    depth = len(self.mlp_ratios)
    for j, ratio in enumerate(self.mlp_ratios):
      x = Block(
        self.dim,
        ratio,
        attention=j >= depth - self.num_attention,
        resolution=self.resolution,
        stride=self.stride,
        drop_path=self.drop_paths[j],
        dtype=self.dtype,
        frozen_bn=self.frozen_bn,
        depthwise=self.depthwise,
        resize_impl=self.resize_impl,
        name=str(j),
      )(x, train)
    return x


class PatchEmbed(nn.Module):
  """Stem: two 3x3 stride-2 conv + BN + GELU (children '0', '1', '3', '4')."""

  dim: int
  dtype: Dtype = jnp.float32
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.dim // 2, 3, stride=2, padding=1, dtype=self.dtype, name='0')(x)
    x = gelu(BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='1')(x, train))
    x = conv(self.dim, 3, stride=2, padding=1, dtype=self.dtype, name='3')(x)
    return gelu(BatchNorm(dtype=self.dtype, frozen=self.frozen_bn, name='4')(x, train))


def drop_path_rates(depths: Sequence[int], rate: float) -> list[tuple[float, ...]]:
  """Stochastic depth grows linearly over all blocks, 0 for the first to `rate` for the last."""
  total = sum(depths)
  return [tuple(rate * (sum(depths[:i]) + j) / max(total - 1, 1) for j in range(d)) for i, d in enumerate(depths)]


class EfficientFormerV2(nn.Module):
  """Returns the four stage outputs (strides 4, 8, 16, 32), NHWC.

  `resolution` is the crop size the attention-bias tables are laid out for (512
  upstream); other input sizes resize the biases. Module `network_<k>` is
  PyTorch's `network[k]`: stages at even k, downsampling embeddings at odd k.
  """

  widths: Sequence[int]
  depths: Sequence[int]
  mlp_ratios: Sequence[Sequence[float]]
  vit_num: int
  drop_path_rate: float = 0.0
  resolution: int = 512
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize
  frozen_bn: bool = False  # BNs as upstream's backbone trains them (layers.BatchNorm.frozen)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = PatchEmbed(self.widths[0], dtype=self.dtype, frozen_bn=self.frozen_bn, name='patch_embed')(x, train)

    outs = []
    rates = drop_path_rates(self.depths, self.drop_path_rate)
    for i, dim in enumerate(self.widths):
      res = math.ceil(self.resolution / 2 ** (i + 2))
      x = Stage(
        dim,
        tuple(self.mlp_ratios[i]),
        self.vit_num if i >= 2 else 0,
        res,
        2 if i == 2 else None,
        rates[i],
        dtype=self.dtype,
        frozen_bn=self.frozen_bn,
        depthwise=self.depthwise,
        resize_impl=self.resize_impl,
        name=f'network_{2 * i}',
      )(x, train)
      outs.append(x)
      if i + 1 < len(self.widths):
        x = Embedding(
          self.widths[i + 1],
          attention=i >= 2,
          resolution=res,
          dtype=self.dtype,
          frozen_bn=self.frozen_bn,
          depthwise=self.depthwise,
          resize_impl=self.resize_impl,
          name=f'network_{2 * i + 1}',
        )(x, train)
    return outs


def build_backbone(
  name: str,
  drop_path_rate: float = 0.0,
  resolution: int = 512,
  dtype: Dtype = jnp.float32,
  depthwise: str = 'auto',
  frozen_bn: bool = False,
  resize_impl: str = 'auto',
) -> EfficientFormerV2:
  """The EfficientFormerV2 of size `name`; `frozen_bn`: its BNs normalise with
  their running statistics in training too and never update them (upstream's
  `train()` rule, layers.BatchNorm.frozen)."""
  cfg = BACKBONES[name]
  return EfficientFormerV2(
    cfg['widths'],
    cfg['depths'],
    cfg['mlp_ratios'],
    cfg['vit_num'],
    drop_path_rate=drop_path_rate,
    resolution=resolution,
    dtype=dtype,
    depthwise=depthwise,
    frozen_bn=frozen_bn,
    resize_impl=resize_impl,
  )


# ----------------------------------------------------------- PyTorch key layout
# The upstream module's state dict next to ours (used by the CGRSeg family's
# KeyLayout in cgrseg.py and by ImageNet-backbone loading).

LIST_MODULES = ('network',)
# Buffers with no Flax variable: BN counters, the offset index tables (checked,
# recomputed here) and the unused ImageNet-size bias tables.
BUFFER_SUFFIXES = ('num_batches_tracked', 'attention_biases', 'attention_bias_idxs', 'attention_bias_idxs_seg')
# Keys of an ImageNet checkpoint that belong to its classifier.
IMAGENET_HEAD_RE = re.compile(r'^(norm|head|dist_head)\.')


def torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """PyTorch keeps layer scales as (C, 1, 1); None where nothing differs."""
  if re.search(r'layer_scale_\d$', key):
    return tuple(flax_shape) + (1, 1)
  return None


def check_buffer(key: str, table: np.ndarray):
  """An `attention_bias_idxs_seg` table must be the one this model computes."""
  if not key.endswith('attention_bias_idxs_seg'):
    return
  n_query, n_key = table.shape
  resolution = math.isqrt(n_key)
  ours, _ = attention_bias_index(resolution, downsample=n_query != n_key)
  if ours.shape != table.shape or not np.array_equal(ours, table):
    raise errors.ConversionError(
      f'{key}: attention bias index table {table.shape} differs from the one this model '
      f'computes for resolution {resolution}'
    )


def extra_buffers(key: str, collection: str, path: tuple[str, ...], leaf) -> dict:
  """Buffers the upstream attention keeps next to `attention_biases_seg`."""
  del collection
  if path[-1] != 'attention_biases_seg':
    return {}
  base = key[: -len('attention_biases_seg')]
  heads, n_offsets = leaf.shape
  downsample = '.attn.' in key
  table, _ = attention_bias_index(math.isqrt(n_offsets), downsample)
  # ImageNet-size leftovers kept by the upstream module (7x7 queries, 7x7 or 14x14 keys).
  n_key = 196 if downsample else 49
  return {
    base + 'attention_biases': np.zeros((heads, n_key), np.float32),
    base + 'attention_bias_idxs': np.ones((49, n_key), np.int64),
    base + 'attention_bias_idxs_seg': table.astype(np.int64),
  }


def detect_size(state) -> str:
  """EfficientFormerV2 size ('s0', 's1', 's2', 'l') of a backbone state dict (no prefix)."""
  depths = tuple(len({k.split('.')[2] for k in state if k.startswith(f'network.{2 * i}.')}) for i in range(4))
  key = 'network.{}.0.mlp.fc2.weight'
  missing = [key.format(2 * i) for i in range(4) if key.format(2 * i) not in state]
  if missing:
    raise errors.ConversionError(f'not an EfficientFormerV2 state dict: key {missing[0]!r} is missing')
  widths = tuple(int(state[key.format(2 * i)].shape[0]) for i in range(4))
  for name, cfg in BACKBONES.items():
    if tuple(cfg['widths']) == widths and tuple(cfg['depths']) == depths:
      return name
  raise errors.ConversionError(f'unknown EfficientFormerV2 size: widths {widths}, depths {depths}')
