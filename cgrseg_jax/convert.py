"""PyTorch <-> Flax checkpoint conversion for CGRSeg and EfficientFormerV2.

The Flax modules carry the PyTorch module names, so a variable path maps to a
state-dict key mechanically:

  ('decode_head', 'SIM_0', 'fuse1', 'conv', 'kernel')  <->  decode_head.SIM.0.fuse1.conv.weight

- a module `<list>_<i>` is element i of a PyTorch ModuleList/Sequential named
  in `LIST_MODULES`; other names are used as they are;
- leaves are renamed by `LEAF_NAMES` (kernel/scale -> weight, mean/var ->
  running_mean/running_var);
- 4-D conv kernels go HWIO <-> OIHW; other tensors are reshaped where PyTorch
  keeps trailing singleton dims (layer scales (C,1,1), LayerNorm([C,1,1])).

Buffers that are not Flax variables (BN `num_batches_tracked`, the index tables
`attention_bias_idxs_seg`, and the unused ImageNet-size `attention_biases` /
`attention_bias_idxs`) are checked or skipped on load and regenerated on export.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors

from cgrseg_jax.models import BACKBONES, VARIANTS, build_segmentor
from cgrseg_jax.models.efficientformer_v2 import attention_bias_index

LIST_MODULES = ('network', 'transformer_blocks', 'SIM', 'meta', 'conv')
_LIST_RE = re.compile(r'^(%s)_(\d+)$' % '|'.join(LIST_MODULES))
LEAF_NAMES = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
# Buffers with no Flax counterpart. On load they are checked (index tables) or
# skipped; ImageNet classifier keys are skipped when loading a backbone.
_BUFFER_SUFFIXES = ('num_batches_tracked', 'attention_biases', 'attention_bias_idxs', 'attention_bias_idxs_seg')
_IMAGENET_HEAD_RE = re.compile(r'^(norm|head|dist_head)\.')


ConversionError = errors.ConversionError


@dataclasses.dataclass
class LoadReport:
  """What a load did with each key of the source checkpoint."""

  used: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  missing: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> what was done instead
  variant: Optional[str] = None
  num_classes: Optional[int] = None

  def summary(self) -> str:
    lines = [f'used {len(self.used)} keys, skipped {len(self.skipped)}, missing {len(self.missing)}']
    reasons: dict[str, list[str]] = {}
    for k, why in self.skipped.items():
      reasons.setdefault(why, []).append(k)
    for why, keys in reasons.items():
      lines.append(f'  skipped ({why}): {len(keys)} e.g. {", ".join(keys[:3])}')
    for k, what in self.missing.items():
      lines.append(f'  missing {k}: {what}')
    return '\n'.join(lines)


# --------------------------------------------------------------------------- names


def flax_path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
  """('params', ('backbone', 'network_0', '0', 'mlp', 'fc1', 'kernel')) -> 'backbone.network.0.0.mlp.fc1.weight'."""
  parts = []
  for p in path[:-1]:
    m = _LIST_RE.match(p)
    parts.extend([m.group(1), m.group(2)] if m else [p])
  parts.append(LEAF_NAMES.get((collection, path[-1]), path[-1]))
  return '.'.join(parts)


def _flatten(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
  out = {}
  for collection, tree in variables.items():
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[(collection, tuple(k.key for k in keypath))] = leaf
  return out


def _unflatten(flat: Mapping[tuple[str, tuple[str, ...]], Any]) -> dict:
  out: dict = {}
  for (collection, path), leaf in flat.items():
    node = out.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = leaf
  return out


def torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a variable given its Flax shape."""
  if len(flax_shape) == 4:  # HWIO -> OIHW
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if re.search(r'layer_scale_\d$', key) or re.search(r'channel_mul_conv\.1\.(weight|bias)$', key):
    return tuple(flax_shape) + (1, 1)
  return tuple(flax_shape)


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  return value.reshape(flax_shape)


def _to_torch(value: np.ndarray, key: str) -> np.ndarray:
  shape = torch_shape(key, value.shape)
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.reshape(shape)


