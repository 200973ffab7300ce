"""mmseg 0.27 / mmcv 1.x data transforms on ``{"image", "label"}`` dicts.

Element convention (host side, numpy):

* ``image``: ``uint8`` ``(H, W, 3)`` in **BGR** order, as OpenCV decodes it
  and as mmcv keeps it. PhotoMetricDistortion's HSV conversions are defined on
  BGR, so the image stays BGR until normalisation, which swaps to RGB
  (``normalize_image`` in pipeline.py, run inside the jitted step).
* ``label``: ``uint8`` ``(H, W)`` class ids, ``255`` = ignore.
* ``valid_hw``: ``int32`` ``(2,)`` height and width of the real image inside a
  padded one; added by the padding transforms. Normalisation uses it to zero
  the padded pixels, which is what mmseg gets by normalising before padding.

Random transforms are grain ``RandomMap`` transforms: grain hands each element
its own ``np.random.Generator`` (derived from the pipeline seed and the element
index), and a single draw decides the geometry for image *and* label. The
draws are taken in mmseg's order and with numpy's semantics (``randint``'s
exclusive upper bound, ``uniform`` ranges), so the distributions match
upstream; the bit streams differ because mmseg uses the global
``np.random`` state.

Exactness notes (mmcv 1.x):

* keep-ratio resize: ``f = min(long / max(h, w), short / min(h, w))``,
  new size ``(int(w * f + 0.5), int(h * f + 0.5))``; image
  ``cv2.INTER_LINEAR``, label ``cv2.INTER_NEAREST``.
* ratio-range scale: ``r = U[0,1) * (max - min) + min``,
  ``scale = (int(s0 * r), int(s1 * r))``.
* PhotoMetricDistortion's steps are per-value maps ``v -> uint8(clip(float32(v)
  * a + b, 0, 255))``; they are applied as exact 256-entry lookup tables
  (``cv2.LUT``), which gives bit-identical results to the float32 formula at a
  fraction of the cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import cv2
import grain
import numpy as np

from .. import errors
from .datasets import IGNORE_INDEX

Element = dict[str, Any]

# ---------------------------------------------------------------- registry

TRANSFORMS: dict[str, type] = {}


def register(cls: type | None = None, *, name: str | None = None):
  """Class decorator: make a transform available to config pipelines
  (``data.train_pipeline``) under its class name.

  A transform is a frozen dataclass deriving from ``grain.transforms.Map``
  (``map(element)``) or ``RandomMap`` (``random_map(element, rng)``; one draw
  drives image and label). Its class attribute ``from_data`` maps fields to
  data-config values (``img_scale``, ``crop_size``, ``ignore_index``) used
  when the pipeline entry does not set them.
  """

  def add(c: type) -> type:
    key = name or c.__name__
    if key in TRANSFORMS and TRANSFORMS[key] is not c:
      raise ValueError(f'transform {key!r} is already registered ({TRANSFORMS[key].__module__})')
    TRANSFORMS[key] = c
    return c

  return add(cls) if cls is not None else add


def _entry(entry) -> tuple[str, dict]:
  """``'Name'``, ``('Name',)`` or ``('Name', {kwargs})`` -> (name, kwargs)."""
  if isinstance(entry, str):
    return entry, {}
  if isinstance(entry, (tuple, list)) and 1 <= len(entry) <= 2 and isinstance(entry[0], str):
    kwargs = dict(entry[1]) if len(entry) == 2 and entry[1] is not None else {}
    return entry[0], kwargs
  raise errors.ConfigError(f"pipeline entry {entry!r}: expected 'Name' or ('Name', {{kwargs}})")


def _frozen(value):
  # Config values arrive as lists (JSON, command line); dataclass fields
  # hold tuples so the transforms stay hashable and comparable.
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def build_transform(entry, data: Mapping[str, Any] | None = None):
  """One pipeline entry -> a transform object (see ``register``)."""
  name, kwargs = _entry(entry)
  if name not in TRANSFORMS:
    raise errors.ConfigError(f'unknown transform {name!r} in pipeline; registered: {sorted(TRANSFORMS)}')
  cls = TRANSFORMS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise errors.ConfigError(f'transform {name!r} has no argument(s) {unknown}; it takes {sorted(fields)}')
  for field, key in getattr(cls, 'from_data', {}).items():
    if field not in kwargs and data is not None and data.get(key) is not None:
      kwargs[field] = data[key]
  return cls(**{k: _frozen(v) for k, v in kwargs.items()})


def build_pipeline(entries: Sequence, data: Mapping[str, Any] | None = None) -> list:
  """A config pipeline (sequence of entries) -> transform objects."""
  return [build_transform(e, data) for e in entries]


# ---------------------------------------------------------------- geometry


def rescale_size(hw: Sequence[int], scale: Sequence[int]) -> tuple[tuple[int, int], float]:
  """Keep-ratio target size of mmcv ``rescale_size``.

  Args:
    hw: the current ``(height, width)``.
    scale: ``(a, b)``; the long edge is bounded by ``max(a, b)`` and the
      short edge by ``min(a, b)``.

  Returns:
    ``((new_h, new_w), factor)``.
  """
  h, w = int(hw[0]), int(hw[1])
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(h, w), short_edge / min(h, w))
  return (int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)), factor


def resize_keep_ratio(element: Element, scale: Sequence[int], *, resize_label: bool = True) -> Element:
  """Resize ``image`` (bilinear) and ``label`` (nearest) like mmseg Resize."""
  image = element['image']
  (new_h, new_w), _ = rescale_size(image.shape[:2], scale)
  out = dict(element)
  out['image'] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  if resize_label and 'label' in element:
    out['label'] = cv2.resize(element['label'], (new_w, new_h), interpolation=cv2.INTER_NEAREST)
  return out


def sample_ratio_scale(
  rng: np.random.Generator, img_scale: Sequence[int], ratio_range: Sequence[float]
) -> tuple[int, int]:
  """mmseg ``Resize.random_sample_ratio``: one uniform ratio for both edges."""
  lo, hi = ratio_range
  if lo > hi:
    raise ValueError(f'ratio_range must be (min, max), got {ratio_range}')
  ratio = rng.random() * (hi - lo) + lo
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


@register
@dataclasses.dataclass(frozen=True)
class ReduceZeroLabel(grain.transforms.Map):
  """0 (``other``) -> 255, every other id -> id - 1; 255 stays 255."""

  def map(self, element: Element) -> Element:
    out = dict(element)
    out['label'] = reduce_zero_label(element['label'])
    return out


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  # mmseg's uint8 arithmetic: 0 -> 255 (ignore), k -> k - 1, and 255 stays 255.
  lut = (np.arange(256) - 1).astype(np.uint8)
  lut[0] = IGNORE_INDEX
  lut[IGNORE_INDEX] = IGNORE_INDEX
  return lut[label]


@register
@dataclasses.dataclass(frozen=True)
class RandomResize(grain.transforms.RandomMap):
  """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)`` for training."""

  from_data: ClassVar[dict[str, str]] = {'img_scale': 'img_scale'}

  img_scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    scale = sample_ratio_scale(rng, self.img_scale, self.ratio_range)
    return resize_keep_ratio(element, scale)


def resize_image(image: np.ndarray, scale: Sequence[int]) -> np.ndarray:
  """mmseg's test-time Resize (keep ratio) of an image alone (any channel
  order); the metric uses the original-size label."""
  return resize_keep_ratio({'image': image}, scale, resize_label=False)['image']


def crop_bbox(rng: np.random.Generator, hw: Sequence[int], crop_size: Sequence[int]) -> tuple[int, int, int, int]:
  """mmseg ``RandomCrop.get_crop_bbox``: offsets uniform in [0, margin]."""
  margin_h = max(int(hw[0]) - crop_size[0], 0)
  margin_w = max(int(hw[1]) - crop_size[1], 0)
  off_h = int(rng.integers(0, margin_h + 1))
  off_w = int(rng.integers(0, margin_w + 1))
  return off_h, off_h + crop_size[0], off_w, off_w + crop_size[1]


def crop_is_balanced(label: np.ndarray, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
  """More than one non-ignored class and none covering >= cat_max_ratio."""
  counts = np.bincount(label.ravel(), minlength=256)
  counts[ignore_index] = 0
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


@register
@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """mmseg ``RandomCrop(crop_size, cat_max_ratio, ignore_index)``.

  With ``cat_max_ratio < 1`` a crop is tried up to 10 times; like upstream,
  a fresh box is drawn after every rejected try, so when all 10 are
  rejected the 11th box is used unchecked.
  """

  crop_size: tuple[int, int] = (512, 512)
  cat_max_ratio: float = 0.75
  ignore_index: int = IGNORE_INDEX
  from_data: ClassVar[dict[str, str]] = {'crop_size': 'crop_size', 'ignore_index': 'ignore_index'}

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    image, label = element['image'], element['label']
    box = crop_bbox(rng, image.shape[:2], self.crop_size)
    if self.cat_max_ratio < 1.0:
      for _ in range(10):
        y1, y2, x1, x2 = box
        if crop_is_balanced(label[y1:y2, x1:x2], self.cat_max_ratio, self.ignore_index):
          break
        box = crop_bbox(rng, image.shape[:2], self.crop_size)
    y1, y2, x1, x2 = box
    out = dict(element)
    out['image'] = np.ascontiguousarray(image[y1:y2, x1:x2])
    out['label'] = np.ascontiguousarray(label[y1:y2, x1:x2])
    return out


@register
@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip of image and label with probability ``prob``."""

  prob: float = 0.5

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    if not rng.random() < self.prob:
      return element
    out = dict(element)
    out['image'] = cv2.flip(element['image'], 1)
    out['label'] = cv2.flip(element['label'], 1)
    return out


