"""CSFCN and CSFCN-Tiny (Li et al., "Context and Spatial Feature Calibration for
Real-Time Semantic Segmentation"), NHWC, and their PyTorch key conversion.

backbone (deep-stem ResNet-18) -> layer4 -> `cfc` (context) -> `sfc` with layer2
(spatial, stride 8) -> `conv_out32` head: CSFCN predicts 64 K channels and
PixelShuffle(8)s them; Tiny predicts K channels and resizes x8 bilinearly with
align_corners=True. Logits come out at 8x the stride-8 size, which is the input
size for inputs that are multiples of 8; otherwise (upstream returns the larger
map) they are cropped to the input size, which keeps pixel (i, j) where it is.

Conversion is the generic walk (`models/key_layout.py`, through `cgrseg_jax/convert.py`
and `cgrseg_jax/loader.py`) with `KEY_LAYOUT`: Flax `<list>_<i>` <-> PyTorch
`<list>.<i>`, 4-D kernels HWIO <-> OIHW, the context block's Conv1d kernels
(O, I) <-> (O, I, 1).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from cgrseg_jax import errors
from cgrseg_jax.models import key_layout, registry, resize
from cgrseg_jax.models.cfc import ContextBlock, conv_bn_relu
from cgrseg_jax.models.layers import conv
from cgrseg_jax.models.resnet import DEPTHS, ResNet
from cgrseg_jax.models.sfc import SpatialBlock, resize_bilinear_align_corners

Dtype = Any

# The two upstream models differ only in these fields.
VARIANTS = {
  'csfcn': dict(backbone='resnet18', sfc_proj_channels=32, local_channels=64, head='pixel_shuffle'),
  'csfcn_tiny': dict(backbone='resnet18', sfc_proj_channels=None, local_channels=32, head='bilinear'),
}
UPSAMPLE = 8  # the head works at stride 8


def pixel_shuffle(x, r: int):
  """`nn.PixelShuffle(r)` on NHWC: input channel c*r*r + i*r + j -> output
  channel c at (r*h + i, r*w + j). (Not depth_to_space, which puts c last.)"""
  n, h, w, crr = x.shape
  c = crr // (r * r)
  x = x.reshape(n, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, c)


class OutputHead(nn.Module):
  """Upstream `BiSeNetOutput`: ConvBNReLU3x3, conv1x1 (bias), then x`up` to the input size.
  CSFCN predicts K r^2 channels and PixelShuffles them; Tiny predicts K channels and
  resizes bilinearly with align_corners=True."""

  num_classes: int
  upsample: str  # 'pixel_shuffle' | 'bilinear'
  channels: int = 128
  up: int = UPSAMPLE
  dtype: Dtype = jnp.float32
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv_bn_relu(self.channels, 3, self.dtype, 'conv')(x, train)
    if self.upsample == 'pixel_shuffle':
      x = conv(self.num_classes * self.up * self.up, 1, dtype=self.dtype, name='conv_out')(x)
      return pixel_shuffle(x, self.up)
    x = conv(self.num_classes, 1, dtype=self.dtype, name='conv_out')(x)
    return resize_bilinear_align_corners(x, (x.shape[1] * self.up, x.shape[2] * self.up), self.resize_impl)


class CSFCN(nn.Module):
  num_classes: int = 19
  backbone: str = 'resnet18'
  sfc_proj_channels: Optional[int] = 32
  local_channels: int = 64
  head: str = 'pixel_shuffle'
  dtype: Dtype = jnp.float32
  resize_impl: str = 'auto'  # resampling implementation, see resize.resolve_resize

  def setup(self):
    d = self.dtype
    self.resnet = ResNet(DEPTHS[self.backbone], dtype=d)
    self.cfc = ContextBlock(local_channels=self.local_channels, dtype=d)
    self.sfc = SpatialBlock(proj_channels=self.sfc_proj_channels, dtype=d, resize_impl=self.resize_impl)
    if self.head not in ('pixel_shuffle', 'bilinear'):
      raise ValueError(f"CSFCN head={self.head!r}; expected 'pixel_shuffle' or 'bilinear'")
    self.conv_out32 = OutputHead(self.num_classes, self.head, dtype=d, resize_impl=self.resize_impl)

  def extract_features(self, x, train: bool = False):
    """The backbone's layer2 / layer3 / layer4 maps (strides 8, 16, 32)."""
    return self.resnet(jnp.asarray(x, self.dtype), train)[1:]

  def stages(self, x, train: bool = False) -> dict:
    """Every intermediate the upstream fixture stores (NHWC): feat8/16/32, cfc,
    sfc_offsets, sfc, logits."""
    feat8, feat16, feat32 = self.extract_features(x, train)
    ctx = self.cfc(feat32, train)
    f, offsets = self.sfc(feat8, ctx, train, return_offsets=True)
    logits = self.conv_out32(f, train)[:, : x.shape[1], : x.shape[2]].astype(jnp.float32)
    return dict(feat8=feat8, feat16=feat16, feat32=feat32, cfc=ctx, sfc_offsets=offsets, sfc=f, logits=logits)

  def __call__(self, x, train: bool = False):
    """(N, H, W, 3) normalised images -> (N, H, W, K) float32 logits."""
    feat8, _, feat32 = self.extract_features(x, train)
    f = self.sfc(feat8, self.cfc(feat32, train), train)
    return self.conv_out32(f, train)[:, : x.shape[1], : x.shape[2]].astype(jnp.float32)


