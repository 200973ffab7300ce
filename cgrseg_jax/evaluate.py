"""Evaluation with the mmseg 0.27 metric; evaluators are plugins chosen in the config.

`config.eval.evaluator` names one of `EVALUATORS` ('auto': 'segmenter' when
TTA or slide inference is asked for, else 'bucketed'):

- 'bucketed' (this module): single-scale whole-image inference on the eval
  input pipeline's pre-bucketed, sharded batches; only (K,) areas come back;
- 'segmenter' (evaluate_tta.py): per image through `inference.Segmenter`, for
  multi-scale/flip TTA and slide inference.

Both use the one test-time pipeline (`testtime.py`). `run` is `--mode=eval`.

Metric (mmseg `intersect_and_union` + `total_area_to_metrics`): per class, the
areas of intersection, union, prediction and label are summed over the whole
evaluation set; IoU = I / U and Acc = I / label area per class (NaN for a class
absent from both prediction and ground truth, resp. from the ground truth);
mIoU / mAcc are NaN-means over classes; aAcc = sum I / sum label area. Pixels
labelled 255 are ignored (the pipeline has already applied reduce_zero_label).

Inference (mmseg `whole_inference` with the test pipeline): the image is
resized keeping its ratio and padded right/bottom to a multiple of 32 by the
input pipeline; here the logits (at the padded input size) are cropped to the
resized image, resized bilinearly to the original size and arg-maxed (softmax
does not change the argmax). The per-image areas are computed on the device
and summed over the sharded batch, so only (K,) vectors come back to the host.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import testtime

log = logging.getLogger(__name__)
IGNORE_INDEX = testtime.IGNORE_INDEX


# ---------------------------------------------------------------- metric


def metrics_from_areas(areas: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict:
  """mmseg's `total_area_to_metrics` for ('mIoU',) + aAcc/mAcc, from summed (4, K) areas."""
  inter, union, _, label = (np.asarray(a, np.float64) for a in areas)
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = inter / union
    acc = inter / label
    aacc = inter.sum() / label.sum()
  k = len(inter)
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f'{len(names)} class names for {k} classes')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # nanmean of an all-NaN vector is NaN, as in mmseg
    miou, macc = float(np.nanmean(iou)), float(np.nanmean(acc))
  return {
    'mIoU': miou,
    'mAcc': macc,
    'aAcc': float(aacc),
    'per_class': {n: {'IoU': float(i), 'Acc': float(a)} for n, i, a in zip(names, iou, acc)},
  }


