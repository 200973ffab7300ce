"""The 'segmenter' evaluator: test-time augmentation or slide inference (mmseg
0.27 `aug_test` / `slide_inference`), through `inference.Segmenter`.

Multi-scale/flip TTA needs the original image (every view is resized from
it) and the softmax maps averaged at the original size, so this evaluator
reads the validation records itself and lets the segmenter run the test
pipeline; only per-class areas are kept. It evaluates the same images, split
over processes the same way, as the bucketed evaluator
(`data.input_pipeline.eval_data`).

Config (`config.eval`; `eval.evaluator='auto'` picks this one when TTA or
slide is asked for):

  eval.mode = 'whole' | 'slide'; eval.crop_size, eval.stride (slide windows)
  eval.tta.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)   # ratios of data.img_scale; () = off
  eval.tta.flip = True

  python main.py --mode=eval --config=configs/ade20k_t.py --config.init=cgrseg_t.pth \\
      --config.eval.tta.scales=0.5,0.75,1.0,1.25,1.5,1.75 --config.eval.tta.flip=True
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data import transforms as T
from cgrseg_jax.evaluation import metric
from cgrseg_jax.inference import Segmenter

log = logging.getLogger(__name__)


def options(config) -> dict:
  """Segmenter options from `config.eval`: mode, slide windows and TTA (None: off)."""
  ev = config.eval
  raw = ev.tta.scales or ()
  scales = (float(raw),) if isinstance(raw, (int, float)) else tuple(float(s) for s in raw)
  flip = bool(ev.tta.flip)
  return dict(
    mode=ev.mode,
    crop_size=tuple(ev.crop_size),
    stride=tuple(ev.stride),
    tta=dict(scales=scales or (1.0,), flip=flip) if (scales or flip) else None,
  )


def needed(config) -> bool:
  """Whether `config.eval` asks for what only this evaluator does (TTA or slide)."""
  o = options(config)
  return o['mode'] != 'whole' or o['tta'] is not None


def evaluate_segmenter(
  segmenter,
  source,
  *,
  num_classes: int,
  reduce_zero_label: bool,
  ignore_index: int,
  tta=None,
  mode: Optional[str] = None,
  class_names: Optional[Sequence[str]] = None,
  batch_size: int = 1,
  indices: Optional[Sequence[int]] = None,
  progress: Optional[Callable[[int], None]] = None,
  check: Optional[Callable[[], None]] = None,
) -> dict:
  """mmseg metrics of `segmenter` over `source` records ({'image': BGR uint8,
  'label': uint8}), with `image_miou` {index: mIoU} and the summed (K+1, K+1)
  matrix as `confusion_full`; `indices` restricts to a subset (e.g. this
  process's share). `check()` is called after each batch (preemption: it raises to stop)."""
  indices = list(range(len(source)) if indices is None else indices)
  total = np.zeros((num_classes + 1, num_classes + 1), np.int64)
  scores: dict[int, float] = {}
  t0, done = time.time(), 0
  chunk: list[Any] = []

  def flush():
    nonlocal total, done
    preds = segmenter.predict_batch([np.ascontiguousarray(r['image'][..., ::-1]) for _, r in chunk], tta=tta, mode=mode)
    for (i, rec), pred in zip(chunk, preds):
      label = T.reduce_zero_label(rec['label']) if reduce_zero_label else rec['label']
      if label.shape != pred.shape:
        raise ValueError(f'label of size {label.shape} for an image of size {pred.shape}')
      confusion = metric.confusion_counts(pred[None], label[None], num_classes, ignore_index)
      total += np.asarray(confusion[0], np.int64)
      scores[i] = float(metric.image_miou(metric.areas_from_confusion(confusion))[0])
    done += len(chunk)
    chunk.clear()
    if progress is not None:
      progress(done)
    if check is not None:
      check()

  for i in indices:
    chunk.append((i, source[i]))
    if len(chunk) == batch_size:
      flush()
  if chunk:
    flush()
  metrics = metric.metrics_from_confusion(total, class_names)
  metrics.update(eval_seconds=time.time() - t0, eval_images=done, image_miou=scores, confusion_full=total)
  return metrics


def local_copy(variables):
  """`variables` on this process: the local copy of replicated global arrays
  (a `Segmenter` runs on one process's devices)."""
  return jax.tree_util.tree_map(
    lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a), variables
  )


