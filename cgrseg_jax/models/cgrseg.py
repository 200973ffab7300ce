"""CGRSeg: EfficientFormerV2 backbone + context-guided spatial feature
reconstruction head, NHWC. `VARIANTS` is the one table of model sizes."""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgrseg_jax import errors
from cgrseg_jax.models import efficientformer_v2, key_layout, layers, registry, resize
from cgrseg_jax.models.dpg_head import DPGHead, spatial_gather
from cgrseg_jax.models.layers import ConvBN, conv, dropout2d, hard_sigmoid
from cgrseg_jax.models.rcm import RCM

Dtype = Any

# Upstream configs local_configs/cgrseg/cgrseg-{t,b,l}_ade20k_160k.py; 'tiny' is
# ours, for fast tests only (S0 backbone, narrow head).
VARIANTS = {
  't': dict(backbone='s1', drop_path_rate=0.0, channels=128, next_repeat=5, band_kernel=11),
  'b': dict(backbone='s2', drop_path_rate=0.02, channels=256, next_repeat=6, band_kernel=11),
  'l': dict(backbone='l', drop_path_rate=0.1, channels=256, next_repeat=5, band_kernel=9),
  'tiny': dict(backbone='s0', drop_path_rate=0.0, channels=32, next_repeat=1, band_kernel=5),
}
# How the backbone's BatchNorms train (`build_segmentor(backbone_bn=...)`).
BACKBONE_BN = ('frozen', 'batch')


class RCMStack(nn.Module):
  """Stacked RCMs on the pooled pyramid (`trans.transformer_blocks` upstream)."""

  depth: int
  band_kernel: int
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = RCM(self.band_kernel, dtype=self.dtype, depthwise=self.depthwise, name=f'transformer_blocks_{i}')(x, train)
    return x


class FuseBlock(nn.Module):
  """Gate the projected local tokens with hard-sigmoid(projected global part),
  upsampled bilinearly (`FuseBlockMulti` upstream)."""

  channels: int
  dtype: Dtype = jnp.float32
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize

  @nn.compact
  def __call__(self, local, global_, train: bool):
    names = ('conv', 'bn')
    x = ConvBN(self.channels, bias=False, names=names, dtype=self.dtype, name='fuse1')(local, train)
    g = ConvBN(self.channels, bias=False, names=names, dtype=self.dtype, name='fuse2')(global_, train)
    return x * resize.resize_bilinear(hard_sigmoid(g), x.shape[1:3], impl=self.resize_impl)


class CGRSegHead(nn.Module):
  """Decode head on the stride 8/16/32 maps; returns logits at stride 8."""

  in_channels: Sequence[int]
  channels: int
  num_classes: int
  next_repeat: int
  band_kernel: int
  dropout_ratio: float = 0.1
  dtype: Dtype = jnp.float32
  depthwise: str = 'auto'  # depthwise-conv implementation, see layers.resolve_depthwise
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize

  @nn.compact
  def __call__(self, feats, train: bool = False):
    feats = [f.astype(self.dtype) for f in feats]
    # Pyramid pooling to half the coarsest map (rounded up), then global context.
    h, w = feats[-1].shape[1:3]
    size = ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
    pooled = jnp.concatenate([resize.adaptive_avg_pool(f, size) for f in feats], axis=-1)
    pooled = RCMStack(self.next_repeat, self.band_kernel, dtype=self.dtype, depthwise=self.depthwise, name='trans')(
      pooled, train
    )
    splits = [sum(self.in_channels[: i + 1]) for i in range(len(self.in_channels) - 1)]
    global_parts = jnp.split(pooled, splits, axis=-1)

    # Coarse to fine: refine local tokens with an RCM and fuse with the global part.
    x = None
    for i in reversed(range(len(self.in_channels))):
      local = feats[i]
      if x is not None:
        up = resize.resize_bilinear(x, local.shape[1:3], impl=self.resize_impl)
        local = local + conv(self.in_channels[i], 1, dtype=self.dtype, name=f'conv_{i}')(up)
      local = RCM(self.band_kernel, dtype=self.dtype, depthwise=self.depthwise, name=f'meta_{i}')(local, train)
      x = FuseBlock(self.channels, dtype=self.dtype, resize_impl=self.resize_impl, name=f'SIM_{i}')(
        local, global_parts[i], train
      )

    dropout = dropout2d(self.dropout_ratio)
    conv_seg = conv(self.num_classes, 1, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01), name='conv_seg')

    def classify(y):  # mmseg's cls_seg: the same dropout and classifier both times
      return conv_seg(dropout(y, deterministic=not train))

    fused = ConvBN(
      self.channels,
      groups=self.channels,
      bias=False,
      act=jax.nn.relu,
      names=('conv', 'bn'),
      dtype=self.dtype,
      depthwise=self.depthwise,
      name='linear_fuse',
    )(x, train)
    first = classify(fused)
    context = spatial_gather(x, first)
    refined = DPGHead(self.channels, dtype=self.dtype, name='lgc')(x, context) + x
    return classify(refined)


