"""Tiled inference of images too large for whole-image or slide inference.

mmseg's slide inference keeps the summed logits of the whole image, (H, W, K)
float32: 9.5 GB for a 10k x 10k aerial tile of 24 classes. Here the windows
are the same (`testtime.slide_windows` over the image padded to the size
divisor, at the image's own resolution) and their logits are summed the same
way, but one window row at a time into a band of `crop` rows; the
rows no later window touches are arg-maxed and handed out, then dropped. The
model is compiled once, for (window_batch, crop_h, crop_w, 3); a window row's
windows go through it `window_batch` at a time. Host memory is bounded by the
band, crop_h x W x K floats, not by the image area.

    tiles = TiledSegmenter(segmenter, crop_size=(512, 512), stride=(341, 341))
    labels = tiles.predict(image)                 # (H, W) int32
    for y0, rows in tiles.bands(image): ...       # or stream the label rows out
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from cgrseg_jax import testtime
from cgrseg_jax.data.transforms import size_to_multiple
from cgrseg_jax.data.pipeline import normalize_image
from cgrseg_jax.inference import Segmenter
from cgrseg_jax.testtime import InferenceError


class TiledSegmenter:
  """Band-by-band slide inference with the model and weights of `segmenter`.

  Args:
    segmenter: gives the model, variables, class count and size divisor.
    crop_size, stride: the slide windows (as mmseg's test_cfg).
    window_batch: windows per forward (the one compiled batch size).
  """

  def __init__(self, segmenter: Segmenter, crop_size: Sequence[int], stride: Sequence[int], window_batch: int = 8):
    self.segmenter = segmenter
    self.crop = tuple(int(v) for v in crop_size)
    self.stride = tuple(int(v) for v in stride)
    if min(self.crop + self.stride) <= 0 or self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]:
      raise InferenceError(f'crop_size {self.crop} and stride {self.stride}: expected 0 < stride <= crop')
    self.window_batch = int(window_batch)
    self.traces = segmenter.traces  # one counter for every compile of this model
    self._forward = jax.jit(self._forward_impl)

  def _forward_impl(self, variables, windows_u8, valid_hw):
    self.traces[('tiled',) + windows_u8.shape] += 1
    return self.segmenter.model.apply(variables, normalize_image(windows_u8, valid_hw, bgr_to_rgb=False), train=False)

  def _window_logits(self, image: np.ndarray, windows: list) -> Iterator[tuple[tuple, np.ndarray]]:
    """((y1, y2, x1, x2), (ch, cw, K) float32 logits) of `windows` of the padded image, one batch at a time."""
    h, w = image.shape[:2]
    ch, cw = self.crop
    batch = np.zeros((self.window_batch, ch, cw, 3), np.uint8)
    valid = np.zeros((self.window_batch, 2), np.int32)
    for start in range(0, len(windows), self.window_batch):
      chunk = windows[start : start + self.window_batch]
      batch[:], valid[:] = 0, 0
      for k, (y1, _, x1, _) in enumerate(chunk):
        part = image[y1 : min(y1 + ch, h), x1 : min(x1 + cw, w)]  # beyond the image: padding, exactly 0
        batch[k, : part.shape[0], : part.shape[1]] = part
        valid[k] = part.shape[:2]
      logits = np.asarray(self._forward(self.segmenter.variables, batch, valid))
      yield from zip(chunk, logits)

  def bands(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, label rows (n, W) int32) of an RGB uint8 image, top to bottom."""
    image = Segmenter._check_image(image, 'image')
    h, w = image.shape[:2]
    hp, wp = size_to_multiple((h, w), self.segmenter.size_divisor)
    ch, cw = self.crop
    if hp < ch or wp < cw:
      raise InferenceError(
        f'image of {h}x{w} (padded {hp}x{wp}) is smaller than the window {ch}x{cw}: use Segmenter slide inference'
      )
    rows: dict[int, list] = {}
    for win in testtime.slide_windows((hp, wp), self.crop, self.stride):
      rows.setdefault(win[0], []).append(win)
    starts = sorted(rows)
    k = self.segmenter.num_classes
    # Each window row starts where the band does (the band moves to the next row's start).
    total = np.zeros((ch, wp, k), np.float32)
    count = np.zeros((ch, wp, 1), np.float32)
    lo = 0  # image row of the band's first row
    for n, y1 in enumerate(starts):
      # Each batch is added as it arrives: only window_batch windows of logits are alive at a time.
      for (wy1, wy2, wx1, wx2), lg in self._window_logits(image, rows[y1]):
        total[wy1 - lo : wy2 - lo, wx1:wx2] += lg
        count[wy1 - lo : wy2 - lo, wx1:wx2] += 1
      done = starts[n + 1] if n + 1 < len(starts) else hp  # rows no later window reaches
      if done > lo:
        m = done - lo
        np.divide(total[:m], count[:m], out=total[:m])  # in place: these rows are dropped next
        labels = np.argmax(total[:m], axis=-1).astype(np.int32)
        if lo < h:
          yield lo, labels[: min(m, h - lo), :w]
        # Shift the band up by m rows; the new rows start empty.
        total[:-m], count[:-m] = total[m:], count[m:]
        total[-m:], count[-m:] = 0, 0
        lo = done

  def predict(self, image: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The (H, W) label map; into `out` (e.g. a np.memmap) when given."""
    h, w = np.asarray(image).shape[:2]
    if out is None:
      out = np.zeros((h, w), np.int32)
    for y0, labels in self.bands(image):
      out[y0 : y0 + len(labels)] = labels
    return out
