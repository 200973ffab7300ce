"""The 'segmenter' evaluator: test-time augmentation or slide inference (mmseg
0.27 `aug_test` / `slide_inference`), through `inference.Segmenter`.

The default evaluation (`evaluate.make_eval_step`) is single-scale whole-image
inference on pre-bucketed batches. Multi-scale/flip TTA needs the original
image (every view is resized from it) and the softmax maps averaged at the
original size, so this path reads the validation source record by record and
lets the segmenter do the test pipeline; only per-class areas are kept.

Config (`config.eval`, all optional; `eval.evaluator='auto'` picks this one
when TTA or slide is asked for):

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

import numpy as np

from cgrseg_jax import evaluate, testtime
from cgrseg_jax.data import transforms as T

log = logging.getLogger(__name__)


def eval_options(config) -> Optional[dict]:
  """Segmenter options from `config.eval`, or None when the default
  single-scale whole-image evaluation applies."""
  ev = config.get('eval') if hasattr(config, 'get') else None
  if ev is None:
    return None
  mode = ev.get('mode', 'whole')
  tta = ev.get('tta')
  raw = (tta.get('scales') or ()) if tta is not None else ()
  scales = (float(raw),) if isinstance(raw, (int, float)) else tuple(float(s) for s in raw)
  flip = bool(tta.get('flip', False)) if tta is not None else False
  if mode == 'whole' and not scales and not flip:
    return None
  return dict(
    mode=mode,
    crop_size=tuple(ev.get('crop_size', (512, 512))),
    stride=tuple(ev.get('stride', (341, 341))),
    tta=dict(scales=scales or (1.0,), flip=flip) if (scales or flip) else None,
  )


def evaluate_segmenter(
  segmenter,
  source,
  *,
  num_classes: int,
  reduce_zero_label: bool,
  tta=None,
  mode: Optional[str] = None,
  class_names: Optional[Sequence[str]] = None,
  batch_size: int = 1,
  indices: Optional[Sequence[int]] = None,
  progress: Optional[Callable[[int], None]] = None,
) -> dict:
  """mmseg metrics of `segmenter` over `source` records ({'image': BGR uint8,
  'label': uint8}); `indices` restricts to a subset (e.g. this process's share)."""
  indices = range(len(source)) if indices is None else indices
  total = np.zeros((4, num_classes), np.int64)
  t0, done = time.time(), 0
  chunk: list[Any] = []

  def flush():
    nonlocal total, done
    preds = segmenter.predict_batch([np.ascontiguousarray(r['image'][..., ::-1]) for r in chunk], tta=tta, mode=mode)
    for rec, pred in zip(chunk, preds):
      label = T.reduce_zero_label(rec['label']) if reduce_zero_label else rec['label']
      if label.shape != pred.shape:
        raise ValueError(f'label of size {label.shape} for an image of size {pred.shape}')
      total += np.asarray(testtime.area_counts(pred, label, num_classes), np.int64)
    done += len(chunk)
    chunk.clear()
    if progress is not None:
      progress(done)

  for i in indices:
    chunk.append(source[i])
    if len(chunk) == batch_size:
      flush()
  if chunk:
    flush()
  metrics = evaluate.metrics_from_areas(total, class_names)
  metrics.update(eval_seconds=time.time() - t0, eval_images=done, areas=total.tolist())
  return metrics


@evaluate.register_evaluator('segmenter')
class SegmenterEvaluator:
  """TTA / slide evaluation on the config's validation split (each process its
  strided share; areas summed over processes)."""

  def __init__(self, config, model, mesh):
    import jax
    from cgrseg_jax import batches
    from cgrseg_jax.data import pipeline as dp

    del mesh  # per-image inference on the local devices
    self.config, self.model = config, model
    self.options = eval_options(config) or dict(mode='whole', crop_size=(512, 512), stride=(341, 341), tta=None)
    self.img_scale, self.size_divisor = batches.eval_resize_and_padding(config)
    d = config.data
    self.source, self.info = dp.resolve_source(
      d.dataset,
      d.root,
      d.val_split,
      source_kwargs=batches.source_kwargs(config, 'val') or None,
      num_classes=config.model.num_classes,
    )
    self.n = len(self.source) if not d.get('eval_max_images') else min(len(self.source), int(d.eval_max_images))
    self.mine = list(range(jax.process_index(), self.n, jax.process_count()))

  def __call__(self, variables) -> dict:
    import jax
    from cgrseg_jax.inference import Segmenter

    d, options = self.config.data, self.options
    names = self.info.class_names or None
    seg = Segmenter(
      self.model,
      variables,
      dataset=d.dataset,
      img_scale=self.img_scale,
      size_divisor=self.size_divisor,
      mode=options['mode'],
      crop_size=options['crop_size'],
      stride=options['stride'],
      class_names=names,
    )
    log.info('evaluating %d images with %s inference, TTA %s', len(self.mine), options['mode'], options['tta'])
    metrics = evaluate_segmenter(
      seg,
      self.source,
      num_classes=self.config.model.num_classes,
      reduce_zero_label=self.info.reduce_zero_label,
      tta=options['tta'],
      class_names=names,
      indices=self.mine,
    )
    areas = np.asarray(metrics.pop('areas'), np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      areas = np.asarray(multihost_utils.process_allgather(areas)).sum(0)
      seconds = metrics['eval_seconds']
      metrics = evaluate.metrics_from_areas(areas, names)
      metrics.update(eval_seconds=seconds, eval_images=self.n)
    return metrics
