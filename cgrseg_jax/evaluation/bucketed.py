"""The 'bucketed' evaluator: single-scale whole-image inference on the eval
input pipeline's pre-bucketed, sharded batches (`data.input_pipeline.eval_data`).

Inference (mmseg `whole_inference` with the test pipeline, `testtime.py`):
the image is resized keeping its ratio and padded right/bottom to a multiple
of 32 (then to its bucket) by the input pipeline; here the logits (at the
padded input size) are cropped to the resized image, resized bilinearly to
the original size and arg-maxed (softmax does not change the argmax). Each
image's confusion matrix (`metric.confusion_counts`) and mIoU are computed on
the device; the matrices are summed over the sharded batch, so one
(K+1, K+1) matrix and (B,) scores come back to the host. One compile per
bucket shape.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cgrseg_jax import platforms, testtime
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.evaluation import metric, segmenter


def predict_batch(model, variables, batch, normalize: Callable):
  """(B, label_h, label_w) int32 predictions of an eval batch at its label size."""
  logits = model.apply(variables, normalize(batch['image'], batch['valid_hw']), train=False)  # padded input size
  out_shape = batch['label'].shape[1:3]
  return jax.vmap(lambda l, v, o: jnp.argmax(testtime.crop_and_resize(l, v, o, out_shape), axis=-1))(
    logits, batch['valid_hw'], batch['orig_hw']
  )


def make_eval_step(model, mesh, num_classes: int, ignore_index: int, normalize: Callable):
  """jit(variables, batch) -> {'confusion': (K+1, K+1) summed over the global
  batch, 'image_miou': (B,), 'index': (B,) the batch's sample ids (-1: filler)}.

  `batch` is the pipeline's eval batch (uint8 BGR `image` padded to its
  bucket, `valid_hw`, `orig_hw`, `label` at the label bucket); the batch
  axis is sharded over the mesh 'data' axis, variables are replicated.
  """

  def step(variables, batch):
    pred = predict_batch(model, variables, batch, normalize)
    confusion = metric.confusion_counts(pred, batch['label'], num_classes, ignore_index)
    return {
      'confusion': confusion.sum(0),
      'image_miou': metric.image_miou(metric.areas_from_confusion(confusion)),
      'index': batch['index'],
    }

  return jax.jit(
    step,
    in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))),
    out_shardings=NamedSharding(mesh, P()),
  )


def abstract_batch(sharding, batch: int, hw) -> dict:
  """An eval batch of `batch` images padded to `hw` (label bucket = image bucket) as
  ShapeDtypeStructs with `sharding`: what `make_eval_step` takes, for lowering alone."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  h, w = hw
  return {
    'image': spec((batch, h, w, 3), jnp.uint8),
    'valid_hw': spec((batch, 2), jnp.int32),
    'orig_hw': spec((batch, 2), jnp.int32),
    'label': spec((batch, h, w), jnp.uint8),
    'index': spec((batch,), jnp.int32),
  }


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
  """Run `eval_step` over every batch and turn the summed confusion matrix into
  metrics, with `image_miou` {sample index: mIoU} of every image. `check()` is
  called after each batch's previous one is read (preemption: it raises to
  stop; every process has the same batches, so the same boundaries).

  The matrix is accumulated on the host in int64 (a batch's int32 counts are
  far from overflowing; a whole dataset's could)."""
  total = np.zeros((num_classes + 1, num_classes + 1), np.int64)
  scores: dict[int, float] = {}

  def add(out):
    nonlocal total
    out = jax.device_get(out)
    total += np.asarray(out['confusion'], np.int64)
    for i, s in zip(out['index'].tolist(), out['image_miou'].tolist()):
      if i >= 0:
        scores[i] = s

  pending = None
  t0 = time.time()
  n = 0
  for local in eval_data:
    out = eval_step(variables, make_global_batch(local))
    if pending is not None:  # keep one batch in flight
      add(pending)
    pending = out
    n += 1
    if progress is not None:
      progress(n)
    if check is not None:
      check()
  if pending is not None:
    add(pending)
  metrics = metric.metrics_from_confusion(total, class_names)
  metrics['image_miou'] = scores
  metrics['eval_seconds'] = time.time() - t0
  metrics['eval_batches'] = n
  return metrics


@functools.lru_cache(maxsize=4)
def cached_eval_step(model, mesh, num_classes: int, ignore_index: int):
  platform = platforms.mesh_platform(mesh)
  normalize = lambda img, hw: dp.normalize_image(img, hw, dtype=model.dtype, platform=platform)
  return make_eval_step(model, mesh, num_classes, ignore_index, normalize)


class BucketedEvaluator:
  """The eval split through `input_pipeline.eval_data`, one jitted step per bucket shape."""

  def __init__(self, config, model, mesh):
    self.config, self.model, self.mesh = config, model, mesh
    self.seg = None  # the panels' Segmenter, made at the first report, then reused
    self.data = input_pipeline.eval_data(config)
    self.step = cached_eval_step(model, mesh, config.model.num_classes, self.data.info.ignore_index)

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

  def predict_records(self, variables, indices: Sequence[int]) -> list[tuple]:
    """Predictions of `indices` for the report's panels, by mmseg's whole-image
    inference (`Segmenter`): the padding to the exact multiple of
    data.size_divisor rather than to the bucket may move a few pixels."""
    whole = dict(segmenter.options(self.config), mode='whole', tta=None)
    self.seg = segmenter.make_segmenter(self.config, self.model, variables, self.data, whole, self.seg)
    return segmenter.predict_records(self.seg, self.data, indices)
