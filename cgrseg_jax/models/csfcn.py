"""CSFCN and CSFCN-Tiny (Li et al., "Context and Spatial Feature Calibration for
Real-Time Semantic Segmentation"), NHWC, and their PyTorch key conversion.

backbone (deep-stem ResNet-18) -> layer4 -> `cfc` (context) -> `sfc` with layer2
(spatial, stride 8) -> `conv_out32` head: CSFCN predicts 64 K channels and
PixelShuffle(8)s them; Tiny predicts K channels and resizes x8 bilinearly with
align_corners=True. Logits come out at 8x the stride-8 size, which is the input
size for inputs that are multiples of 8; otherwise (upstream returns the larger
map) they are cropped to the input size, which keeps pixel (i, j) where it is.

Conversion (`state_dict_to_variables` / `variables_to_state_dict`) is the rule
table `CONVERSION`: Flax module `<list>_<i>` <-> PyTorch `<list>.<i>` for the
names in `list_modules`; leaves renamed by `leaf_names`; 4-D kernels HWIO <->
OIHW; 2-D kernels (the context block's `Conv1d`s as dense layers) (I, O) <-> (O, I, 1).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors
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


class PixelShuffleHead(nn.Module):
  """Upstream `BiSeNetOutput` of CSFCN: ConvBNReLU3x3, conv1x1 -> K r^2 (bias), PixelShuffle(r)."""

  num_classes: int
  channels: int = 128
  up: int = UPSAMPLE
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv_bn_relu(self.channels, 3, self.dtype, 'conv')(x, train)
    x = conv(self.num_classes * self.up * self.up, 1, dtype=self.dtype, name='conv_out')(x)
    return pixel_shuffle(x, self.up)


class BilinearHead(nn.Module):
  """The Tiny head: ConvBNReLU3x3, conv1x1 -> K (bias), bilinear x r, align_corners=True."""

  num_classes: int
  channels: int = 128
  up: int = UPSAMPLE
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv_bn_relu(self.channels, 3, self.dtype, 'conv')(x, train)
    x = conv(self.num_classes, 1, dtype=self.dtype, name='conv_out')(x)
    return resize_bilinear_align_corners(x, (x.shape[1] * self.up, x.shape[2] * self.up))


class CSFCN(nn.Module):
  num_classes: int = 19
  backbone: str = 'resnet18'
  sfc_proj_channels: Optional[int] = 32
  local_channels: int = 64
  head: str = 'pixel_shuffle'
  dtype: Dtype = jnp.float32

  def setup(self):
    d = self.dtype
    self.resnet = ResNet(DEPTHS[self.backbone], dtype=d)
    self.cfc = ContextBlock(local_channels=self.local_channels, dtype=d)
    self.sfc = SpatialBlock(proj_channels=self.sfc_proj_channels, dtype=d)
    head = {'pixel_shuffle': PixelShuffleHead, 'bilinear': BilinearHead}[self.head]
    self.conv_out32 = head(self.num_classes, dtype=d)

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


def build(name: str, num_classes: int, dtype: Dtype = jnp.float32, **overrides) -> CSFCN:
  """`csfcn` or `csfcn_tiny` with `num_classes` outputs; `dtype` is the compute
  dtype (parameters and BN statistics stay float32); `overrides` replace fields
  of the `VARIANTS` entry."""
  if name not in VARIANTS:
    raise errors.ConfigError(f'unknown CSFCN model {name!r}; expected one of {sorted(VARIANTS)}')
  cfg = dict(VARIANTS[name])
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise errors.ConfigError(f'{name}: unknown override(s) {sorted(unknown)}; expected some of {sorted(cfg)}')
  cfg.update(overrides)
  return CSFCN(num_classes=num_classes, dtype=dtype, **cfg)


def variable_shapes(name: str, num_classes: int) -> dict:
  """Shapes/dtypes of a model's variables, without computing anything."""
  model = build(name, num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))


# --------------------------------------------------------------------------- conversion

CONVERSION = dict(
  # Flax `<name>_<i>` is element i of the PyTorch nn.Sequential `<name>`.
  list_modules=('conv1', 'layer1', 'layer2', 'layer3', 'layer4'),
  leaf_names={
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
  },
  # state-dict buffers with no Flax variable: skipped on load, written (as 0) on export
  buffers=('num_batches_tracked',),
  # the ImageNet backbone checkpoint's keys live under this prefix in the model
  backbone_prefix='resnet.',
  imagenet_head=('fc.',),
)
_LIST_RE = re.compile(r'^(%s)_(\d+)$' % '|'.join(CONVERSION['list_modules']))


def flax_path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
  """('params', ('resnet', 'layer1_0', 'downsample', '0', 'kernel')) -> 'resnet.layer1.0.downsample.0.weight'."""
  parts = []
  for p in path[:-1]:
    m = _LIST_RE.match(p)
    parts.extend([m.group(1), m.group(2)] if m else [p])
  parts.append(CONVERSION['leaf_names'].get((collection, path[-1]), path[-1]))
  return '.'.join(parts)


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """PyTorch shape of a variable: HWIO -> OIHW; a 2-D (Conv1d-as-dense) kernel (I, O) -> (O, I, 1)."""
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0], 1)
  return tuple(flax_shape)


