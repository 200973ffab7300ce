"""Flax variables <-> PyTorch state-dict keys, by a mechanical walk.

The Flax modules carry the PyTorch module names, so a variable path maps to a
state-dict key by a `KeyLayout` (one per model family, declared next to the
model):

  ('decode_head', 'SIM_0', 'fuse1', 'conv', 'kernel')  <->  decode_head.SIM.0.fuse1.conv.weight

4-D conv kernels go HWIO <-> OIHW; other tensors are reshaped where the
layout says PyTorch keeps another shape. Buffers with no Flax variable are
checked or skipped on load and regenerated on export, as the layout says.

`fill_from_state_dict` fills any variables template from a state dict of the
matching module (a whole model, or the backbone part of one);
`to_state_dict` goes the other way. Which family a state dict belongs to is
`cgrseg_jax.convert`; reading and writing files is `cgrseg_jax.loader`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from cgrseg_jax import errors

# Flax leaf name -> PyTorch leaf name, the same for every family (Flax's nn.Conv,
# nn.BatchNorm, nn.LayerNorm against torch's Conv2d, BatchNorm2d, LayerNorm).
FLAX_LEAF_NAMES = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
_NEVER = re.compile(r'(?!)')


def default_torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """4-D conv kernels are OIHW in PyTorch (HWIO in Flax); the rest keep their shape."""
  del key
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  return tuple(flax_shape)


@dataclasses.dataclass(frozen=True)
class KeyLayout:
  """How a Flax variable path maps to a PyTorch state-dict key, and back.

  A module named `<list>_<i>` with `<list>` in `list_modules` is element i of
  a PyTorch ModuleList/Sequential; leaves are renamed by `leaf_names`; a
  PyTorch shape is `torch_shape(key, flax_shape)` (a 4-D array is always a conv
  kernel, transposed HWIO <-> OIHW; other shape changes are reshapes).
  """

  list_modules: tuple[str, ...] = ()
  leaf_names: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=lambda: dict(FLAX_LEAF_NAMES))
  torch_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] = default_torch_shape
  # Checkpoint keys with no Flax variable (buffers), skipped on load. BN's
  # num_batches_tracked is written on export for every family (`to_state_dict`).
  skip_suffixes: tuple[str, ...] = ('num_batches_tracked',)
  # check_buffer(key, array): raise ConversionError if a skipped buffer
  # disagrees with what the model computes (e.g. index tables).
  check_buffer: Optional[Callable[[str, Any], None]] = None
  # extra_buffers(key, collection, path, leaf) -> {key: array}: buffers the
  # upstream module keeps next to this variable, written on export.
  extra_buffers: Optional[Callable[[str, str, tuple[str, ...], Any], Mapping[str, Any]]] = None

  def torch_key(self, collection: str, path: tuple[str, ...]) -> str:
    """('params', ('backbone', 'network_0', '0', 'mlp', 'fc1', 'kernel')) -> 'backbone.network.0.0.mlp.fc1.weight'."""
    parts = []
    for p in path[:-1]:
      m = self._list_re.match(p)
      parts.extend([m.group(1), m.group(2)] if m else [p])
    parts.append(self.leaf_names.get((collection, path[-1]), path[-1]))
    return '.'.join(parts)

  @functools.cached_property
  def _list_re(self):
    return re.compile(r'^(%s)_(\d+)$' % '|'.join(map(re.escape, self.list_modules))) if self.list_modules else _NEVER


@dataclasses.dataclass
class LoadReport:
  """What a load did with each key of the source checkpoint."""

  used: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  missing: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> what was done instead
  model: Optional[str] = None  # registered model name
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


# --------------------------------------------------------------------------- trees


def flatten(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
  """{collection: tree} -> {(collection, path): leaf}."""
  out = {}
  for collection, tree in variables.items():
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[(collection, tuple(k.key for k in keypath))] = leaf
  return out


def unflatten(flat: Mapping[tuple[str, tuple[str, ...]], Any]) -> dict:
  out: dict = {}
  for (collection, path), leaf in flat.items():
    node = out.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = leaf
  return out


def to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  return value.reshape(flax_shape)


def to_torch(value: np.ndarray, key: str, layout: KeyLayout) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.reshape(layout.torch_shape(key, value.shape))


def as_numpy(v) -> np.ndarray:
  """A torch tensor or array -> numpy (bfloat16 tensors as float32)."""
  if hasattr(v, 'detach'):
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    return v.numpy()
  return np.asarray(v)


# --------------------------------------------------------------------------- the walk


def fill_from_state_dict(
  state: Mapping[str, Any],
  template: Mapping[str, Any],
  layout: KeyLayout,
  strict: bool = True,
  prefix: str = '',
  zero_if_missing: tuple[str, ...] = (),
  skip_unused=None,
) -> tuple[dict, LoadReport]:
  """Fill `template` (a variables tree of shapes, e.g. from `jax.eval_shape` of
  any module's `init`) from a PyTorch state dict of the matching module.

  `prefix` is cut from the PyTorch names the template produces; variables whose
  key ends with one of `zero_if_missing` start at zero when absent. Unused
  checkpoint keys are an error when `strict`, else skipped; `skip_unused(key)`
  may name a reason to skip a key (e.g. an ImageNet classifier)."""
  report = LoadReport()
  flat = {}
  for (collection, path), leaf in flatten(template).items():
    key = layout.torch_key(collection, path)[len(prefix) :]
    want = tuple(leaf.shape)
    if key not in state:
      if key.endswith(zero_if_missing):
        flat[(collection, path)] = np.zeros(want, np.float32)
        report.missing[key] = 'initialised to zeros'
        continue
      raise errors.ConversionError(
        f'checkpoint is missing key {key!r} (expected PyTorch shape {layout.torch_shape(key, want)})'
      )
    value = as_numpy(state[key])
    if tuple(value.shape) != layout.torch_shape(key, want):
      raise errors.ConversionError(
        f'shape mismatch for key {key!r}: checkpoint has {tuple(value.shape)}, '
        f'model expects {layout.torch_shape(key, want)}'
      )
    flat[(collection, path)] = to_flax(value, want).astype(np.float32)
    report.used.append(key)

  used = set(report.used)
  for key in state:
    if key in used:
      continue
    why = skip_unused(key) if skip_unused is not None else None
    if key.endswith(layout.skip_suffixes):
      if layout.check_buffer is not None:
        layout.check_buffer(key, as_numpy(state[key]))
      report.skipped[key] = 'buffer not used by the model'
    elif why:
      report.skipped[key] = why
    elif strict:
      raise errors.ConversionError(
        f'unexpected key {key!r} {tuple(state[key].shape)} in checkpoint: '
        'the model has no such variable (renamed key or different architecture?)'
      )
    else:
      report.skipped[key] = 'not in the model'
  return unflatten(flat), report


def to_state_dict(variables: Mapping[str, Any], layout: KeyLayout) -> dict[str, np.ndarray]:
  """Flax {'params', 'batch_stats'} -> a PyTorch state dict (numpy arrays) in
  `layout`, buffers included (BN's num_batches_tracked, the layout's extras)."""
  state: dict[str, np.ndarray] = {}
  for (collection, path), leaf in flatten({c: variables[c] for c in ('params', 'batch_stats')}).items():
    key = layout.torch_key(collection, path)
    state[key] = np.ascontiguousarray(to_torch(np.asarray(leaf, np.float32), key, layout))
    if collection == 'batch_stats' and path[-1] == 'var':
      state[key[: -len('running_var')] + 'num_batches_tracked'] = np.array(0, np.int64)
    if layout.extra_buffers is not None:
      state.update(layout.extra_buffers(key, collection, path, leaf))
  return state