def make_segmenter(config, model, variables, data, options: dict, reuse: Optional[Segmenter] = None) -> Segmenter:
  """The `Segmenter` of a run's test pipeline (data.img_scale, size_divisor) and
  `options`; `reuse` (one made by an earlier call) gets the new variables and
  keeps its compilations."""
  variables = local_copy(variables)
  if reuse is not None:
    reuse.variables = jax.device_put(variables)
    return reuse
  d, info = config.data, data.info
  return Segmenter(
    model,
    variables,
    dataset=d.dataset,
    img_scale=tuple(d.img_scale),
    size_divisor=d.size_divisor,
    mode=options['mode'],
    crop_size=options['crop_size'],
    stride=options['stride'],
    class_names=info.class_names or None,
    palette=info.palette,
    num_classes=config.model.num_classes,
  )


def predict_records(seg: Segmenter, data, indices: Sequence[int], tta=None) -> list[tuple]:
  """(RGB image, label as evaluated, prediction) of the records `indices` of `data.source`."""
  out = []
  for i in indices:
    rec = data.source[i]
    rgb = np.ascontiguousarray(rec['image'][..., ::-1])
    label = T.reduce_zero_label(rec['label']) if data.info.reduce_zero_label else rec['label']
    out.append((rgb, label, seg.predict(rgb, tta=tta)))
  return out


class SegmenterEvaluator:
  """TTA / slide evaluation on this process's share of the validation split
  (`input_pipeline.eval_data`); areas summed over processes."""

  def __init__(self, config, model, mesh):
    del mesh  # per-image inference on the local devices
    self.config, self.model = config, model
    self.options = options(config)
    self.data = input_pipeline.eval_data(config)
    self.seg: Optional[Segmenter] = None  # made at the first evaluation, then reused

  def __call__(self, variables, check: Optional[Callable[[], None]] = None) -> dict:
    """Metrics of `variables`; `check()` between batches with one process (with
    several, each holds a different number of images, so there is no common
    boundary to stop at before the final sum: a SIGTERM then waits for the end)."""
    info = self.data.info
    names = info.class_names or None
    seg = self.seg = make_segmenter(self.config, self.model, variables, self.data, self.options, self.seg)
    options = self.options
    log.info('evaluating %d images with %s inference, TTA %s', len(self.data.indices), options['mode'], options['tta'])
    metrics = evaluate_segmenter(
      seg,
      self.data.source,
      num_classes=self.config.model.num_classes,
      reduce_zero_label=info.reduce_zero_label,
      ignore_index=info.ignore_index,
      tta=options['tta'],
      class_names=names,
      indices=self.data.indices,
      check=check if jax.process_count() == 1 else None,
    )
    return self._gather(metrics)

  def predict_records(self, variables, indices: Sequence[int]) -> list[tuple]:
    """What the evaluation predicted for `indices`, for the report's panels."""
    self.seg = make_segmenter(self.config, self.model, variables, self.data, self.options, self.seg)
    return predict_records(self.seg, self.data, indices, self.options['tta'])

  def _gather(self, metrics: dict) -> dict:
    names = self.data.info.class_names or None
    confusion = metrics.pop('confusion_full')
    if jax.process_count() > 1:
      confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(0)
      # Each process scored a different number of images: gather fixed-size (index, score) tables.
      table = np.full((self.data.num_samples, 2), -1.0)
      table[: len(metrics['image_miou'])] = list(metrics['image_miou'].items())
      table = np.asarray(multihost_utils.process_allgather(table)).reshape(-1, 2)
      seconds = metrics['eval_seconds']
      metrics = metric.metrics_from_confusion(confusion, names)
      metrics.update(
        eval_seconds=seconds,
        eval_images=self.data.num_samples,
        image_miou={int(i): float(s) for i, s in table if i >= 0},
      )
    return metrics