def to_flax(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 3:
    return value[..., 0].T
  return value


def to_torch(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T[..., None]
  return value


def _flatten(variables: Mapping[str, Any]) -> dict:
  out = {}
  for collection in ('params', 'batch_stats'):
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      out[(collection, tuple(k.key for k in keypath))] = leaf
  return out


def _unflatten(flat: Mapping) -> dict:
  out: dict = {}
  for (collection, path), leaf in flat.items():
    node = out.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = leaf
  return out


def _numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    return v.numpy()
  return np.asarray(v)


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


def fill(state: Mapping[str, Any], template: Mapping[str, Any], strict: bool = True, prefix: str = ''):
  """Fill a variables template (shapes) from a state dict -> (variables, report).

  `prefix` is removed from the keys the template produces (the backbone-only
  layout). report = {'used': [...], 'skipped': {key: reason}}. Errors name the key and both shapes."""
  report = {'used': [], 'skipped': {}}
  flat = {}
  for (collection, path), leaf in _flatten(template).items():
    key = flax_path_to_torch_key(collection, path)
    if not key.startswith(prefix):
      continue
    key = key[len(prefix) :]
    want = torch_shape(tuple(leaf.shape))
    if key not in state:
      raise errors.ConversionError(f'checkpoint is missing key {key!r} (expected PyTorch shape {want})')
    value = _numpy(state[key])
    if tuple(value.shape) != want:
      raise errors.ConversionError(
        f'shape mismatch for key {key!r}: checkpoint has {tuple(value.shape)}, model expects {want}'
      )
    flat[(collection, path)] = np.asarray(to_flax(value), np.float32)
    report['used'].append(key)
  used = set(report['used'])
  for key in state:
    if key in used:
      continue
    if key.endswith(CONVERSION['buffers']):
      report['skipped'][key] = 'buffer not used by the model'
    elif not strict and key.startswith(CONVERSION['imagenet_head']):
      report['skipped'][key] = 'ImageNet classifier'
    else:
      raise errors.ConversionError(
        f'unexpected key {key!r} {tuple(state[key].shape)} in checkpoint: the model has no such variable'
      )
  return _unflatten(flat), report


def state_dict_to_variables(
  state: Mapping[str, Any], name: Optional[str] = None, num_classes: Optional[int] = None
) -> tuple[dict, dict]:
  """An upstream `model.state_dict()` (keys resnet.*, cfc.*, sfc.*, conv_out32.*) ->
  (Flax variables as numpy, report). Strict: every variable present with its shape."""
  found, k = detect(state)
  if name is not None and name != found:
    raise errors.ConversionError(f'checkpoint is {found!r} (read from its keys), but {name!r} was requested')
  if num_classes is not None and num_classes != k:
    raise errors.ConversionError(
      f'checkpoint has {k} classes (conv_out32.conv_out.weight {tuple(state["conv_out32.conv_out.weight"].shape)}), '
      f'but num_classes={num_classes} was requested'
    )
  variables, report = fill(state, variable_shapes(found, k))
  report.update(name=found, num_classes=k)
  return variables, report


def backbone_state_dict_to_variables(state: Mapping[str, Any]) -> tuple[dict, dict]:
  """The ImageNet deep-stem ResNet-18 (`resnet18-deep-inplane128.pth`: conv1.0/.1/.3/.4/.6,
  bn1, layerN.M.*; fc.* skipped) -> ({'params': {'resnet': ...}, 'batch_stats': {'resnet': ...}}, report),
  to merge into a freshly initialised model."""
  template = variable_shapes('csfcn_tiny', 1)
  template = {c: {'resnet': t['resnet']} for c, t in template.items()}
  return fill(state, template, strict=False, prefix=CONVERSION['backbone_prefix'])


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables -> an upstream-layout state dict (numpy), `num_batches_tracked`
  written as 0, loadable strictly by the upstream model."""
  state = {}
  for (collection, path), leaf in _flatten(variables).items():
    key = flax_path_to_torch_key(collection, path)
    state[key] = np.ascontiguousarray(to_torch(np.asarray(leaf, np.float32)))
    if collection == 'batch_stats' and path[-1] == 'var':
      state[key[: -len('running_var')] + 'num_batches_tracked'] = np.array(0, np.int64)
  return state


# Parameters upstream never hands to its optimizer: its `set_optimizer` keeps only
# 1-D, 2-D and 4-D tensors, so the context block's 3-D Conv1d weights stay at
# their init. `optim.build_sgd(..., frozen=UPSTREAM_FROZEN)` reproduces that.
UPSTREAM_FROZEN = (('cfc', 'key_conv', 'kernel'), ('cfc', 'value_conv', 'kernel'))

# What a model registry needs from this family, as plain data and functions.
FAMILY = dict(
  names=tuple(VARIANTS),
  build=build,  # (name, num_classes, dtype=..., **overrides) -> module
  variable_shapes=variable_shapes,  # (name, num_classes) -> shapes of params / batch_stats
  detect=detect,  # state dict -> (name, num_classes)
  state_dict_to_variables=state_dict_to_variables,  # (state, name=None, num_classes=None) -> (variables, report)
  variables_to_state_dict=variables_to_state_dict,  # variables -> upstream state dict (numpy)
  backbone_state_dict_to_variables=backbone_state_dict_to_variables,  # ImageNet ResNet -> (variables, report)
  conversion=CONVERSION,
  upstream_frozen=UPSTREAM_FROZEN,
)