def format_table(metrics: dict) -> str:
  """The per-class table mmseg logs (percentages, 2 decimals), then the summary."""
  rows = [('Class', 'IoU', 'Acc')]
  for name, m in metrics['per_class'].items():
    rows.append((name, f'{100 * m["IoU"]:.2f}', f'{100 * m["Acc"]:.2f}'))
  width = max(len(r[0]) for r in rows)
  lines = [f'{r[0]:<{width}} | {r[1]:>6} | {r[2]:>6}' for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  lines.append(
    f'Summary: aAcc {100 * metrics["aAcc"]:.2f}  mIoU {100 * metrics["mIoU"]:.2f}  mAcc {100 * metrics["mAcc"]:.2f}'
  )
  return '\n'.join(lines)


# ------------------------------------------------- bucketed whole-image


def make_eval_step(model, mesh, num_classes: int, normalize: Callable, ignore_index: int = IGNORE_INDEX):
  """jit(variables, batch) -> (4, K) summed areas over the global batch.

  `batch` is the pipeline's eval batch (uint8 BGR `image` padded to its
  bucket, `valid_hw`, `orig_hw`, `label` at the label bucket); the batch
  axis is sharded over the mesh 'data' axis, variables are replicated.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P

  def step(variables, batch):
    x = normalize(batch['image'], batch['valid_hw'])
    logits = model.apply(variables, x, train=False)  # at the padded input size
    out_shape = batch['label'].shape[1:3]
    pred = jax.vmap(lambda l, v, o: jnp.argmax(testtime.crop_and_resize(l, v, o, out_shape), axis=-1))(
      logits, batch['valid_hw'], batch['orig_hw']
    )
    return testtime.area_counts(pred, batch['label'], num_classes, ignore_index)

  return jax.jit(
    step,
    in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))),
    out_shardings=NamedSharding(mesh, P()),
  )


def evaluate(
  eval_step,
  variables,
  eval_data: Iterable,
  make_global_batch: Callable,
  num_classes: int,
  class_names: Optional[Sequence[str]] = None,
  progress: Optional[Callable[[int], None]] = None,
) -> dict:
  """Run `eval_step` over every batch and turn the summed areas into metrics.

  Areas are accumulated on the host in int64 (a batch's int32 counts are far
  from overflowing; a whole dataset's could)."""
  total = np.zeros((4, num_classes), np.int64)
  pending = None
  t0 = time.time()
  n = 0
  for local in eval_data:
    areas = eval_step(variables, make_global_batch(local))
    if pending is not None:  # keep one batch in flight
      total += np.asarray(pending, np.int64)
    pending = areas
    n += 1
    if progress is not None:
      progress(n)
  if pending is not None:
    total += np.asarray(pending, np.int64)
  metrics = metrics_from_areas(total, class_names)
  metrics['eval_seconds'] = time.time() - t0
  metrics['eval_batches'] = n
  return metrics


# ------------------------------------------------------------ evaluators

# name -> factory(config, model, mesh) -> evaluator; evaluator(variables) -> metrics.
EVALUATORS: dict[str, Callable] = {}


def register_evaluator(name: str):
  def wrap(factory):
    EVALUATORS[name] = factory
    return factory

  return wrap


@register_evaluator('bucketed')
class BucketedEvaluator:
  """The eval split through `batches.eval_data`, one jitted step per bucket shape."""

  def __init__(self, config, model, mesh):
    from cgrseg_jax import batches

    self.config, self.mesh = config, mesh
    self.data = batches.eval_data(config)
    self.step = _eval_step(model, mesh, config.model.num_classes)

  def __call__(self, variables) -> dict:
    from cgrseg_jax.data import pipeline as dp

    from jax.sharding import NamedSharding, PartitionSpec as P

    repl = NamedSharding(self.mesh, P())
    variables = jax.tree_util.tree_map(lambda v: jax.device_put(v, repl), variables)
    return evaluate(
      self.step,
      variables,
      self.data,
      lambda b: dp.make_global_batch(b, self.mesh),
      self.config.model.num_classes,
      self.data.info.class_names or None,
    )


@functools.lru_cache(maxsize=4)
def _eval_step(model, mesh, num_classes):
  from cgrseg_jax.data import pipeline as dp

  normalize = lambda img, hw: dp.normalize_image(img, hw, dtype=model.dtype)
  return make_eval_step(model, mesh, num_classes, normalize)


def make_evaluator(config, model, mesh):
  """The evaluator `config.eval.evaluator` names ('auto': 'segmenter' when
  `config.eval` asks for TTA or slide inference, else 'bucketed')."""
  from cgrseg_jax import evaluate_tta  # the 'segmenter' plugin registers itself

  ev = config.get('eval')
  name = ev.get('evaluator', 'auto') if ev is not None else 'auto'
  if name == 'auto':
    name = 'bucketed' if evaluate_tta.eval_options(config) is None else 'segmenter'
  if name not in EVALUATORS:
    from cgrseg_jax import errors

    raise errors.ConfigError(f'config.eval.evaluator={name!r}; expected auto or one of {sorted(EVALUATORS)}')
  return EVALUATORS[name](config, model, mesh)


def log_metrics(step: int, metrics: dict):
  count = metrics.get('eval_images', metrics.get('eval_batches'))
  log.info('step %d validation (%s, %.1fs):\n%s', step, count, metrics['eval_seconds'], format_table(metrics))


def run(config, workdir: str) -> dict:
  """`--mode=eval`: evaluate `config.init` (any format `loader.load` reads) or,
  if it is 'scratch', the latest checkpoint of `workdir`."""
  from jax.sharding import Mesh

  from cgrseg_jax import batches, errors, loader, metric_writer
  from cgrseg_jax.models import registry

  config = batches.with_dataset_defaults(config)  # model.num_classes from the dataset when unset
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
    log_metrics(0, metrics)
    writer.write(0, metrics, 'val')
    return metrics
  finally:
    writer.close()