# ------------------------------------------------------------ photometric


def affine_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """The 256-entry table of mmseg's ``convert``: uint8(clip(v*a + b))."""
  values = np.arange(256, dtype=np.float32) * alpha + beta
  return np.clip(values, 0, 255).astype(np.uint8)


def hue_lut(delta: int) -> np.ndarray:
  """OpenCV 8-bit hue lives in [0, 180): shift modulo 180."""
  return ((np.arange(256) + delta) % 180).astype(np.uint8)


def _apply_lut_to_channel(image: np.ndarray, channel: int, lut: np.ndarray) -> np.ndarray:
  # cv2.LUT takes either one table or one per channel; give identity tables
  # for the other channels so the whole image goes through one call.
  identity = np.arange(256, dtype=np.uint8)
  tables = [identity, identity, identity]
  tables[channel] = lut
  return cv2.LUT(image, np.stack(tables, axis=-1).reshape(256, 1, 3))


def adjust_saturation(image_bgr: np.ndarray, alpha: float) -> np.ndarray:
  hsv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)
  hsv = _apply_lut_to_channel(hsv, 1, affine_lut(alpha=alpha))
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def adjust_hue(image_bgr: np.ndarray, delta: int) -> np.ndarray:
  hsv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)
  hsv = _apply_lut_to_channel(hsv, 0, hue_lut(delta))
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


