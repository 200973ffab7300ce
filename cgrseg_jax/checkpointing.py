"""Checkpoints: the orbax manager of a training run, and initial weights.

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with two items:
`state` (step, params, batch_stats, optimizer state, RNG: one pytree) and
`data` (the grain iterator state, one JSON file per process). orbax writes a
step into a temporary directory and renames it when every process has
finished (all processes call `save`; array shards are written by their owners,
the rest is written by process 0), so `latest_step()` never sees a
half-written checkpoint and resuming after a crash mid-save picks the previous
one. Saves are asynchronous: `save` returns once the arrays are copied off
the devices, the writing overlaps the next training steps.

Retention: the last `keep` checkpoints, plus the best by validation mIoU
(saves made right after an evaluation carry its metrics).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cgrseg_jax import convert, errors

log = logging.getLogger(__name__)


def make_manager(directory: str, keep: int, best_metric: str = 'mIoU') -> ocp.CheckpointManager:
  """Manager keeping the latest `keep` steps and the best one by `best_metric`."""
  policies = ocp.checkpoint_managers
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=keep),
      policies.BestN(
        get_metric_fn=lambda m: m[best_metric], n=1, reverse=False, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=preservation, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'data'), options=options)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: Any,
  metrics: Optional[Mapping[str, float]] = None,
  force: bool = False,
) -> bool:
  """Start an async save of (state, data iterator) at `step`."""
  import grain

  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator))
  return manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any) -> Any:
  """Restore `state` (into the shardings of `abstract_state`) and the data iterator in place."""
  import grain

  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
  )
  return manager.restore(step, args=args)['state']


# ------------------------------------------------------------------ init weights


class InitError(errors.UserError, ValueError):
  """`config.init` names something that cannot initialise this model."""


def _latest_step_dir(path: str) -> str:
  """A step directory of an orbax manager dir (latest), or `path` itself."""
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  for sub in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(sub):
      steps = [int(d) for d in os.listdir(sub) if d.isdigit() and os.path.isdir(os.path.join(sub, d, 'state'))]
      if steps:
        return os.path.join(sub, str(max(steps)))
  raise InitError(f'{path}: not an orbax checkpoint (expected <dir>/state or numbered step dirs with a state item)')


def load_orbax_variables(path: str) -> dict:
  """{'params', 'batch_stats'} (numpy) of a training checkpoint (step dir or run dir)."""
  step_dir = _latest_step_dir(path)
  ckptr = ocp.StandardCheckpointer()
  restored = ckptr.restore(os.path.join(os.path.abspath(step_dir), 'state'))
  try:
    return {'params': restored['params'], 'batch_stats': restored['batch_stats']}
  except (KeyError, TypeError):
    raise InitError(f'{step_dir}: checkpoint state has no params / batch_stats') from None


def load_init_variables(init: str, variables: Mapping[str, Any], variant: str, num_classes: int) -> dict:
  """Initial {'params', 'batch_stats'}: `variables` (fresh init) with what `init` provides.

  - 'scratch': `variables` unchanged;
  - an EfficientFormerV2 ImageNet `.pth`: the backbone part (upstream's
    `init_cfg=Pretrained`, non-strict); the head keeps its fresh init;
  - a CGRSeg mmseg `.pth`: everything (strict);
  - an orbax checkpoint directory: its params and batch_stats.
  Shapes must match the model exactly; mismatches name the variable.
  """
  if init in ('', 'scratch', None):
    return dict(variables)
  if not os.path.exists(init):
    raise InitError(f'config.init={init!r}: no such file or directory (expected "scratch", a .pth or an orbax dir)')
  if os.path.isdir(init):
    loaded = load_orbax_variables(init)
    what = f'orbax checkpoint {init}'
  else:
    state = convert.read_torch_file(init)
    if any(k.startswith('decode_head.') for k in state):
      loaded = convert.load_torch_checkpoint(init, variant=variant, num_classes=num_classes, verbose=False)
      what = f'CGRSeg checkpoint {init}'
    else:
      backbone = convert.VARIANTS[variant]['backbone']
      bb, report = convert.load_backbone_checkpoint(init, backbone=backbone, return_report=True)
      log.info('backbone init from %s:\n%s', init, report.summary())
      loaded = {c: dict(variables[c], backbone=bb[c]) for c in ('params', 'batch_stats')}
      what = f'EfficientFormerV2 backbone {init}'
  out = {}
  for c in ('params', 'batch_stats'):
    _check_same_tree(variables[c], loaded[c], c, what)
    out[c] = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), loaded[c])
  log.info('initialised from %s', what)
  return out


def _check_same_tree(want: Any, got: Any, collection: str, what: str):
  want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  missing = sorted(set(want_flat) - set(got_flat))
  extra = sorted(set(got_flat) - set(want_flat))
  if missing or extra:
    raise InitError(f'{what}: {collection} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}')
  for k, v in want_flat.items():
    if tuple(np.shape(got_flat[k])) != tuple(v.shape):
      raise InitError(
        f'{what}: {collection}{k} has shape {tuple(np.shape(got_flat[k]))}, the model expects {tuple(v.shape)}'
      )
