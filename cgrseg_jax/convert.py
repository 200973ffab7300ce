"""PyTorch state dicts <-> Flax variables for any registered model family.

`detect` asks every registered family whose state dict this is;
`state_dict_to_variables` fills that model's variables strictly by the
family's `KeyLayout` (the walk is `models/key_layout.py`);
`variables_to_state_dict` writes the upstream layout back, buffers included:

  ('decode_head', 'SIM_0', 'fuse1', 'conv', 'kernel')  <->  decode_head.SIM.0.fuse1.conv.weight

`load_torch_checkpoint` / `save_torch_checkpoint` do the same from and to a
`.pth` file (`torch_files.py`); they are the contract of the parity tools in
`../shared/tools`. Every other format, and detection of what a path holds, is
`cgrseg_jax.loader`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from cgrseg_jax import errors, torch_files
from cgrseg_jax.models import key_layout, registry
from cgrseg_jax.models.key_layout import LoadReport

ConversionError = errors.ConversionError


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
  variables, report = key_layout.fill_from_state_dict(state, template, family.key_layout, strict=True)
  report.model, report.num_classes = found, found_classes
  return variables, report


def variables_to_state_dict(variables: Mapping[str, Any], model: str) -> dict:
  """Flax variables of the registered `model` -> a PyTorch state dict in the
  upstream layout (numpy arrays), buffers included."""
  return key_layout.to_state_dict(variables, registry.family_of(model).key_layout)


def load_torch_checkpoint(
  path: str, variant: Optional[str] = None, num_classes: Optional[int] = None, model: Optional[str] = None
) -> dict:
  """The Flax variables of an upstream full-model `.pth` (mmseg `{'state_dict',
  'meta'}` or bare) of any registered family; `model` (a registered name) or
  `variant` ('t' for cgrseg_t) and `num_classes` are checked against it; errors name the file."""
  state = torch_files.read_state_dict(path)
  try:
    return state_dict_to_variables(state, variant, num_classes, model)[0]
  except ConversionError as e:
    raise ConversionError(f'{path}: {e}') from None


def save_torch_checkpoint(path: str, variables: Mapping[str, Any], model: str, meta: Optional[dict] = None):
  """Write variables as an mmseg checkpoint `{'meta': ..., 'state_dict': ...}` that
  the upstream model loads strictly."""
  torch_files.write_mmseg_checkpoint(path, variables_to_state_dict(variables, model), dict(meta or {}, model=model))