@register
@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion(grain.transforms.RandomMap):
  """mmseg ``PhotoMetricDistortion`` with its draw order:

  brightness (p .5, +U(-d, d)); ``mode = randint(2)``; if mode == 1:
  contrast (p .5, xU(lo, hi)); saturation (p .5); hue (p .5,
  +randint(-h, h), upper bound exclusive as in numpy); if mode == 0:
  contrast. Every step clips to [0, 255] and truncates to uint8.
  """

  brightness_delta: int = 32
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18

  def draw(self, rng: np.random.Generator) -> list[tuple[str, float]]:
    """The sequence of applied steps, as (name, parameter) pairs."""
    steps: list[tuple[str, float]] = []
    if rng.integers(2):
      steps.append(('brightness', rng.uniform(-self.brightness_delta, self.brightness_delta)))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
      steps.append(('contrast', rng.uniform(*self.contrast_range)))
    if rng.integers(2):
      steps.append(('saturation', rng.uniform(*self.saturation_range)))
    if rng.integers(2):
      steps.append(('hue', int(rng.integers(-self.hue_delta, self.hue_delta))))
    if mode == 0 and rng.integers(2):
      steps.append(('contrast', rng.uniform(*self.contrast_range)))
    return steps

  @staticmethod
  def apply(image: np.ndarray, steps: list[tuple[str, float]]) -> np.ndarray:
    lut = None  # pending composition of consecutive per-value maps
    for name, value in steps:
      if name in ('brightness', 'contrast'):
        step = affine_lut(beta=value) if name == 'brightness' else affine_lut(alpha=value)
        lut = step if lut is None else step[lut]
        continue
      if lut is not None:
        image, lut = cv2.LUT(image, lut), None
      image = adjust_saturation(image, value) if name == 'saturation' else adjust_hue(image, int(value))
    if lut is not None:
      image = cv2.LUT(image, lut)
    return image

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    steps = self.draw(rng)
    if not steps:
      return element
    out = dict(element)
    out['image'] = self.apply(element['image'], steps)
    return out


# ---------------------------------------------------------------- padding