def build(name: str, num_classes: int, dtype: Dtype = jnp.float32, resize_impl: str = 'auto', **overrides) -> CSFCN:
  """`csfcn` or `csfcn_tiny` with `num_classes` outputs; `dtype` is the compute
  dtype (parameters and BN statistics stay float32); `resize_impl` the resampling
  form (`resize.resolve_resize`); `overrides` replace fields of the `VARIANTS` entry."""
  if name not in VARIANTS:
    raise errors.ConfigError(f'unknown CSFCN model {name!r}; expected one of {sorted(VARIANTS)}')
  cfg = dict(VARIANTS[name])
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise errors.ConfigError(f'{name}: unknown override(s) {sorted(unknown)}; expected some of {sorted(cfg)}')
  cfg.update(overrides)
  return CSFCN(num_classes=num_classes, dtype=dtype, resize_impl=resize.resolve_resize(resize_impl), **cfg)


# --------------------------------------------------------------------------- conversion


def _torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The context block's Conv1d kernels are (O, I) here, (O, I, 1) in PyTorch."""
  if key.endswith(CONV1D_WEIGHTS):
    return tuple(flax_shape) + (1,)
  return key_layout.default_torch_shape(key, flax_shape)


CONV1D_WEIGHTS = ('key_conv.weight', 'value_conv.weight')  # suffixes: the block alone or in the model

# Flax `<name>_<i>` is element i of the PyTorch nn.Sequential `<name>`; the rest
# (leaf names, HWIO <-> OIHW, num_batches_tracked) is the registry's default.
KEY_LAYOUT = key_layout.KeyLayout(
  list_modules=('conv1', 'layer1', 'layer2', 'layer3', 'layer4'), torch_shape=_torch_shape
)
BACKBONE_PREFIX = 'resnet.'  # the ImageNet checkpoint's keys live under this prefix in the model
IMAGENET_HEAD = 'fc.'


def detect(state: Mapping[str, Any]) -> tuple[str, int]:
  """(name, num_classes) of an upstream CSFCN / CSFCN-Tiny state dict, from its keys and shapes."""
  key = 'conv_out32.conv_out.weight'
  if key not in state:
    raise errors.ConversionError(f'not a CSFCN checkpoint: key {key!r} is missing')
  out_ch = int(state[key].shape[0])
  if 'sfc.cp1x1.weight' in state:
    if out_ch % (UPSAMPLE * UPSAMPLE):
      raise errors.ConversionError(f'{key} has {out_ch} output channels, not a multiple of {UPSAMPLE**2}')
    return 'csfcn', out_ch // (UPSAMPLE * UPSAMPLE)
  return 'csfcn_tiny', out_ch


def detect_backbone(state: Mapping[str, Any]) -> list[str]:
  """Model names an ImageNet deep-stem ResNet-18 (`resnet18-deep-inplane128.pth`) fits."""
  need = ('conv1.0.weight', 'conv1.6.weight', 'bn1.weight', 'layer4.1.conv2.weight')
  missing = [k for k in need if k not in state]
  if missing:
    raise errors.ConversionError(f'not a deep-stem ResNet checkpoint: key {missing[0]!r} is missing')
  if tuple(state['conv1.6.weight'].shape) != (128, 64, 3, 3) or any(k.startswith('layer4.2.') for k in state):
    raise errors.ConversionError(
      f'not the deep-stem ResNet-18 of CSFCN: conv1.6.weight {tuple(state["conv1.6.weight"].shape)} '
      '(expected (128, 64, 3, 3)) or more than 2 blocks in layer4'
    )
  return list(VARIANTS)


def load_backbone(state: Mapping[str, Any], template: Mapping[str, Any]):
  """Fill the `resnet` part of `template` from the ImageNet checkpoint (conv1.0/.1/.3/.4/.6,
  bn1, layerN.M.*; the classifier fc.* reported as skipped) -> (variables, LoadReport)."""
  part = {c: {'resnet': t['resnet']} for c, t in template.items()}
  return key_layout.fill_from_state_dict(
    state,
    part,
    KEY_LAYOUT,
    strict=True,
    prefix=BACKBONE_PREFIX,
    skip_unused=lambda k: 'ImageNet classifier' if k.startswith(IMAGENET_HEAD) else None,
  )


# Parameters upstream never hands to its optimizer: its `set_optimizer` keeps only
# 1-D, 2-D and 4-D tensors, so the context block's 3-D Conv1d weights stay at
# their init. `optim.build_sgd(..., frozen=UPSTREAM_FROZEN)` reproduces that.
UPSTREAM_FROZEN = (('cfc', 'key_conv', 'kernel'), ('cfc', 'value_conv', 'kernel'))


def _torch_reference(name: str, num_classes: int):
  from cgrseg_jax.torch_reference import csfcn as reference  # needs PyTorch (the `torch` extra)

  return reference.build_torch_csfcn(name, num_classes)


def _build(num_classes: int, dtype: Dtype = jnp.float32, variant: str = 'csfcn', platform=None, **overrides) -> CSFCN:
  # the resampling form follows the target (resize.resolve_resize); the rest is the same on every backend
  return build(variant, num_classes, dtype=dtype, resize_impl=resize.resolve_resize('auto', platform), **overrides)


FAMILY = registry.register(
  registry.ModelFamily(
    name='csfcn',
    variants={n: {'variant': n} for n in VARIANTS},
    build=_build,
    key_layout=KEY_LAYOUT,
    detect=detect,
    loss_method='__call__',  # logits at the input size
    loss_stride=1,
    detect_backbone=detect_backbone,
    load_backbone=load_backbone,
    # SGD + warmup-poly (optim.OPTIMIZERS['sgd']) and OHEM (losses.LOSSES['ohem']); the
    # numbers (lr, momentum, OHEM thresh / min_kept, ...) are config fields (configs/*csfcn*.py).
    recipe={'optimizer.name': 'sgd', 'loss': 'ohem'},
    torch_reference=_torch_reference,
    upstream_frozen=UPSTREAM_FROZEN,
  )
)
