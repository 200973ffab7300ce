"""The mmseg 0.27 segmentation metric: per-class areas, IoU / Acc, the logged table,
and the confusion matrix and per-image scores they are computed from.

The evaluators count a confusion matrix per image on the device
(`confusion_counts`: rows ground truth, columns prediction) and sum it over
the batch, so only a (K+1, K+1) matrix and a (B,) score vector come back to
the host; the matrices are summed over the whole evaluation set in int64 (JAX
has no int64 without x64; one batch's int32 counts are far from overflowing).
`areas_from_confusion` gives the areas of mmseg's `intersect_and_union`
(`area_counts`, kept as the direct formula and the benchmark's baseline);
`metrics_from_areas` is `total_area_to_metrics`:
IoU = I / U and Acc = I / label area per class (NaN for a class absent from
both prediction and ground truth, resp. from the ground truth); mIoU / mAcc
are NaN-means over classes; aAcc = sum I / sum label area. Pixels labelled
with the dataset's ignore index are left out (reduce_zero_label has already
been applied by the pipeline).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def area_counts(pred, label, num_classes: int, ignore_index: int):
  """(4, K) int32: intersection, union, prediction and label areas (mmseg
  `intersect_and_union`). Pixels labelled `ignore_index` are dropped; ids
  outside [0, K) are counted nowhere (as mmseg's `histc` drops them)."""
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(-1)
  valid = label != ignore_index
  k = num_classes

  # Out-of-range ids go to the overflow bin k, which is dropped.
  def hist(ids, mask):
    ids = jnp.where(mask & (ids >= 0) & (ids < k), ids, k)
    return jnp.zeros((k + 1,), jnp.int32).at[ids].add(1)[:k]

  area_pred = hist(pred, valid)
  area_label = hist(label, valid)
  area_inter = hist(label, valid & (pred == label))
  area_union = area_pred + area_label - area_inter
  return jnp.stack([area_inter, area_union, area_pred, area_label])


def confusion_counts(pred, label, num_classes: int, ignore_index: int):
  """(B, K+1, K+1) int32 per image of (B, ...) `pred` and `label`: entry
  [t, p] counts the pixels labelled t and predicted p. Ids outside [0, K) go
  to row / column K (so every pixel that `area_counts` counts somewhere is
  here); pixels labelled `ignore_index` are counted nowhere."""
  k1 = num_classes + 1
  b = pred.shape[0]
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(b, -1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(b, -1)
  inside = lambda ids: jnp.where((ids >= 0) & (ids < num_classes), ids, num_classes)
  cell = inside(label) * k1 + inside(pred) + jnp.arange(b, dtype=jnp.int32)[:, None] * k1 * k1
  # Ignore pixels go to one extra bin past the last image's matrix, dropped below.
  cell = jnp.where(label == ignore_index, b * k1 * k1, cell)
  counts = jnp.zeros((b * k1 * k1 + 1,), jnp.int32).at[cell.reshape(-1)].add(1)
  return counts[:-1].reshape(b, k1, k1)


def areas_from_confusion(confusion):
  """(..., 4, K) intersection, union, prediction and label areas of (..., K+1, K+1)
  `confusion_counts`: what `area_counts` gives for the same pixels."""
  k = confusion.shape[-1] - 1
  inter = confusion[..., :k, :k].diagonal(axis1=-2, axis2=-1)
  area_pred = confusion[..., :k].sum(-2)  # every label row, the overflow row included
  area_label = confusion[..., :k, :].sum(-1)
  union = area_pred + area_label - inter
  stack = jnp.stack if isinstance(confusion, jnp.ndarray) else np.stack
  return stack([inter, union, area_pred, area_label], axis=-2)


def image_miou(areas):
  """(B,) mean IoU of each image over the classes present in its label or its
  prediction (union > 0), from (B, 4, K) areas; NaN for an image with no
  valid pixel. Float32 on the device."""
  inter, union = areas[..., 0, :].astype(jnp.float32), areas[..., 1, :].astype(jnp.float32)
  present = union > 0
  iou = jnp.where(present, inter / jnp.where(present, union, 1.0), 0.0)
  return iou.sum(-1) / present.sum(-1)


def metrics_from_confusion(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict:
  """`metrics_from_areas` of a summed (K+1, K+1) confusion matrix, plus each
  class's most-confused class and the (K, K) matrix itself (`confusion`)."""
  confusion = np.asarray(confusion, np.int64)
  metrics = metrics_from_areas(areas_from_confusion(confusion), class_names)
  k = confusion.shape[0] - 1
  square = confusion[:k, :k]
  off = square.copy()
  np.fill_diagonal(off, 0)
  rows = square.sum(1)
  for i, (name, m) in enumerate(metrics['per_class'].items()):
    j = int(off[i].argmax())
    if off[i, j] > 0:
      m['confused_with'] = list(metrics['per_class'])[j]
      m['confused_rate'] = float(off[i, j] / rows[i])
    else:
      m['confused_with'], m['confused_rate'] = None, 0.0
  metrics['confusion'] = square
  return metrics


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
  """The per-class table mmseg logs (percentages, 2 decimals), with each class's
  most-confused class (the share of its pixels predicted as it) when known, then the summary."""
  rows = [('Class', 'IoU', 'Acc', 'Most confused with')]
  for name, m in metrics['per_class'].items():
    other = m.get('confused_with')
    confused = f'{other} ({100 * m["confused_rate"]:.1f}%)' if other is not None else '-'
    rows.append((name, f'{100 * m["IoU"]:.2f}', f'{100 * m["Acc"]:.2f}', confused))
  width = max(len(r[0]) for r in rows)
  lines = [f'{r[0]:<{width}} | {r[1]:>6} | {r[2]:>6} | {r[3]}'.rstrip() for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  lines.append(
    f'Summary: aAcc {100 * metrics["aAcc"]:.2f}  mIoU {100 * metrics["mIoU"]:.2f}  mAcc {100 * metrics["mAcc"]:.2f}'
  )
  return '\n'.join(lines)


def log_metrics(step: int, metrics: dict, split: str = 'val'):
  count = metrics.get('eval_images', metrics.get('eval_batches'))
  what = 'validation' if split == 'val' else f'validation ({split})'
  log.info('step %d %s (%s, %.1fs):\n%s', step, what, count, metrics['eval_seconds'], format_table(metrics))
