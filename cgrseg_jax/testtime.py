"""The mmseg 0.27 test-time pipeline, once (SPEC §7), for every evaluator and for `Segmenter`.

1. keep-ratio resize to `img_scale` (`data.transforms.resize_image`; OpenCV
   bilinear, mmcv's size rule), optionally flipped (`prepare_view`);
2. pad right/bottom to a multiple of `size_divisor` (mmseg), then possibly to a
   coarser *bucket* (`data/buckets.py`) so fewer shapes compile;
3. normalise on the device (`data.pipeline.normalize_image`, padding exactly 0);
4. whole-image forward, or slide windows (`slide_windows`, `slide_logits`);
5. crop the logits to the resized size and resize them bilinearly to the
   original size (`crop_and_resize`, sizes traced so one compile serves a bucket);
   multi-scale/flip TTA (`TTA`) averages softmax maps of every view.

The metric's per-class areas are `evaluation/metric.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors
from cgrseg_jax.data import transforms as T

DEFAULT_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class InferenceError(errors.UserError, ValueError):
  """Bad input or option of the test-time pipeline; the message names the file or value."""


# ----------------------------------------------------------------- views


def scaled_img_scale(img_scale: Sequence[int], ratio: float) -> tuple[int, int]:
  """mmseg `MultiScaleFlipAug`: `(int(s0 * r), int(s1 * r))`."""
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


@dataclasses.dataclass(frozen=True)
class TTA:
  """Multi-scale / flip test-time augmentation (mmseg `MultiScaleFlipAug`).

  `scales` are ratios of `img_scale` (`scaled_img_scale`); `flip` adds a
  horizontally flipped copy of every scale, flipped back before averaging.
  """

  scales: tuple[float, ...] = DEFAULT_TTA_SCALES
  flip: bool = True

  @classmethod
  def parse(cls, tta) -> Optional['TTA']:
    """None / a TTA / a mapping with 'scales' and 'flip'."""
    if tta is None or isinstance(tta, TTA):
      return tta
    if isinstance(tta, Mapping):
      unknown = set(tta) - {'scales', 'flip'}
      if unknown:
        raise InferenceError(f'tta: unknown keys {sorted(unknown)}; expected scales, flip')
      scales = tuple(float(s) for s in tta.get('scales', DEFAULT_TTA_SCALES))
      if not scales or any(s <= 0 for s in scales):
        raise InferenceError(f'tta.scales must be positive ratios, got {scales}')
      return cls(scales, bool(tta.get('flip', False)))
    raise InferenceError(f'tta must be None, a TTA or a dict(scales=..., flip=...), got {tta!r}')

  def views(self) -> list[tuple[float, bool]]:
    """(ratio, flip) pairs in mmseg's order (scale-major, unflipped first)."""
    return [(r, f) for r in self.scales for f in ((False, True) if self.flip else (False,))]


def slide_windows(hw: Sequence[int], crop: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg 0.27 `slide_inference` windows (y1, y2, x1, x2) over an (H, W) image.

  `grids = max(H - crop + stride - 1, 0) // stride + 1` per axis; the last
  window is shifted back inside the image; an image smaller than the crop
  gives a window of the image's size (no padding).
  """
  h, w = int(hw[0]), int(hw[1])
  (ch, cw), (sh, sw) = crop, stride
  if min(ch, cw, sh, sw) <= 0:
    raise InferenceError(f'slide crop {tuple(crop)} and stride {tuple(stride)} must be positive')
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  out = []
  for i in range(rows):
    for j in range(cols):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
  return out


# ------------------------------------------------------ device computations


def slide_logits(apply_fn, x, windows):
  """mmseg slide inference on one normalised padded image x (H, W, 3): all
  windows in one batch through `apply_fn`, logits summed into place and divided
  by the overlap count."""
  crops = jnp.stack([x[y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
  logits = apply_fn(crops)
  h, w = x.shape[:2]
  total = jnp.zeros((h, w, logits.shape[-1]), jnp.float32)
  count = np.zeros((h, w, 1), np.float32)  # static: depends on shapes only
  for k, (y1, y2, x1, x2) in enumerate(windows):
    total = total.at[y1:y2, x1:x2].add(logits[k])
    count[y1:y2, x1:x2] += 1
  return total / count


def _linear_taps(in_size, out_size, n_out: int, flip=None):
  """PyTorch bilinear (align_corners=False) taps from a traced `in_size` to a
  traced `out_size`, at `n_out` static output positions (positions past
  `out_size` are computed but unused). With `flip` the output is mirrored
  inside `[0, out_size)`, which undoes a horizontal flip of the input."""
  d = jnp.arange(n_out, dtype=jnp.int32)
  if flip is not None:
    d = jnp.where(flip, jnp.maximum(out_size - 1 - d, 0), d)
  scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  src = jnp.maximum((d.astype(jnp.float32) + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  return i0, i1, 1.0 - w1, w1


def crop_and_resize(logits, valid_hw, orig_hw, canvas: Sequence[int], flip=None):
  """One image's logits (Hb, Wb, K) at the padded input size: crop to
  `valid_hw`, resize bilinearly to `orig_hw`, placed at the top-left of a
  static `canvas` (H, W); optionally mirrored back (`flip`, a traced bool).
  Sizes are traced, so one compile serves a whole bucket."""
  i0, i1, a0, a1 = _linear_taps(valid_hw[0], orig_hw[0], canvas[0])
  rows = logits[i0] * a0[:, None, None] + logits[i1] * a1[:, None, None]
  j0, j1, b0, b1 = _linear_taps(valid_hw[1], orig_hw[1], canvas[1], flip)
  return rows[:, j0] * b0[None, :, None] + rows[:, j1] * b1[None, :, None]


def prepare_view(image: np.ndarray, img_scale: Sequence[int], size_divisor: int, flip: bool = False):
  """(resized image, resized (h, w), mmseg padded (h, w)) of one test view."""
  resized = T.resize_image(image, img_scale)
  if flip:
    resized = np.ascontiguousarray(resized[:, ::-1])
  hw = resized.shape[:2]
  return resized, (int(hw[0]), int(hw[1])), T.size_to_multiple(hw, size_divisor)


__all__ = [
  'TTA',
  'crop_and_resize',
  'prepare_view',
  'scaled_img_scale',
  'slide_logits',
  'slide_windows',
]
