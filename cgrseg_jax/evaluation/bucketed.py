"""The 'bucketed' evaluator: single-scale whole-image inference on the eval
input pipeline's pre-bucketed, sharded batches (`data.input_pipeline.eval_data`).

Inference (mmseg `whole_inference` with the test pipeline, `testtime.py`):
the image is resized keeping its ratio and padded right/bottom to a multiple
of 32 (then to its bucket) by the input pipeline; here the logits (at the
padded input size) are cropped to the resized image, resized bilinearly to
the original size and arg-maxed (softmax does not change the argmax). The
per-image areas (`metric.area_counts`) are computed on the device and summed
over the sharded batch, so only (K,) vectors come back to the host. One
compile per bucket shape.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cgrseg_jax import testtime
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.evaluation import metric


def make_eval_step(model, mesh, num_classes: int, ignore_index: int, normalize: Callable):
  """jit(variables, batch) -> (4, K) summed areas over the global batch.

  `batch` is the pipeline's eval batch (uint8 BGR `image` padded to its
  bucket, `valid_hw`, `orig_hw`, `label` at the label bucket); the batch
  axis is sharded over the mesh 'data' axis, variables are replicated.
  """

  def step(variables, batch):
    x = normalize(batch['image'], batch['valid_hw'])
    logits = model.apply(variables, x, train=False)  # at the padded input size
    out_shape = batch['label'].shape[1:3]
    pred = jax.vmap(lambda l, v, o: jnp.argmax(testtime.crop_and_resize(l, v, o, out_shape), axis=-1))(
      logits, batch['valid_hw'], batch['orig_hw']
    )
    return metric.area_counts(pred, batch['label'], num_classes, ignore_index)

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
  check: Optional[Callable[[], None]] = None,
) -> dict:
  """Run `eval_step` over every batch and turn the summed areas into metrics.
  `check()` is called after each batch's previous one is read (preemption: it
  raises to stop; every process has the same batches, so the same boundaries).

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
    if check is not None:
      check()
  if pending is not None:
    total += np.asarray(pending, np.int64)
  metrics = metric.metrics_from_areas(total, class_names)
  metrics['eval_seconds'] = time.time() - t0
  metrics['eval_batches'] = n
  return metrics


@functools.lru_cache(maxsize=4)
def _eval_step(model, mesh, num_classes: int, ignore_index: int):
  normalize = lambda img, hw: dp.normalize_image(img, hw, dtype=model.dtype)
  return make_eval_step(model, mesh, num_classes, ignore_index, normalize)


class BucketedEvaluator:
  """The eval split through `input_pipeline.eval_data`, one jitted step per bucket shape."""

  def __init__(self, config, model, mesh):
    self.config, self.mesh = config, mesh
    self.data = input_pipeline.eval_data(config)
    self.step = _eval_step(model, mesh, config.model.num_classes, self.data.info.ignore_index)

  def __call__(self, variables, check: Optional[Callable[[], None]] = None) -> dict:
    repl = NamedSharding(self.mesh, P())
    variables = jax.tree_util.tree_map(lambda v: jax.device_put(v, repl), variables)
    return evaluate(
      self.step,
      variables,
      self.data,
      lambda b: dp.make_global_batch(b, self.mesh),
      self.config.model.num_classes,
      self.data.info.class_names or None,
      check=check,
    )