class CGRSegModel(nn.Module):
  """The segmentor: `__call__` gives logits (N, H, W, K) at the input size."""

  backbone: nn.Module
  decode_head: nn.Module
  dtype: Dtype = jnp.float32
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize

  def extract_features(self, x, train: bool = False):
    """The four backbone maps (strides 4, 8, 16, 32)."""
    return self.backbone(jnp.asarray(x, self.dtype), train)

  def decode(self, x, train: bool = False):
    """Head logits at stride 8, float32."""
    feats = self.extract_features(x, train)
    return self.decode_head(feats[1:], train).astype(jnp.float32)

  def __call__(self, x, train: bool = False):
    return resize.resize_bilinear(self.decode(x, train), x.shape[1:3], impl=self.resize_impl)


def build_segmentor(
  variant: str = 't',
  num_classes: int = 150,
  dtype: Dtype = jnp.float32,
  drop_path_rate: float | None = None,
  dropout_ratio: float = 0.1,
  resolution: int = 512,
  depthwise: str = 'auto',
  backbone_bn: str = 'frozen',
  platform: str | None = None,
) -> CGRSegModel:
  """CGRSeg of a `VARIANTS` size. `dtype` is the compute dtype (parameters stay
  float32); `drop_path_rate` overrides the variant's backbone stochastic depth;
  `dropout_ratio` is the Dropout2d rate before the classifier; `resolution` the
  crop size the attention-bias tables are laid out for (512 upstream);
  `depthwise` the depthwise-conv implementation ('auto' | 'shifts' | 'xla',
  see `layers.resolve_depthwise`; the numbers agree to float rounding), 'auto'
  resolved for `platform` (the target's, e.g. 'tpu'; None: this process's devices),
  as is the resampling form (`resize.resolve_resize`);
  `backbone_bn` how the backbone's BatchNorms train: 'frozen' (upstream: its
  EfficientFormer keeps them in eval mode, so they normalise with their running
  statistics, which never change, while their scale and bias learn) or 'batch'
  (batch statistics, SyncBN, like the head's BNs)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown CGRSeg variant {variant!r}; expected one of {sorted(VARIANTS)}')
  if backbone_bn not in BACKBONE_BN:
    raise errors.ConfigError(f'backbone_bn={backbone_bn!r} (config.model.backbone_bn); expected one of {BACKBONE_BN}')
  cfg = VARIANTS[variant]
  rate = cfg['drop_path_rate'] if drop_path_rate is None else drop_path_rate
  # 'auto' becomes the target's choice here (a bad name fails here, not at the first trace)
  depthwise = layers.resolve_depthwise(depthwise, platform)
  resize_impl = resize.resolve_resize('auto', platform)
  backbone = efficientformer_v2.build_backbone(
    cfg['backbone'], rate, resolution, dtype, depthwise, frozen_bn=backbone_bn == 'frozen', resize_impl=resize_impl
  )
  head = CGRSegHead(
    tuple(backbone.widths[1:]),
    cfg['channels'],
    num_classes,
    cfg['next_repeat'],
    cfg['band_kernel'],
    dropout_ratio=dropout_ratio,
    dtype=dtype,
    depthwise=depthwise,
    resize_impl=resize_impl,
  )
  return CGRSegModel(backbone, head, dtype=dtype, resize_impl=resize_impl)


# --------------------------------------------------------------- the family
# What the rest of the package knows about CGRSeg (models/registry.py).


def _torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  backbone = efficientformer_v2.torch_shape(key, flax_shape)
  if backbone is not None:
    return backbone
  if re.search(r'channel_mul_conv\.1\.(weight|bias)$', key):  # LayerNorm([C, 1, 1]) in the DPG head
    return tuple(flax_shape) + (1, 1)
  return key_layout.default_torch_shape(key, flax_shape)


KEY_LAYOUT = key_layout.KeyLayout(
  list_modules=efficientformer_v2.LIST_MODULES + ('transformer_blocks', 'SIM', 'meta', 'conv'),
  torch_shape=_torch_shape,
  skip_suffixes=efficientformer_v2.BUFFER_SUFFIXES,
  check_buffer=efficientformer_v2.check_buffer,
  extra_buffers=efficientformer_v2.extra_buffers,
)


def _backbone_state(state):
  if any(k.startswith('backbone.') for k in state):
    return {k[len('backbone.') :]: v for k, v in state.items() if k.startswith('backbone.')}
  return dict(state)


def detect(state) -> tuple[str, int]:
  """(model name, num_classes) of an mmseg CGRSeg state dict, read off its shapes."""
  needed = ('decode_head.conv_seg.weight', 'decode_head.meta.0.token_mixer.excite.0.weight')
  missing = [k for k in needed if k not in state]
  if missing:
    raise errors.ConversionError(f'not a CGRSeg checkpoint: key {missing[0]!r} is missing')
  backbone = efficientformer_v2.detect_size(_backbone_state(state))
  num_classes, channels = state['decode_head.conv_seg.weight'].shape[:2]
  band = state['decode_head.meta.0.token_mixer.excite.0.weight'].shape[-1]
  repeat = len({k.split('.')[3] for k in state if k.startswith('decode_head.trans.transformer_blocks.')})
  found = dict(backbone=backbone, channels=channels, next_repeat=repeat, band_kernel=band)
  for name, cfg in VARIANTS.items():
    if all(cfg[k] == v for k, v in found.items()):
      return f'cgrseg_{name}', int(num_classes)
  raise errors.ConversionError(f'checkpoint matches no CGRSeg variant: found {found}; known variants {VARIANTS}')


def detect_backbone(state) -> list[str]:
  """Model names whose backbone an EfficientFormerV2 ImageNet state dict fits."""
  size = efficientformer_v2.detect_size(_backbone_state(state))
  return [f'cgrseg_{v}' for v, cfg in VARIANTS.items() if cfg['backbone'] == size]


def load_backbone(state, template):
  """Fill the `backbone` part of `template` from an ImageNet checkpoint
  (upstream `init_cfg=Pretrained`: non-strict, classifier skipped,
  `attention_biases_seg` absent there and started at zero)."""
  part = {c: {'backbone': t['backbone']} for c, t in template.items()}
  return key_layout.fill_from_state_dict(
    _backbone_state(state),
    part,
    KEY_LAYOUT,
    strict=False,
    prefix='backbone.',
    zero_if_missing=('attention_biases_seg',),
    skip_unused=lambda k: 'ImageNet classifier' if efficientformer_v2.IMAGENET_HEAD_RE.match(k) else None,
  )


def _torch_reference(name: str, num_classes: int):
  from cgrseg_jax.torch_reference import cgrseg as reference  # needs PyTorch (the `torch` extra)

  return reference.build_torch_segmentor(FAMILY.variants[name]['variant'], num_classes)


def _build(num_classes: int, dtype=jnp.float32, **kwargs) -> CGRSegModel:
  return build_segmentor(num_classes=num_classes, dtype=dtype, **kwargs)


FAMILY = registry.register(
  registry.ModelFamily(
    name='cgrseg',
    variants={f'cgrseg_{v}': {'variant': v} for v in VARIANTS},
    build=_build,
    key_layout=KEY_LAYOUT,
    detect=detect,
    loss_method='decode',  # the head's logits at stride 8; the loss resizes them
    loss_stride=8,
    detect_backbone=detect_backbone,
    load_backbone=load_backbone,
    # AdamW with mmcv's custom_keys (optim.OPTIMIZERS['adamw_mmcv']) and mmseg's cross-entropy
    # (losses.LOSSES['cross_entropy']); the numbers are configs/default.py's.
    recipe={'optimizer.name': 'adamw_mmcv', 'loss': 'cross_entropy'},
    torch_reference=_torch_reference,
    build_options=('drop_path_rate', 'depthwise', 'backbone_bn'),
  )
)
