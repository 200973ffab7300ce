"""Evaluation with the mmseg 0.27 metric; evaluators are plugins chosen by name.

- `metric.py`: per-class areas, IoU / Acc / mIoU / mAcc / aAcc, the logged table;
- `bucketed.py`: single-scale whole-image inference on pre-bucketed, sharded batches;
- `segmenter.py`: per image through `inference.Segmenter`, for multi-scale/flip
  TTA and slide inference.

`EVALUATORS` maps `config.eval.evaluator` to them ('auto': 'segmenter' when
`config.eval` asks for TTA or slide, else 'bucketed'); training-time
evaluation and `--mode=eval` (`run`) both go through `make_evaluator`. An
evaluator is `factory(config, model, mesh)`, called with variables, returning
the metrics dict.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from cgrseg_jax import errors, loader, metric_writer
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.evaluation import bucketed, metric, segmenter
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


def run(config, workdir: str) -> dict:
  """`--mode=eval`: evaluate `config.init` (any format `loader.load` reads) or,
  if it is 'scratch', the latest checkpoint of `workdir`."""
  config = input_pipeline.with_dataset_defaults(config)  # model.num_classes from the dataset when unset
  os.makedirs(workdir, exist_ok=True)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  model = registry.build_from_config(config)
  # Only the structure matters: every weight comes from the checkpoint.
  shapes = registry.family_of(config.model.name).variable_shapes(config.model.name, config.model.num_classes)
  fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  init = config.init
  if init in ('', 'scratch'):
    init = workdir
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise errors.ConfigError(f'--mode=eval needs --config.init=<weights> or a checkpoint in {workdir}/checkpoints')
  full = tuple(k for k in loader.KINDS if k != 'backbone')
  variables = loader.initial_variables(init, fresh, config.model.name, config.model.num_classes, kinds=full)
  writer = metric_writer.MetricWriter(workdir)
  try:
    metrics = make_evaluator(config, model, mesh)(variables)
    metric.log_metrics(0, metrics)
    writer.write(0, metrics, 'val')
    return metrics
  finally:
    writer.close()
