"""The mmseg 0.27 segmentation metric: per-class areas, IoU / Acc, the logged table.

`area_counts` is mmseg's `intersect_and_union` for one batch (on the device,
so only (4, K) vectors come back to the host); the areas are summed over the
whole evaluation set in int64; `metrics_from_areas` is `total_area_to_metrics`:
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


def log_metrics(step: int, metrics: dict):
  count = metrics.get('eval_images', metrics.get('eval_batches'))
  log.info('step %d validation (%s, %.1fs):\n%s', step, count, metrics['eval_seconds'], format_table(metrics))
