"""The one checkpoint loader: any weights file or directory -> variables of a registered model.

Accepted (`load(path)` tells them apart and detects model and class count):

- `torch`:     an upstream full-model `.pth` of any registered family (mmseg
               `{'state_dict', 'meta'}`, `{'model': ...}` or a bare state dict);
- `backbone`:  an ImageNet backbone `.pth` (e.g. EfficientFormerV2
               `eformer_s1_450.pth`): only the backbone part is filled;
- `converted`: a directory written by `save_converted` (scripts/convert_checkpoint.py):
               `model.json` + an orbax `variables/` item;
- `workdir`:   a training run directory (its latest step), or its `checkpoints/` dir;
- `step`:      one step directory of a run (`<workdir>/checkpoints/<step>`).

A run's EMA weights (`config.ema_decay`) instead of its raw ones: append `:ema`
to a workdir or step path (`runs/t:ema`, `gs://bucket/run/checkpoints/8000:ema`).

When a `model` (registered name), `variant` or `num_classes` is given it is
checked against what the weights hold; errors say what was found and what was
expected. Every entry point (training's `config.init`, `--mode=eval`,
`Segmenter.from_checkpoint`, the scripts) loads through here. `.pth` files are
read by `torch_files.py`, state dicts converted by `convert.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cgrseg_jax import convert, errors, storage, torch_files
from cgrseg_jax.models import registry
from cgrseg_jax.models.key_layout import LoadReport

log = logging.getLogger(__name__)

KINDS = ('torch', 'backbone', 'converted', 'workdir', 'step')
META_FILE = 'model.json'
EMA_SUFFIX = ':ema'


class LoadError(errors.CheckpointError, ValueError):
  """A path that holds no loadable weights, or weights of another model."""


@dataclasses.dataclass
class Loaded:
  """What `load` found. `variables` is {'params', 'batch_stats'} (numpy float32);
  for a `backbone` checkpoint it holds only the backbone part."""

  variables: dict
  model: Optional[str]
  num_classes: Optional[int]
  kind: str
  path: str
  report: Optional[LoadReport] = None
  ema: bool = False  # the run's EMA weights

  def describe(self) -> str:
    what = f'{self.model}, {self.num_classes} classes' if self.kind != 'backbone' else f'backbone of {self.model}'
    return f'{self.path} ({self.kind} checkpoint{", EMA weights" if self.ema else ""}: {what})'


def load(
  path: str,
  *,
  model: Optional[str] = None,
  variant: Optional[str] = None,
  num_classes: Optional[int] = None,
  kinds: tuple[str, ...] = KINDS,
) -> Loaded:
  """Read `path` (any of `kinds`; `<run>:ema` for a run's EMA weights) and check
  it against `model`/`variant`/`num_classes`."""
  ema = path.endswith(EMA_SUFFIX)
  if ema:
    path = path[: -len(EMA_SUFFIX)]
  where = storage.path(path)
  if not where.exists():
    raise LoadError(f'{path}: no such file or directory (expected a .pth file or a checkpoint directory)')
  if where.is_dir():
    loaded = _load_directory(path, kinds, ema)
  elif ema:
    raise LoadError(f'{path}{EMA_SUFFIX}: EMA weights are kept in training runs only; {path} is a file')
  else:
    loaded = _load_torch(path, kinds, model, variant)
  if loaded.kind != 'backbone':
    try:
      convert.resolve_model(loaded.model, model, variant)
    except errors.ConversionError as e:
      raise LoadError(f'{path}: {e}') from None
    if num_classes is not None and num_classes != loaded.num_classes:
      raise LoadError(f'{path}: the weights have {loaded.num_classes} classes, but num_classes={num_classes} was given')
  return loaded


def _load_torch(path: str, kinds, model, variant) -> Loaded:
  state = _read_torch(path)
  full_error = None
  if 'torch' in kinds:
    try:
      variables, report = convert.state_dict_to_variables(state)
      return Loaded(_host(variables), report.model, report.num_classes, 'torch', path, report)
    except errors.ConversionError as e:
      full_error = e
  if 'backbone' in kinds:
    found = []
    for family in registry.families():
      if family.detect_backbone is None:
        continue
      try:
        found = family.detect_backbone(state)
      except errors.ConversionError:
        continue
      if found:
        break
    if found:
      wanted = [m for m in found if m == model or (variant is not None and m.endswith('_' + variant))]
      if (model or variant) and not wanted:
        raise LoadError(
          f'{path}: an ImageNet backbone for {", ".join(found)}, but model={model or variant!r} was requested'
        )
      name = (wanted or found)[0]
      family = registry.family_of(name)
      template = family.variable_shapes(name, 1)
      try:
        variables, report = family.load_backbone(state, template)
      except errors.ConversionError as e:
        raise LoadError(f'{path}: {e}') from None
      report.model = name
      return Loaded(_host(variables), name, None, 'backbone', path, report)
  expected = ' or '.join(k for k in ('torch', 'backbone') if k in kinds) or 'a directory'
  raise LoadError(f'{path}: not a {expected} checkpoint of a registered model ({full_error})')


def _read_torch(path: str) -> dict:
  try:
    return torch_files.read_state_dict(path)
  except errors.ConversionError as e:
    raise LoadError(str(e)) from None


def _load_directory(path: str, kinds, ema: bool = False) -> Loaded:
  meta_path = storage.path(path) / META_FILE
  if meta_path.exists() and 'converted' in kinds:
    if ema:
      raise LoadError(f'{path}{EMA_SUFFIX}: a converted checkpoint holds one set of weights, no EMA')
    meta = json.loads(meta_path.read_text())
    name, k = meta['model'], int(meta['num_classes'])
    template = registry.family_of(name).variable_shapes(name, k)
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(storage.path(path) / 'variables', template)
    return Loaded(_host(variables), name, k, 'converted', path)
  step_dir, kind = _find_step(path)
  if step_dir is None or kind not in kinds:
    raise LoadError(
      f'{path}: not a checkpoint directory: expected {META_FILE} (a converted checkpoint), '
      'a training workdir (checkpoints/<step>/state), a checkpoints/ dir or a step dir (<step>/state)'
    )
  variables = _restore_state(step_dir, ema)
  name, k = _run_model(step_dir, variables)
  return Loaded(variables, name, k, kind, step_dir, ema=ema)


def _find_step(path: str) -> tuple[Optional[str], str]:
  """(step directory, 'step' | 'workdir') of a step dir, a checkpoints dir or a run dir."""
  where = storage.path(path)
  if (where / 'state').is_dir():
    return path, 'step'
  for sub in (where, where / 'checkpoints'):
    if sub.is_dir():
      steps = [int(d.name) for d in sub.iterdir() if d.name.isdigit() and (d / 'state').is_dir()]
      if steps:
        return os.fspath(sub / str(max(steps))), 'workdir'
  return None, ''


def _restore_state(step_dir: str, ema: bool = False) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(storage.path(step_dir) / 'state')
  if ema:
    if not restored.get('ema'):
      raise LoadError(f'{step_dir}{EMA_SUFFIX}: this run kept no EMA weights (it trained with config.ema_decay=0)')
    restored = restored['ema']
  try:
    return _host({'params': restored['params'], 'batch_stats': restored['batch_stats']})
  except (KeyError, TypeError):
    raise LoadError(f'{step_dir}: checkpoint state has no params / batch_stats') from None


def _run_model(step_dir: str, variables) -> tuple[str, int]:
  """Model and classes of a run: its config.json, else read off the weights."""
  config_path = storage.path(step_dir).parent.parent / 'config.json'
  if config_path.exists():
    model_cfg = json.loads(config_path.read_text()).get('model', {})
    if model_cfg.get('name') in registry.model_names():
      return model_cfg['name'], int(model_cfg['num_classes'])
  errs = []
  for family in registry.families():
    for name in family.variants:
      try:
        return family.detect(convert.variables_to_state_dict(variables, name))
      except (errors.ConversionError, KeyError, ValueError) as e:
        errs.append(f'{family.name}: {e}')
        break
  raise LoadError(f'{step_dir}: no config.json next to the run and the weights match no registered model: {errs}')


def _host(variables) -> dict:
  return {
    c: jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), variables[c])
    for c in ('params', 'batch_stats')
    if c in variables
  }


# ------------------------------------------------------------------- writing


def save_converted(directory: str, variables: Mapping[str, Any], model: str, num_classes: int, source: str = ''):
  """Write variables as an orbax item `variables/` plus `model.json` (model
  name, classes, source): the `converted` format `load` reads."""
  directory = storage.path(directory)
  tree = {c: variables[c] for c in ('params', 'batch_stats')}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / 'variables', tree)
  (directory / META_FILE).write_text(
    json.dumps(dict(model=model, num_classes=int(num_classes), source=source), indent=2)
  )


# ------------------------------------------------------------ initial weights


def initial_variables(
  init: Optional[str], fresh: Mapping[str, Any], model: str, num_classes: int, kinds: tuple[str, ...] = KINDS
) -> dict:
  """Initial {'params', 'batch_stats'} of `model` (`config.init`): `fresh`
  (a new init) overlaid with what `init` provides.

  - '' / 'scratch': `fresh` unchanged;
  - an ImageNet backbone `.pth`: its backbone part (upstream `init_cfg=Pretrained`);
  - any other format `load` reads: everything, strictly (model and classes must match).
  """
  if init in ('', 'scratch', None):
    return {c: dict(fresh[c]) for c in ('params', 'batch_stats')}
  loaded = load(init, model=model, kinds=kinds)
  if loaded.kind == 'backbone':
    log.info('backbone init from %s:\n%s', init, loaded.report.summary())
    variables = {c: {**fresh[c], **loaded.variables.get(c, {})} for c in ('params', 'batch_stats')}
  else:
    if loaded.num_classes != num_classes:
      raise LoadError(f'{init}: the weights have {loaded.num_classes} classes, the config has {num_classes}')
    variables = loaded.variables
  for c in ('params', 'batch_stats'):
    _check_same_tree(fresh[c], variables[c], c, loaded.describe())
  log.info('initialised from %s', loaded.describe())
  return _host(variables)


def _check_same_tree(want: Any, got: Any, collection: str, what: str):
  want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  missing = sorted(set(want_flat) - set(got_flat))
  extra = sorted(set(got_flat) - set(want_flat))
  if missing or extra:
    raise LoadError(f'{what}: {collection} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}')
  for k, v in want_flat.items():
    if tuple(np.shape(got_flat[k])) != tuple(np.shape(v)):
      raise LoadError(
        f'{what}: {collection}{k} has shape {tuple(np.shape(got_flat[k]))}, the model expects {tuple(np.shape(v))}'
      )
