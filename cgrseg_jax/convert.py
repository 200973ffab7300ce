"""PyTorch <-> Flax variables for any registered model family.

The Flax modules carry the PyTorch module names, so a variable path maps to a
state-dict key mechanically, by the family's `KeyLayout`
(`cgrseg_jax/models/registry.py`):

  ('decode_head', 'SIM_0', 'fuse1', 'conv', 'kernel')  <->  decode_head.SIM.0.fuse1.conv.weight

4-D conv kernels go HWIO <-> OIHW; other tensors are reshaped where the family
says PyTorch keeps another shape. Buffers with no Flax variable are checked or
skipped on load and regenerated on export, as the layout says.

Reading files of any format (and detecting what they hold) is `cgrseg_jax.loader`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import numpy as np

from cgrseg_jax import errors
from cgrseg_jax.models import registry
from cgrseg_jax.models.registry import KeyLayout

ConversionError = errors.ConversionError


@dataclasses.dataclass
class LoadReport:
  """What a load did with each key of the source checkpoint."""

  used: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  missing: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> what was done instead
  model: Optional[str] = None  # registered model name
  num_classes: Optional[int] = None

  @property
  def variant(self) -> Optional[str]:
    """The model name without its family prefix ('cgrseg_t' -> 't')."""
    if self.model is None:
      return None
    family = registry.family_of(self.model).name
    return self.model[len(family) + 1 :] if self.model.startswith(family + '_') else self.model

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


def numpy(v) -> np.ndarray:
  """A torch tensor or array -> numpy (bfloat16 tensors as float32)."""
  if hasattr(v, 'detach'):
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    return v.numpy()
  return np.asarray(v)


# --------------------------------------------------------------------------- torch -> flax


def resolve_model(found: str, model: Optional[str] = None, variant: Optional[str] = None) -> None:
  """Raise if a requested `model` / `variant` disagrees with the `found` model name."""
  family = registry.family_of(found).name
  if model is not None and model != found:
    raise ConversionError(f'checkpoint is {found} (read from its shapes), but model {model!r} was requested')
  if variant is not None and variant not in (found, found[len(family) + 1 :]):
    raise ConversionError(f'checkpoint is {found} (read from its shapes), but variant {variant!r} was requested')


def detect(state: Mapping[str, Any]) -> tuple[str, int]:
  """(model name, num_classes) of a full-model state dict, asking every registered family."""
  tried = []
  for family in registry.families():
    try:
      return family.detect(state)
    except ConversionError as e:
      tried.append(f'{family.name}: {e}')
  sample = ', '.join(list(state)[:4])
  raise ConversionError(
    f'the state dict ({len(state)} keys, e.g. {sample}) matches no registered model family:\n  ' + '\n  '.join(tried)
  )


def state_dict_to_variables(
  state: Mapping[str, Any],
  variant: Optional[str] = None,
  num_classes: Optional[int] = None,
  model: Optional[str] = None,
) -> tuple[dict, LoadReport]:
  """A full-model PyTorch state dict -> Flax variables of the model it holds.

  Strict: every model variable must be present with the right shape, and every
  checkpoint key must be used or be a known buffer.
  """
  found, found_classes = detect(state)
  resolve_model(found, model, variant)
  if num_classes is not None and num_classes != found_classes:
    raise ConversionError(f'checkpoint has {found_classes} classes, but num_classes={num_classes} was requested')
  family = registry.family_of(found)
  template = family.variable_shapes(found, found_classes)
  variables, report = fill_from_state_dict(state, template, family.key_layout, strict=True)
  report.model, report.num_classes = found, found_classes
  return variables, report


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
      raise ConversionError(
        f'checkpoint is missing key {key!r} (expected PyTorch shape {layout.torch_shape(key, want)})'
      )
    value = numpy(state[key])
    if tuple(value.shape) != layout.torch_shape(key, want):
      raise ConversionError(
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
        layout.check_buffer(key, numpy(state[key]))
      report.skipped[key] = 'buffer not used by the model'
    elif why:
      report.skipped[key] = why
    elif strict:
      raise ConversionError(
        f'unexpected key {key!r} {tuple(state[key].shape)} in checkpoint: '
        'the model has no such variable (renamed key or different architecture?)'
      )
    else:
      report.skipped[key] = 'not in the model'
  return unflatten(flat), report


def load_torch_checkpoint(
  path: str,
  variant: Optional[str] = None,
  num_classes: Optional[int] = None,
  return_report: bool = False,
  verbose: bool = False,
  model: Optional[str] = None,
):
  """Read an upstream full-model `.pth` (mmseg `{'state_dict', 'meta'}` or bare)
  of any registered family into Flax variables; `model` (a registered name) or
  `variant` ('t' for cgrseg_t) and `num_classes` are checked against it."""
  from cgrseg_jax import loader

  loaded = loader.load(path, model=model, variant=variant, num_classes=num_classes, kinds=('torch',))
  if verbose:
    print(f'{path}: {loaded.model}, {loaded.num_classes} classes\n{loaded.report.summary()}')
  return (loaded.variables, loaded.report) if return_report else loaded.variables


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


def variables_to_state_dict(variables: Mapping[str, Any], model: str) -> dict[str, np.ndarray]:
  """Flax variables of the registered `model` -> a PyTorch state dict in the
  upstream layout (numpy arrays), buffers included."""
  layout = registry.family_of(model).key_layout
  state: dict[str, np.ndarray] = {}
  for (collection, path), leaf in flatten({c: variables[c] for c in ('params', 'batch_stats')}).items():
    key = layout.torch_key(collection, path)
    state[key] = np.ascontiguousarray(to_torch(np.asarray(leaf, np.float32), key, layout))
    if collection == 'batch_stats' and path[-1] == 'var':
      state[key[: -len('running_var')] + 'num_batches_tracked'] = np.array(0, np.int64)
    if layout.extra_buffers is not None:
      state.update(layout.extra_buffers(key, collection, path, leaf))
  return state


def save_torch_checkpoint(path: str, variables: Mapping[str, Any], model: str, meta: Optional[dict] = None):
  """Write variables as an mmseg checkpoint `{'meta': ..., 'state_dict': ...}`."""
  import torch

  state = {k: torch.from_numpy(np.array(v)) for k, v in variables_to_state_dict(variables, model).items()}
  torch.save({'meta': dict(meta or {}, model=model), 'state_dict': state}, path)
