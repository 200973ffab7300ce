"""Whole-image evaluation with the mmseg 0.27 metric.

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

import time
import warnings
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


# ------------------------------------------------------------------ areas


def area_counts(pred, label, num_classes: int, ignore_index: int = IGNORE_INDEX):
  """(4, K) int32: intersection, union, prediction and label areas of one batch.

  pred, label: integer arrays of the same shape. Labels outside [0, K) other
  than `ignore_index` are counted nowhere (as mmseg's `histc` drops them).
  """
  pred = pred.astype(jnp.int32).reshape(-1)
  label = label.astype(jnp.int32).reshape(-1)
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


# -------------------------------------------------------- post-processing


def _linear_taps(in_size, out_size, n_out: int):
  """PyTorch bilinear (align_corners False) taps for a *traced* in/out size,
  evaluated at the n_out static output positions (those >= out_size unused)."""
  d = jnp.arange(n_out, dtype=jnp.float32)
  scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  src = jnp.maximum((d + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  return i0, i1, 1.0 - w1, w1


def crop_and_resize(logits, valid_hw, orig_hw, out_shape):
  """Per image: logits[:h, :w] resized bilinearly to (oh, ow), placed in an
  `out_shape` canvas. Sizes are traced, so one compile serves a whole bucket.

  logits: (Hb, Wb, K); valid_hw, orig_hw: (2,) int32.
  """
  h, w = valid_hw[0], valid_hw[1]
  oh, ow = orig_hw[0], orig_hw[1]
  i0, i1, a0, a1 = _linear_taps(h, oh, out_shape[0])
  rows = logits[i0] * a0[:, None, None] + logits[i1] * a1[:, None, None]
  j0, j1, b0, b1 = _linear_taps(w, ow, out_shape[1])
  return rows[:, j0] * b0[None, :, None] + rows[:, j1] * b1[None, :, None]


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
    pred = jax.vmap(lambda l, v, o: jnp.argmax(crop_and_resize(l, v, o, out_shape), axis=-1))(
      logits, batch['valid_hw'], batch['orig_hw']
    )
    return area_counts(pred, batch['label'], num_classes, ignore_index)

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