# --------------------------------------------------------------------------- templates


def variable_shapes(variant: str, num_classes: int) -> dict:
  """Shapes/dtypes of a segmentor's variables, without computing anything."""
  model = build_segmentor(variant, num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict:
  return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def detect_variant(state: Mapping[str, Any]) -> tuple[str, int]:
  """(variant, num_classes) of an mmseg CGRSeg state dict, read off its shapes."""
  backbone = detect_backbone(_strip_prefix(state, 'backbone.'))
  try:
    num_classes, channels = _shape(state, 'decode_head.conv_seg.weight')[:2]
    band = _shape(state, 'decode_head.meta.0.token_mixer.excite.0.weight')[-1]
  except KeyError as e:
    raise ConversionError(f'not a CGRSeg checkpoint: key {e.args[0]!r} is missing') from None
  repeat = len({k.split('.')[3] for k in state if k.startswith('decode_head.trans.transformer_blocks.')})
  found = dict(backbone=backbone, channels=channels, next_repeat=repeat, band_kernel=band)
  for name, cfg in VARIANTS.items():
    if all(cfg[k] == v for k, v in found.items()):
      return name, num_classes
  raise ConversionError(f'checkpoint matches no CGRSeg variant: found {found}; known variants {VARIANTS}')


def detect_backbone(state: Mapping[str, Any]) -> str:
  """EfficientFormerV2 size ('s0', 's1', 's2', 'l') from a backbone state dict (no prefix)."""
  depths = tuple(len({k.split('.')[2] for k in state if k.startswith(f'network.{2 * i}.')}) for i in range(4))
  try:
    widths = tuple(_shape(state, f'network.{2 * i}.0.mlp.fc2.weight')[0] for i in range(4))
  except KeyError as e:
    raise ConversionError(f'not an EfficientFormerV2 state dict: key {e.args[0]!r} is missing') from None
  for name, cfg in BACKBONES.items():
    if tuple(cfg['widths']) == widths and tuple(cfg['depths']) == depths:
      return name
  raise ConversionError(f'unknown EfficientFormerV2 size: widths {widths}, depths {depths}')


def _shape(state, key):
  if key not in state:
    raise KeyError(key)
  return tuple(state[key].shape)


# --------------------------------------------------------------------------- torch -> flax


def _numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def state_dict_to_variables(
  state: Mapping[str, Any], variant: Optional[str] = None, num_classes: Optional[int] = None
) -> tuple[dict, LoadReport]:
  """An mmseg CGRSeg state dict (keys `backbone.*`, `decode_head.*`) -> Flax variables.

  Strict: every model variable must be present with the right shape, and every
  checkpoint key must be used or be a known buffer.
  """
  found_variant, found_classes = detect_variant(state)
  if variant is not None and variant != found_variant:
    raise ConversionError(
      f'checkpoint is CGRSeg-{found_variant.upper()} (read from its shapes), but variant {variant!r} was requested'
    )
  if num_classes is not None and num_classes != found_classes:
    raise ConversionError(
      f'checkpoint has {found_classes} classes (decode_head.conv_seg.weight), '
      f'but num_classes={num_classes} was requested'
    )
  template = variable_shapes(found_variant, found_classes)
  variables, report = fill_from_state_dict(state, template, strict=True)
  report.variant, report.num_classes = found_variant, found_classes
  return variables, report


def fill_from_state_dict(
  state: Mapping[str, Any],
  template: Mapping[str, Any],
  strict: bool = True,
  prefix: str = '',
  zero_if_missing: tuple[str, ...] = (),
) -> tuple[dict, LoadReport]:
  """Fill `template` (a variables tree of shapes, e.g. from `jax.eval_shape` of
  any module's `init`) from a PyTorch state dict of the matching module.

  `prefix` is cut from the PyTorch names the template produces; variables whose
  name ends with one of `zero_if_missing` may be absent and start at zero.
  `strict` makes unknown checkpoint keys an error instead of a skip."""
  report = LoadReport()
  flat = {}
  for (collection, path), leaf in _flatten(template).items():
    key = flax_path_to_torch_key(collection, path)[len(prefix) :]
    want = tuple(leaf.shape)
    if key not in state:
      if key.endswith(zero_if_missing):
        flat[(collection, path)] = np.zeros(want, np.float32)
        report.missing[key] = 'initialised to zeros'
        continue
      raise ConversionError(f'checkpoint is missing key {key!r} (expected PyTorch shape {torch_shape(key, want)})')
    value = _numpy(state[key])
    if tuple(value.shape) != torch_shape(key, want):
      raise ConversionError(
        f'shape mismatch for key {key!r}: checkpoint has {tuple(value.shape)}, model expects {torch_shape(key, want)}'
      )
    flat[(collection, path)] = _to_flax(value, want).astype(np.float32)
    report.used.append(key)

  used = set(report.used)
  for key in state:
    if key in used:
      continue
    if key.endswith('attention_bias_idxs_seg'):
      _check_bias_index(key, _numpy(state[key]))
      report.skipped[key] = 'index table, recomputed by the model'
    elif key.endswith(_BUFFER_SUFFIXES):
      report.skipped[key] = 'buffer not used by the model'
    elif not strict and _IMAGENET_HEAD_RE.match(key):
      report.skipped[key] = 'ImageNet classifier'
    elif strict:
      raise ConversionError(
        f'unexpected key {key!r} {tuple(state[key].shape)} in checkpoint: '
        'the model has no such variable (renamed key or different architecture?)'
      )
    else:
      report.skipped[key] = 'not in the model'
  return _unflatten(flat), report


def _check_bias_index(key: str, table: np.ndarray):
  n_query, n_key = table.shape
  resolution = math.isqrt(n_key)
  ours, _ = attention_bias_index(resolution, downsample=n_query != n_key)
  if ours.shape != table.shape or not np.array_equal(ours, table):
    raise ConversionError(
      f'{key}: attention bias index table {table.shape} differs from the one this model '
      f'computes for resolution {resolution}'
    )


def load_torch_checkpoint(
  path: str,
  variant: Optional[str] = None,
  num_classes: Optional[int] = None,
  return_report: bool = False,
  verbose: bool = False,
):
  """Read an upstream mmseg CGRSeg `.pth` (dict with `state_dict`) into Flax variables."""
  state = read_torch_file(path)
  try:
    variables, report = state_dict_to_variables(state, variant, num_classes)
  except ConversionError as e:
    raise ConversionError(f'{path}: {e}') from None
  if verbose:
    print(f'{path}: CGRSeg-{report.variant.upper()}, {report.num_classes} classes\n{report.summary()}')
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  return (variables, report) if return_report else variables


def load_backbone_checkpoint(
  path: str, backbone: Optional[str] = None, return_report: bool = False, verbose: bool = False
):
  """An EfficientFormerV2 ImageNet checkpoint (`eformer_*_450.pth`: a dict with
  `model`, or a bare state dict) -> variables of the `backbone` submodule.

  Non-strict as upstream: classifier keys and ImageNet attention biases are
  skipped; `attention_biases_seg` is missing there and starts at zero.
  """
  state = read_torch_file(path)
  if any(k.startswith('backbone.') for k in state):
    state = _strip_prefix(state, 'backbone.')
  found = detect_backbone(state)
  if backbone is not None and backbone != found:
    raise ConversionError(f'{path}: checkpoint is EfficientFormerV2-{found.upper()}, expected {backbone.upper()}')
  model = build_segmentor(next(v for v, c in VARIANTS.items() if c['backbone'] == found))
  shapes = jax.eval_shape(lambda: model.backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  template = {c: {'backbone': t} for c, t in shapes.items()}
  try:
    variables, report = fill_from_state_dict(
      state, template, strict=False, prefix='backbone.', zero_if_missing=('attention_biases_seg',)
    )
  except ConversionError as e:
    raise ConversionError(f'{path}: {e}') from None
  if verbose:
    print(f'{path}: EfficientFormerV2-{found.upper()}\n{report.summary()}')
  variables = {c: jax.tree_util.tree_map(jnp.asarray, t['backbone']) for c, t in variables.items()}
  return (variables, report) if return_report else variables


def read_torch_file(path: str) -> dict:
  """The state dict inside a `.pth` file: under `state_dict`, `model`, or bare."""
  import torch  # only conversion needs PyTorch

  try:
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # a pickle with arbitrary objects, or not a checkpoint at all
    raise ConversionError(f'{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})') from None
  if not isinstance(ckpt, Mapping):
    raise ConversionError(f'{path}: expected a dict, got {type(ckpt).__name__}')
  for key in ('state_dict', 'model'):
    if key in ckpt and isinstance(ckpt[key], Mapping):
      ckpt = ckpt[key]
      break
  state = {k[len('module.') :] if k.startswith('module.') else k: v for k, v in ckpt.items()}
  bad = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if bad:
    raise ConversionError(f'{path}: entries {bad[:5]} are not tensors; expected a state dict')
  return state


# --------------------------------------------------------------------------- flax -> torch


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables -> an mmseg state dict in the upstream layout (numpy
  arrays), buffers included, loadable strictly by the upstream model."""
  state: dict[str, np.ndarray] = {}
  for (collection, path), leaf in _flatten({c: variables[c] for c in ('params', 'batch_stats')}).items():
    key = flax_path_to_torch_key(collection, path)
    state[key] = np.ascontiguousarray(_to_torch(np.asarray(leaf, np.float32), key))
    if collection == 'batch_stats' and path[-1] == 'var':
      state[key[: -len('running_var')] + 'num_batches_tracked'] = np.array(0, np.int64)
    if path[-1] == 'attention_biases_seg':
      base = key[: -len('attention_biases_seg')]
      heads, n_offsets = leaf.shape
      downsample = '.attn.' in key
      table, _ = attention_bias_index(math.isqrt(n_offsets), downsample)
      # ImageNet-size leftovers kept by the upstream module (7x7 queries, 7x7 or 14x14 keys).
      n_key = 196 if downsample else 49
      state[base + 'attention_biases'] = np.zeros((heads, n_key), np.float32)
      state[base + 'attention_bias_idxs'] = np.ones((49, n_key), np.int64)
      state[base + 'attention_bias_idxs_seg'] = table.astype(np.int64)
  return state


def save_torch_checkpoint(path: str, variables: Mapping[str, Any], meta: Optional[dict] = None):
  """Write variables as an mmseg checkpoint `{'meta': ..., 'state_dict': ...}`."""
  import torch

  state = {k: torch.from_numpy(np.array(v)) for k, v in variables_to_state_dict(variables).items()}
  torch.save({'meta': dict(meta or {}), 'state_dict': state}, path)


# --------------------------------------------------------------------------- orbax


def save_variables(directory: str, variables: Mapping[str, Any], variant: str, num_classes: int, source: str = ''):
  """Write converted variables as an orbax checkpoint plus `cgrseg.json`
  (variant, classes), the format `load_variables` and the training config's
  `init` read."""
  import json
  import os

  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  tree = {c: variables[c] for c in ('params', 'batch_stats')}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, 'variables'), tree)
  with open(os.path.join(directory, 'cgrseg.json'), 'w') as f:
    json.dump(dict(variant=variant, num_classes=num_classes, source=source), f, indent=2)


def load_variables(directory: str) -> tuple[dict, dict]:
  """Read a directory written by `save_variables` -> (variables, meta)."""
  import json
  import os

  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, 'cgrseg.json')
  if not os.path.exists(meta_path):
    raise ConversionError(f'{directory}: not a converted CGRSeg checkpoint (no cgrseg.json)')
  with open(meta_path) as f:
    meta = json.load(f)
  template = variable_shapes(meta['variant'], meta['num_classes'])
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, 'variables'), template)
  return dict(variables), meta
