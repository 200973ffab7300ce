"""Procedural segmentation scenes: the default dataset when nothing is downloaded.

Each sample is a textured background (class 0) with several shapes drawn on
top of it, later shapes occluding earlier ones. A class fixes a shape family
(ellipse, rotated rectangle, triangle, star), a base hue and a texture
(noisy flat, stripes, checker), and every instance varies size, position,
rotation, colour (hue jitter, saturation, value) and texture scale, so a model
has to combine shape, colour and texture cues. Labels are exact: the image and
the label are painted from the same rasterised mask (no anti-aliasing).

Everything derives from ``(seed, split, index)`` through numpy's
``default_rng``, so a sample is the same in every process and on every run.
A 512x683 sample takes a few milliseconds.

``SyntheticSegmentation.write_ade20k_layout`` writes the samples to disk as an
``ADEChallengeData2016`` tree (labels stored as id + 1, so the ADE20K
reader's ``reduce_zero_label`` gives the ids back); the tests read it back
through the directory source and the data benchmark uses it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import cv2
import numpy as np

_SPLIT_CODES = {'train': 0, 'training': 0, 'val': 1, 'validation': 1, 'test': 2}
_SHAPES = ('ellipse', 'rectangle', 'triangle', 'star')
_TEXTURES = ('flat', 'stripes', 'checker')


class SyntheticSegmentation:
  """A grain ``RandomAccessDataSource`` of procedural scenes.

  Args:
    num_samples: length of the source.
    num_classes: classes including the background (class 0); 2..255.
    image_size: ``(height, width)`` of every sample.
    seed: base seed; ``split`` selects a disjoint stream per split.
    shapes_per_image: inclusive range of the number of shapes drawn.
  """

  def __init__(
    self,
    num_samples: int = 1000,
    num_classes: int = 8,
    image_size: Sequence[int] = (512, 683),
    seed: int = 0,
    split: str = 'train',
    shapes_per_image: Sequence[int] = (3, 8),
  ):
    if not 2 <= num_classes <= 255:
      raise ValueError(f'num_classes must be in [2, 255], got {num_classes}')
    if num_samples < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    if split not in _SPLIT_CODES:
      raise ValueError(f'unknown split {split!r}; expected one of {sorted(_SPLIT_CODES)}')
    h, w = int(image_size[0]), int(image_size[1])
    if h < 16 or w < 16:
      raise ValueError(f'image_size must be at least 16x16, got {(h, w)}')
    self.num_samples = int(num_samples)
    self.num_classes = int(num_classes)
    self.image_size = (h, w)
    self.seed = int(seed)
    self.split = split
    self.shapes_per_image = (int(shapes_per_image[0]), int(shapes_per_image[1]))
    self.reduce_zero_label = False
    # Per-class appearance: hues spread evenly over OpenCV's [0, 180).
    k = num_classes - 1
    self._class_hue = np.array([0.0] + [180.0 * i / k for i in range(k)])
    self._class_shape = [None] + [_SHAPES[i % len(_SHAPES)] for i in range(k)]
    self._class_texture = [None] + [_TEXTURES[(i // len(_SHAPES)) % len(_TEXTURES)] for i in range(k)]
    self._noise_field: np.ndarray | None = None  # built lazily, never pickled

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_noise_field'] = None  # workers rebuild it (same seed, same field)
    return state

  @property
  def _noise(self) -> np.ndarray:
    if self._noise_field is None:
      h, w = self.image_size
      rng = np.random.default_rng((self.seed, 1 << 20))
      self._noise_field = rng.standard_normal((2 * h, 2 * w), dtype=np.float32)
    return self._noise_field

  def __len__(self) -> int:
    return self.num_samples

  def __repr__(self) -> str:
    return (
      f'SyntheticSegmentation({self.num_samples} x {self.image_size}, '
      f'{self.num_classes} classes, seed={self.seed}, split={self.split!r})'
    )

  def size(self, index: int) -> tuple[int, int]:
    return self.image_size

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_samples:
      raise IndexError(f'index {index} out of range for {self!r}')
    rng = np.random.default_rng((self.seed, _SPLIT_CODES[self.split], index))
    image, label = self._scene(rng)
    return {'image': image, 'label': label, 'index': index}

  # ------------------------------------------------------------ drawing

  def _grain(self, rng: np.random.Generator, hh: int, ww: int) -> np.ndarray:
    """Unit-variance float32 noise of size (hh, ww): a random window of a
    fixed field twice the image size (drawing fresh normals for every
    pixel would dominate the generation time)."""
    h, w = self.image_size
    y, x = int(rng.integers(0, 2 * h - hh + 1)), int(rng.integers(0, 2 * w - ww + 1))
    return self._noise[y : y + hh, x : x + ww]

  def _background(self, rng: np.random.Generator) -> np.ndarray:
    h, w = self.image_size
    # Low-frequency colour blobs (bicubic upsampling of a coarse grid)
    # around a muted base colour, plus fine grain.
    base = rng.uniform(70, 170, size=3).astype(np.float32)
    coarse = base + 30 * rng.standard_normal((max(h // 64, 2), max(w // 64, 2), 3), dtype=np.float32)
    blobs = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    noisy = blobs + 6 * self._grain(rng, h, w)[..., None]
    return cv2.convertScaleAbs(np.clip(noisy, 0, 255))

  def _mask(self, rng: np.random.Generator, kind: str, cy: float, cx: float, r: float) -> np.ndarray:
    h, w = self.image_size
    mask = np.zeros((h, w), np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    if kind == 'ellipse':
      axes = (max(int(r), 2), max(int(r * rng.uniform(0.4, 1.0)), 2))
      cv2.ellipse(mask, (int(cx), int(cy)), axes, np.degrees(angle), 0, 360, 1, thickness=-1, lineType=cv2.LINE_8)
      return mask
    if kind == 'rectangle':
      a, b = r, r * rng.uniform(0.3, 1.0)
      corners = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif kind == 'triangle':
      t = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
      corners = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
      angle = 0.0
    else:  # star: alternating outer / inner radius
      n = int(rng.integers(5, 8))
      t = np.arange(2 * n) * np.pi / n
      rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
      corners = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    pts = corners @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return mask

  def _texture(self, rng: np.random.Generator, kind: str, hh: int, ww: int) -> np.ndarray:
    if kind == 'flat':
      return 1.0 + 0.06 * self._grain(rng, hh, ww)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    period = rng.uniform(6, 20)
    if kind == 'stripes':
      t = rng.uniform(0, np.pi)
      phase = (xx * np.cos(t) + yy * np.sin(t)) * (2 * np.pi / period)
      return (0.75 + 0.25 * np.sign(np.sin(phase))).astype(np.float32)
    return (0.65 + 0.35 * ((xx // period + yy // period) % 2)).astype(np.float32)

  def _scene(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = self.image_size
    image = self._background(rng)
    label = np.zeros((h, w), np.uint8)
    lo, hi = self.shapes_per_image
    for _ in range(int(rng.integers(lo, hi + 1))):
      cls = int(rng.integers(1, self.num_classes))
      r = rng.uniform(0.08, 0.3) * min(h, w)
      mask = self._mask(rng, self._class_shape[cls], rng.uniform(0, h), rng.uniform(0, w), r)
      x0, y0, bw, bh = cv2.boundingRect(mask)
      if bw == 0 or bh == 0:
        continue
      y1, x1 = y0 + bh, x0 + bw
      hue = (self._class_hue[cls] + rng.uniform(-6, 6)) % 180
      hsv = np.array([[[hue, rng.uniform(120, 255), rng.uniform(110, 255)]]], np.uint8)
      colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
      tex = self._texture(rng, self._class_texture[cls], y1 - y0, x1 - x0)
      patch = np.clip(colour * tex[..., None], 0, 255).astype(np.uint8)
      inside = mask[y0:y1, x0:x1].astype(bool)
      image[y0:y1, x0:x1][inside] = patch[inside]
      label[y0:y1, x0:x1][inside] = cls
    return image, label

  # ------------------------------------------------------------ writing

  def write_ade20k_layout(
    self,
    root: str,
    *,
    split_dir: str | None = None,
    image_suffix: str = '.jpg',
    jpeg_quality: int = 95,
    indices: Sequence[int] | None = None,
  ) -> list[str]:
    """Write samples as ``root/images/<split_dir>/<name><image_suffix>``
    and ``root/annotations/<split_dir>/<name>.png`` (label id + 1, since
    ADE20K's 0 means 'other' and is removed by reduce_zero_label).

    Returns the written image paths, in index order.
    """
    if self.num_classes > 254:
      raise ValueError('the ADE20K layout stores id + 1 in uint8, so num_classes must be <= 254')
    split_dir = split_dir or ('training' if _SPLIT_CODES[self.split] == 0 else 'validation')
    img_dir = os.path.join(root, 'images', split_dir)
    ann_dir = os.path.join(root, 'annotations', split_dir)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if image_suffix.lower() in ('.jpg', '.jpeg') else []
    written = []
    for i in range(self.num_samples) if indices is None else indices:
      rec = self[i]
      stem = f'synthetic_{self.split}_{i:08d}'
      img_path = os.path.join(img_dir, stem + image_suffix)
      if not cv2.imwrite(img_path, rec['image'], params):
        raise OSError(f'{img_path}: OpenCV could not write the image')
      if not cv2.imwrite(os.path.join(ann_dir, stem + '.png'), rec['label'] + 1):
        raise OSError(f'{ann_dir}/{stem}.png: OpenCV could not write the label')
      written.append(img_path)
    return written
