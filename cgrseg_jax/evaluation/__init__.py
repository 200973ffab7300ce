"""Evaluation with the mmseg 0.27 metric; evaluators are plugins chosen by name.

- `metric.py`: per-class areas, IoU / Acc / mIoU / mAcc / aAcc, the logged table;
- `bucketed.py`: single-scale whole-image inference on pre-bucketed, sharded batches;
- `segmenter.py`: per image through `inference.Segmenter`, for multi-scale/flip
  TTA and slide inference;
- `report.py`: the confusion matrix and worst-image panels of an evaluation.

`EVALUATORS` maps `config.eval.evaluator` to them ('auto': 'segmenter' when
`config.eval` asks for TTA or slide, else 'bucketed'); training-time
evaluation and `--mode=eval` (`run`) both go through `make_evaluator`. An
evaluator is `factory(config, model, mesh)`, called with variables, returning
the metrics dict (with `confusion` (K, K) and `image_miou` {index: mIoU}), and
with `predict_records(variables, indices)` for the report's panels.
`evaluate_and_report` runs one, writes the report and logs the table.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh

from cgrseg_jax import errors, loader, metric_writer, preemption, storage
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.evaluation import bucketed, metric, report, segmenter
from cgrseg_jax.models import registry

EVALUATORS = {
  'bucketed': bucketed.BucketedEvaluator,
  'segmenter': segmenter.SegmenterEvaluator,
}


def evaluator_name(config) -> str:
  """The `EVALUATORS` entry `config.eval.evaluator` resolves to."""
  name = config.eval.evaluator
  if name == 'auto':
    name = 'segmenter' if segmenter.needed(config) else 'bucketed'
  if name not in EVALUATORS:
    raise errors.ConfigError(f'config.eval.evaluator={name!r}; expected auto or one of {sorted(EVALUATORS)}')
  return name


def make_evaluator(config, model, mesh):
  """The evaluator `config.eval.evaluator` names, for `model` on `mesh`."""
  return EVALUATORS[evaluator_name(config)](config, model, mesh)


log = logging.getLogger(__name__)


def evaluate_and_report(evaluator, variables, config, workdir, step: int, writer, check=None, split='val') -> dict:
  """Evaluate, write `<workdir>/eval/<step>/` (report.py; process 0), log the
  table and write the scalars and per-class metrics to `writer` under `split`.
  Another split (the EMA weights' 'val_ema') writes its report to `eval/<step>/<split>/`."""
  metrics = evaluator(variables, check=check)
  counts, scores = metrics.pop('confusion'), metrics.pop('image_miou')
  if jax.process_index() == 0:
    where = storage.path(workdir) / 'eval' / str(step)
    report.write_report(
      where if split == 'val' else where / split,
      {'confusion': counts, 'image_miou': scores},
      evaluator,
      variables,
      config.eval.worst_images,
      evaluator.data.info.class_names or None,
    )
  metric.log_metrics(step, metrics, split)
  writer.write(step, metrics, split)
  return metrics


def run(config, workdir: str) -> dict | None:
  """`--mode=eval`: evaluate `config.init` (any format `loader.load` reads) or,
  if it is 'scratch', the latest checkpoint of `workdir`. None if a SIGTERM
  stopped it (between two batches; there is nothing to save)."""
  config = input_pipeline.with_dataset_defaults(config)  # model.num_classes from the dataset when unset
  workdir = storage.check_writable(workdir)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  model = registry.build_from_config(config)
  # Only the structure matters: every weight comes from the checkpoint.
  shapes = registry.family_of(config.model.name).variable_shapes(config.model.name, config.model.num_classes)
  fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  init = config.init
  if init in ('', 'scratch'):
    init = str(workdir)
    if not (workdir / 'checkpoints').is_dir():
      raise errors.ConfigError(f'--mode=eval needs --config.init=<weights> or a checkpoint in {workdir}/checkpoints')
  full = tuple(k for k in loader.KINDS if k != 'backbone')
  variables = loader.initial_variables(init, fresh, config.model.name, config.model.num_classes, kinds=full)
  writer = metric_writer.MetricWriter(workdir)
  try:
    with preemption.Preemption() as stop:
      return evaluate_and_report(make_evaluator(config, model, mesh), variables, config, workdir, 0, writer, stop.check)
  except preemption.Stopped:
    log.warning('SIGTERM during evaluation: stopped (rerun to evaluate)')
    return None
  finally:
    writer.close()