def pad_to_shape(
  element: Element,
  shape: Sequence[int],
  *,
  pad_val: int = 0,
  seg_pad_val: int = IGNORE_INDEX,
  pad_label: bool = True,
) -> Element:
  """Pad right and bottom to ``shape`` (mmcv ``impad(shape=...)``).

  Records ``valid_hw`` (the unpadded size) unless already present, so a
  later normalisation can zero the padding.
  """
  image = element['image']
  h, w = image.shape[:2]
  if h > shape[0] or w > shape[1]:
    raise ValueError(f'cannot pad an image of size {(h, w)} to the smaller {tuple(shape)}')
  out = dict(element)
  out.setdefault('valid_hw', np.array([h, w], dtype=np.int32))
  out['image'] = cv2.copyMakeBorder(image, 0, shape[0] - h, 0, shape[1] - w, cv2.BORDER_CONSTANT, value=(pad_val,) * 3)
  if pad_label and 'label' in element:
    label = element['label']
    out['label'] = cv2.copyMakeBorder(
      label,
      0,
      shape[0] - label.shape[0],
      0,
      shape[1] - label.shape[1],
      cv2.BORDER_CONSTANT,
      value=seg_pad_val,
    )
  return out


def size_to_multiple(hw: Sequence[int], divisor: int) -> tuple[int, int]:
  """mmcv ``impad_to_multiple`` size: round each edge up to ``divisor``."""
  return tuple(int(-(-int(x) // divisor) * divisor) for x in hw)  # type: ignore[return-value]


@register
@dataclasses.dataclass(frozen=True)
class Pad(grain.transforms.Map):
  """mmseg ``Pad(size=crop_size, pad_val=0, seg_pad_val=255)``."""

  size: tuple[int, int] = (512, 512)
  pad_val: int = 0
  seg_pad_val: int = IGNORE_INDEX
  from_data: ClassVar[dict[str, str]] = {'size': 'crop_size', 'seg_pad_val': 'ignore_index'}

  def map(self, element: Element) -> Element:
    return pad_to_shape(element, self.size, pad_val=self.pad_val, seg_pad_val=self.seg_pad_val)


# ----------------------------------------------------- normalisation

# mmseg's ImageNet statistics, RGB order: the one definition (the device-side
# normalisation, the exporters and the benchmarks read them from here).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


def normalize_table(mean=MEAN_RGB, std=STD_RGB, stats_dtype=np.float32) -> np.ndarray:
  """``(256, C)`` float32: the normalised value of every uint8 value per
  channel, as mmseg 0.27's ``Normalize`` transform computes it. That class
  stores ``mean`` and ``std`` as float32 arrays (``stats_dtype``; pass float64
  for ``mmcv.imnormalize`` called directly with float64 ones) and calls
  ``imnormalize``, which takes ``mean`` and ``1 / std`` of them in float64:
  the image is float32, ``cv2.subtract`` of the mean subtracts in float32,
  ``cv2.multiply`` by ``1 / std`` computes in float64 and rounds to float32. So
  the reciprocal is of the float32-rounded std. A uint8 image has only 256
  values per channel, so a table lookup reproduces it bit for bit on any backend."""
  mean = np.asarray(mean, stats_dtype).astype(np.float64)
  std = np.asarray(std, stats_dtype).astype(np.float64)
  values = np.arange(256, dtype=np.float32)[:, None]
  centred = values - mean.astype(np.float32)[None, :]
  return (centred.astype(np.float64) * (1.0 / std)[None, :]).astype(np.float32)


def default_train_pipeline(
  *,
  ratio_range: tuple[float, float] = (0.5, 2.0),
  cat_max_ratio: float = 0.75,
  flip_prob: float = 0.5,
  photometric: bool = True,
) -> tuple:
  """``DEFAULT_TRAIN_PIPELINE`` with its common options changed."""
  entries = [
    ('RandomResize', {'ratio_range': tuple(ratio_range)}),
    ('RandomCrop', {'cat_max_ratio': cat_max_ratio}),
    ('RandomFlip', {'prob': flip_prob}),
  ]
  if photometric:
    entries.append(('PhotoMetricDistortion', {}))
  entries.append(('Pad', {}))
  return tuple(entries)


# mmseg 0.27's ADE20K training pipeline after loading (reduce_zero_label is
# added from the dataset, normalisation runs on the device:
# pipeline.normalize_image).
DEFAULT_TRAIN_PIPELINE = default_train_pipeline()
