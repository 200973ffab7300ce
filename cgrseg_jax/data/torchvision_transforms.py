"""CSFCN's training augmentations (upstream `dataset/segbase.py`, `dataset/camvid.py`)
on `{'image', 'label'}` dicts, in the style of `transforms.py`: grain `RandomMap`s,
one draw drives image and label; `image` uint8 (H, W, 3) BGR, `label` uint8, 255 = ignore.

Upstream works on PIL images with torchvision's `ColorJitter`; PIL is not a
dependency here, so:
- `ColorJitter` follows torchvision's tensor kernels on uint8 (float32 blends,
  truncation to uint8, its RGB<->HSV); PIL's integer kernels differ by at most
  one grey level;
- `RandomGaussianBlur` is a true Gaussian with sigma = PIL's `radius` (PIL
  approximates it with three box blurs), edges replicated;
- `RandomSideScale` resizes the image bilinearly (area averaging when
  shrinking, as PIL's antialiased BILINEAR does) and the label with the
  pixel-centre nearest rule of PIL's NEAREST.
Choice: padded label pixels are 255 (ignored). Upstream pads raw Cityscapes
labelIds with 0, which maps to ignore; in CamVid 0 is `Sky`, an upstream bug.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import cv2
import grain
import numpy as np

from cgrseg_jax.data.datasets import IGNORE_INDEX
from cgrseg_jax.data.transforms import Element, register

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale (R, G, B)


# ---------------------------------------------------------------- geometry


def side_scale_size(hw: Sequence[int], size: int, side: str = 'short', round_half_up: bool = False) -> tuple[int, int]:
  """(new_h, new_w) with the `side` ('short' or 'long') edge set to `size` and the
  other scaled by the same ratio: `int(other * size / edge)` (Cityscapes, floor)
  or `int(other * size / edge + 0.5)` (CamVid). Upstream's tie rule: for h == w
  the short side is h, the long side is w."""
  h, w = int(hw[0]), int(hw[1])
  if side not in ('short', 'long'):
    raise ValueError(f"side must be 'short' or 'long', got {side!r}")
  first_is_h = (h <= w) if side == 'short' else (h > w)
  half = 0.5 if round_half_up else 0.0
  if first_is_h:
    return size, int(1.0 * w * size / h + half)
  return int(1.0 * h * size / w + half), size


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PIL NEAREST: source index floor((dst + 0.5) * in / out)."""
  return np.minimum(((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)


def resize_pair(element: Element, hw: Sequence[int]) -> Element:
  out = dict(element)
  image = element['image']
  oh, ow = int(hw[0]), int(hw[1])
  shrink = oh * ow < image.shape[0] * image.shape[1]
  out['image'] = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
  if 'label' in element:
    label = element['label']
    out['label'] = np.ascontiguousarray(
      label[nearest_indices(label.shape[0], oh)][:, nearest_indices(label.shape[1], ow)]
    )
  return out


@register
@dataclasses.dataclass(frozen=True)
class RandomSideScale(grain.transforms.RandomMap):
  """Resize so that the `side` edge is an integer drawn uniformly from
  `size_range` (both ends included, as Python's `random.randint`).

  Cityscapes: side 'short', (128, 2048) (0.125-2 x 1024), floor.
  CamVid: side 'long', (480, 1920) (0.5-2 x 960), round_half_up."""

  size_range: tuple[int, int] = (128, 2048)
  side: str = 'short'
  round_half_up: bool = False

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    lo, hi = self.size_range
    size = int(rng.integers(lo, hi + 1))
    return resize_pair(element, side_scale_size(element['image'].shape[:2], size, self.side, self.round_half_up))


@register
@dataclasses.dataclass(frozen=True)
class RandomPadCrop(grain.transforms.RandomMap):
  """Pad bottom/right to at least `crop_size` (h, w) (image 0, label
  `ignore_index`), then crop at x1 = randint(0, W - w), y1 = randint(0, H - h)
  (both ends included; x drawn first, as upstream)."""

  crop_size: tuple[int, int] = (1024, 1024)
  ignore_index: int = IGNORE_INDEX

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    image, label = element['image'], element['label']
    ch, cw = self.crop_size
    ph, pw = max(ch - image.shape[0], 0), max(cw - image.shape[1], 0)
    if ph or pw:
      image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
      label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
    x1 = int(rng.integers(0, image.shape[1] - cw + 1))
    y1 = int(rng.integers(0, image.shape[0] - ch + 1))
    out = dict(element)
    out['image'] = np.ascontiguousarray(image[y1 : y1 + ch, x1 : x1 + cw])
    out['label'] = np.ascontiguousarray(label[y1 : y1 + ch, x1 : x1 + cw])
    return out


# ------------------------------------------------------------ photometric


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur with standard deviation `sigma` (PIL's `radius`): separable
  float32 kernel exp(-x^2 / 2 sigma^2) of radius ceil(3 sigma), edges
  replicated, rounded to uint8 (cv2's uint8 path uses coarser fixed-point weights)."""
  if sigma <= 0:
    return image
  r = math.ceil(3 * sigma)
  k = np.exp(-(np.arange(-r, r + 1, dtype=np.float64) ** 2) / (2 * sigma * sigma))
  k = (k / k.sum()).astype(np.float32)
  out = cv2.sepFilter2D(image.astype(np.float32), -1, k, k, borderType=cv2.BORDER_REPLICATE)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(image.shape)


@register
@dataclasses.dataclass(frozen=True)
class RandomGaussianBlur(grain.transforms.RandomMap):
  """With probability `prob`, blur with sigma = U[0, 1) x `max_sigma` (upstream:
  `GaussianBlur(radius=random.random())` with p 0.5)."""

  prob: float = 0.5
  max_sigma: float = 1.0

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    if not rng.random() < self.prob:
      return element
    sigma = rng.random() * self.max_sigma
    out = dict(element)
    out['image'] = gaussian_blur(element['image'], sigma)
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(x, 0, 255).astype(np.uint8)  # torchvision: clamp, then truncate


def _blend(image: np.ndarray, other, ratio: float) -> np.ndarray:
  ratio = np.float32(ratio)
  return _to_uint8(ratio * image.astype(np.float32) + (np.float32(1) - ratio) * np.asarray(other, np.float32))


def grayscale(rgb: np.ndarray) -> np.ndarray:
  """torchvision rgb_to_grayscale on uint8: 0.2989 R + 0.587 G + 0.114 B, truncated."""
  f = rgb.astype(np.float32)
  w = [np.float32(v) for v in GRAY_WEIGHTS]
  return (w[0] * f[..., 0] + w[1] * f[..., 1] + w[2] * f[..., 2]).astype(np.uint8)


def adjust_brightness(rgb: np.ndarray, factor: float) -> np.ndarray:
  return _blend(rgb, 0.0, factor)


def adjust_contrast(rgb: np.ndarray, factor: float) -> np.ndarray:
  return _blend(rgb, grayscale(rgb).astype(np.float32).mean(dtype=np.float32), factor)


def adjust_saturation(rgb: np.ndarray, factor: float) -> np.ndarray:
  return _blend(rgb, grayscale(rgb)[..., None], factor)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torchvision `_rgb2hsv` on float RGB in [0, 1]."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = rgb.max(-1), rgb.min(-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / np.where(eqc, 1, maxc)
  div = np.where(eqc, 1, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  h = (maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2 + rc - bc)
  h = h + ((maxc != g) & (maxc != r)) * (4 + gc - rc)
  return np.fmod(h / 6 + 1, 1).astype(np.float32), s.astype(np.float32), maxc


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """torchvision `_hsv2rgb`."""
  i = np.floor(h * 6)
  f = h * 6 - i
  i = i.astype(np.int32) % 6
  p = np.clip(v * (1 - s), 0, 1)
  q = np.clip(v * (1 - s * f), 0, 1)
  t = np.clip(v * (1 - s * (1 - f)), 0, 1)
  table = np.stack(
    [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
  )  # (6, H, W, 3)
  return np.take_along_axis(table, i[None, ..., None], 0)[0]


def adjust_hue(rgb: np.ndarray, factor: float) -> np.ndarray:
  """Rotate the hue by `factor` turns (torchvision: uint8 -> /255 -> HSV -> back, x 255.999, truncate)."""
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f'hue factor {factor} is not in [-0.5, 0.5]')
  h, s, v = rgb_to_hsv(rgb.astype(np.float32) / np.float32(255))
  h = np.mod(h + np.float32(factor), np.float32(1))
  return (hsv_to_rgb(h, s, v) * np.float32(255.999)).astype(np.uint8)


def jitter_range(value: float, center: float = 1.0, bound: Optional[float] = None) -> Optional[tuple[float, float]]:
  """torchvision `_check_input` for a scalar: [max(0, c - v), c + v] (hue: [-v, v]); None when v == 0."""
  if value < 0:
    raise ValueError(f'jitter strength must be non-negative, got {value}')
  if value == 0:
    return None
  lo, hi = (center - value, center + value) if bound is None else (-value, value)
  if bound is not None and value > bound:
    raise ValueError(f'hue jitter must be <= {bound}, got {value}')
  return (max(lo, 0.0) if bound is None else lo, hi)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@register
@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """torchvision `ColorJitter(brightness, contrast, saturation, hue)`: a random
  order of the four (a permutation of 0..3), then one uniform factor per enabled
  adjustment drawn in the fixed order b, c, s, h; adjustments with strength 0
  are skipped. Cityscapes: (0.5, 0.5, 0.5, 0); CamVid: (0.3, 0.3, 0.3, 0.1)."""

  brightness: float = 0.5
  contrast: float = 0.5
  saturation: float = 0.5
  hue: float = 0.0
  bgr: bool = True  # element images are BGR (transforms.py convention)

  def ranges(self):
    return (
      jitter_range(self.brightness),
      jitter_range(self.contrast),
      jitter_range(self.saturation),
      jitter_range(self.hue, center=0.0, bound=0.5),
    )

  def draw(self, rng: np.random.Generator) -> list[tuple[int, float]]:
    """[(adjustment index, factor)] in application order."""
    order = rng.permutation(4)
    factors = [None if r is None else float(rng.uniform(r[0], r[1])) for r in self.ranges()]
    return [(int(i), factors[i]) for i in order if factors[i] is not None]

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    steps = self.draw(rng)
    image = element['image']
    rgb = image[..., ::-1] if self.bgr else image
    for i, factor in steps:
      rgb = _ADJUST[i](rgb, factor)
    out = dict(element)
    out['image'] = np.ascontiguousarray(rgb[..., ::-1] if self.bgr else rgb)
    return out
