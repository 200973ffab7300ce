"""Test-time shape buckets, and the one split of evaluation images over processes.

mmseg pads each test image (after its keep-ratio resize) to a multiple of
``size_divisor`` (32), so every distinct image size is its own input shape.
To compile fewer shapes the padded sizes are rounded further, to a coarser
multiple (``plan_multiple``) or to explicit buckets (``bucket_for``). Extra
zero padding is not numerically neutral for a model with global pooling or
attention: a multiple equal to ``size_divisor`` keeps upstream numerics.

``plan_eval_batches`` groups the images of an evaluation set by bucket and
cuts each group into global batches, of which every process takes its
contiguous slice: every image is evaluated exactly once, by one process,
whichever evaluator runs (the bucketed one and the TTA / slide one read the
same plan).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .transforms import rescale_size, size_to_multiple


def bucket_for(pad_hw: Sequence[int], multiple: int, buckets: Sequence[Sequence[int]] = ()) -> tuple[int, int]:
  """The model input shape of an image whose mmseg padded size is `pad_hw`: the
  smallest explicit bucket (by area) that holds it, else `pad_hw` rounded up
  to `multiple`."""
  for b in sorted((tuple(int(v) for v in b) for b in buckets), key=lambda b: (b[0] * b[1], b)):
    if b[0] >= pad_hw[0] and b[1] >= pad_hw[1]:
      return b
  return size_to_multiple(pad_hw, multiple)


def plan_multiple(sizes: Sequence[Sequence[Sequence[int]]], size_divisor: int, max_buckets: Optional[int]) -> int:
  """The bucket multiple for a known set of images: `size_divisor` doubled until
  the tuples of sizes in `sizes` (e.g. (resized, original) per image) round to
  at most `max_buckets` distinct shapes (`None`: no limit, mmseg's padding)."""
  step = size_divisor
  while (
    max_buckets is not None and len({tuple(size_to_multiple(s, step) for s in item) for item in sizes}) > max_buckets
  ):
    step *= 2
  return step


def plan_buckets(
  orig_sizes: Sequence[tuple[int, int]],
  img_scale: Sequence[int],
  *,
  size_divisor: int = 32,
  max_buckets: Optional[int] = 8,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """Per image ``(image_bucket_hw, label_bucket_hw)``.

  The image bucket contains the mmseg padded size (resized, rounded up to
  ``size_divisor``); the label bucket contains the original size. Both are
  rounded to the same multiple (``plan_multiple``).
  """
  resized = [rescale_size(hw, img_scale)[0] for hw in orig_sizes]
  pairs = list(zip(resized, orig_sizes))
  step = plan_multiple(pairs, size_divisor, max_buckets)
  return [(bucket_for(r, step), bucket_for(o, step)) for r, o in pairs]


def plan_eval_batches(
  keys: Sequence[Any], batch_size: int, shard_index: int, shard_count: int
) -> list[tuple[Any, tuple[int, ...]]]:
  """This process's batches: ``(key, indices)`` per batch, in the same order on
  every process (they step in lockstep for global batches).

  Images are grouped by ``keys[i]`` (their buckets), groups in sorted order;
  each group is cut into global batches of ``batch_size * shard_count``, the
  last one completed with -1 (filler); process ``shard_index`` takes slice
  ``[shard_index * batch_size, (shard_index + 1) * batch_size)`` of each.
  """
  groups: dict[Any, list[int]] = {}
  for i, key in enumerate(keys):
    groups.setdefault(key, []).append(i)
  global_batch = batch_size * shard_count
  plans = []
  for key in sorted(groups):
    members = groups[key]
    for start in range(0, len(members), global_batch):
      chunk = members[start : start + global_batch]
      chunk = chunk + [-1] * (global_batch - len(chunk))
      plans.append((key, tuple(chunk[shard_index * batch_size : (shard_index + 1) * batch_size])))
  return plans
