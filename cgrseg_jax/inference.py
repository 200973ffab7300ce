"""Single-image and batch inference (`Segmenter`) with the mmseg 0.27 test
pipeline of `testtime.py` (SPEC §7): RGB ``uint8`` ``(H, W, 3)`` in, ``int32``
``(H, W)`` labels out; whole-image or slide inference, optional multi-scale/flip
TTA (softmax maps of every view averaged at the original size).

Compilation: the model forward is jitted per *bucket* (the padded input shape,
batch size); the cheap post-processing (crop + resize + softmax/argmax) is a
second jit per (bucket, output canvas), where the canvas is the original size
rounded up to ``canvas_multiple``.  Sizes inside a bucket are traced values,
so images of any size that share a bucket reuse both compilations.

By default the bucket is exactly mmseg's padded size (a multiple of 32), which
reproduces upstream numerics.  ``bucket_multiple`` (or explicit ``buckets``)
pads further to merge shapes; this is not numerically neutral (the head's global
pooling and the adaptive pooling see the extra zeros), so it trades exact parity
for fewer compilations.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors, loader, testtime
from cgrseg_jax.data import datasets
from cgrseg_jax.data.buckets import bucket_for
from cgrseg_jax.data.pipeline import normalize_image
from cgrseg_jax.data.transforms import size_to_multiple
from cgrseg_jax.models import registry
from cgrseg_jax.testtime import TTA, InferenceError


def _normalise(images_u8, valid_hw):
  """RGB uint8 (B, H, W, 3) -> mmcv-normalised float32, padding exactly 0."""
  return normalize_image(images_u8, valid_hw, bgr_to_rgb=False)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """RGB uint8 image of a label map in `palette` (K, 3); ids outside [0, K) are black."""
  k = len(palette)
  lut = np.zeros((max(k, int(labels.max(initial=0)) + 1), 3), np.uint8)
  lut[:k] = palette
  return lut[np.clip(labels, 0, len(lut) - 1)]


def confidence_maps(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(max probability, entropy in nats) per pixel of (..., K) class probabilities."""
  probs = np.asarray(probs, np.float32)
  logs = np.log(np.where(probs > 0, probs, 1.0))  # 0 log 0 = 0
  return probs.max(-1), -(probs * logs).sum(-1)


# ---------------------------------------------------------------- segmenter


@dataclasses.dataclass
class _Prepared:
  """One view of one image on the host: padded uint8 canvas and its sizes."""

  image: np.ndarray  # (Hb, Wb, 3) uint8, RGB, zero padded
  valid_hw: tuple[int, int]  # resized size
  pad_hw: tuple[int, int]  # mmseg's padded size (multiple of size_divisor)


class Segmenter:
  """CGRSeg inference with the mmseg test pipeline.

  Args:
    model: a registered model (``models.build_model``).
    variables: its ``{'params', 'batch_stats'}``.
    dataset: a registered dataset (``data/datasets.py``): its classes, palette
      and ``img_scale`` are the defaults.
    img_scale: keep-ratio test scale; default the dataset's mmseg scale.
      Tests use small scales (e.g. ``(256, 64)``) to keep images small.
    size_divisor: mmseg's test padding multiple (32).
    bucket_multiple: pad the model input further, to a multiple of this (a
      multiple of ``size_divisor``); default ``size_divisor``, i.e. exactly
      upstream.  Larger values mean fewer compilations, slightly different
      logits.
    buckets: explicit (H, W) input shapes; an image goes to the smallest one
      (by area) that holds its padded size, else to its own padded size.
    mode: 'whole' (upstream CGRSeg) or 'slide'.
    crop_size, stride: slide windows (mmseg ``test_cfg``; ``config.eval.crop_size``
      and ``.stride`` in a run); needed for slide inference.
    batch_size: images per forward in ``predict_batch`` (short batches are
      filled with blank images so the bucket's compilation is reused).
    canvas_multiple: output canvases are the original size rounded up to this.
  """

  def __init__(
    self,
    model,
    variables,
    *,
    dataset: str = 'ade20k',
    img_scale: Optional[Sequence[int]] = None,
    size_divisor: int = 32,
    bucket_multiple: Optional[int] = None,
    buckets: Optional[Sequence[Sequence[int]]] = None,
    mode: str = 'whole',
    crop_size: Optional[Sequence[int]] = None,
    stride: Optional[Sequence[int]] = None,
    batch_size: int = 1,
    canvas_multiple: int = 64,
    class_names: Optional[Sequence[str]] = None,
    palette: Optional[np.ndarray] = None,
    num_classes: Optional[int] = None,
  ):
    self.model = model
    self.variables = jax.device_put(variables)
    if num_classes is None:  # the class count of any model: its output channels
      x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
      num_classes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), self.variables, x).shape[-1]
    self.num_classes = int(num_classes)
    self.dataset = dataset
    try:
      info = datasets.for_model(dataset, self.num_classes)
    except errors.ConfigError as e:
      raise InferenceError(f'dataset={dataset!r}: {e}') from None
    self.img_scale = tuple(int(s) for s in (img_scale or info.img_scale))
    self.size_divisor = int(size_divisor)
    self.bucket_multiple = int(bucket_multiple or size_divisor)
    if self.bucket_multiple % self.size_divisor:
      raise InferenceError(f'bucket_multiple={bucket_multiple} must be a multiple of size_divisor={size_divisor}')
    self.buckets = tuple(tuple(int(v) for v in b) for b in (buckets or ()))
    if mode not in ('whole', 'slide'):
      raise InferenceError(f"mode must be 'whole' or 'slide', got {mode!r}")
    self.mode = mode
    self.crop_size = tuple(int(v) for v in crop_size) if crop_size is not None else None
    self.stride = tuple(int(v) for v in stride) if stride is not None else None
    if mode == 'slide':
      self._check_slide()
    self.batch_size = int(batch_size)
    self.canvas_multiple = int(canvas_multiple)
    self.class_names = tuple(class_names) if class_names is not None else info.class_names
    if len(self.class_names) != self.num_classes:
      raise InferenceError(f'{len(self.class_names)} class names for a model with {self.num_classes} classes')
    self.palette = np.asarray(palette if palette is not None else info.palette, np.uint8)
    # What was traced (= compiled) per jitted function; read by tests and tools.
    self.traces: collections.Counter = collections.Counter()
    self._forward = jax.jit(self._forward_impl)
    self._slide = jax.jit(self._slide_impl, static_argnames=('windows',))
    self._labels = jax.jit(self._labels_impl, static_argnames=('canvas',))
    self._accumulate = jax.jit(self._accumulate_impl, static_argnames=('canvas',), donate_argnums=(0,))
    self._argmax = jax.jit(self._argmax_impl)

  # --------------------------------------------------------------- loading

  @classmethod
  def from_checkpoint(
    cls,
    path: str,
    variant: Optional[str] = None,
    dataset: str = 'ade20k',
    dtype=jnp.float32,
    model: Optional[str] = None,
    **kwargs,
  ) -> 'Segmenter':
    """From any checkpoint `loader.load` reads (an upstream ``.pth``, a
    converted directory, a training run or one of its step dirs).

    The model and class count are read off the weights; a given ``model``
    (registered name) or ``variant`` must agree with them.
    """
    try:
      loaded = loader.load(path, model=model, variant=variant, kinds=('torch', 'converted', 'workdir', 'step'))
    except loader.LoadError as e:
      raise InferenceError(str(e)) from None
    variables = jax.tree_util.tree_map(jnp.asarray, loaded.variables)
    model = registry.build_model(loaded.model, loaded.num_classes, dtype=dtype)
    return cls(model, variables, dataset=dataset, num_classes=loaded.num_classes, **kwargs)

  def _check_slide(self):
    if self.crop_size is None or self.stride is None:
      raise InferenceError(
        'slide inference needs crop_size and stride (mmseg test_cfg; a run has them in config.eval.crop_size '
        'and config.eval.stride)'
      )

  # ------------------------------------------------------ jitted functions

  def _forward_impl(self, variables, images_u8, valid_hw):
    self.traces[('forward',) + images_u8.shape] += 1
    return self.model.apply(variables, _normalise(images_u8, valid_hw), train=False)

  def _slide_impl(self, variables, image_u8, valid_hw, windows):
    """mmseg slide inference on one padded image (1, H, W, 3): all windows in
    one batch, logits summed into place and divided by the overlap count."""
    self.traces[('slide',) + image_u8.shape + (windows,)] += 1
    x = _normalise(image_u8, valid_hw)[0]
    return testtime.slide_logits(lambda c: self.model.apply(variables, c, train=False), x, windows)[None]

  def _labels_impl(self, logits, index, valid_hw, orig_hw, canvas):
    self.traces[('labels',) + logits.shape + canvas] += 1
    one = jax.lax.dynamic_index_in_dim(logits, index, keepdims=False)
    # softmax does not change the argmax, so single-view inference skips it.
    return jnp.argmax(testtime.crop_and_resize(one, valid_hw, orig_hw, canvas), axis=-1).astype(jnp.int32)

  def _accumulate_impl(self, acc, logits, index, valid_hw, orig_hw, flip, canvas):
    self.traces[('accumulate',) + logits.shape + canvas] += 1
    one = jax.lax.dynamic_index_in_dim(logits, index, keepdims=False)
    return acc + jax.nn.softmax(testtime.crop_and_resize(one, valid_hw, orig_hw, canvas, flip), axis=-1)

  def _argmax_impl(self, acc):
    self.traces[('argmax',) + acc.shape] += 1
    return jnp.argmax(acc, axis=-1).astype(jnp.int32)

  # ---------------------------------------------------------- host helpers

  def bucket_for(self, pad_hw: Sequence[int]) -> tuple[int, int]:
    """The model input shape that serves an image of mmseg padded size ``pad_hw``."""
    return bucket_for(pad_hw, self.bucket_multiple, self.buckets)

  def _prepare(self, image: np.ndarray, scale: Sequence[int], flip: bool) -> _Prepared:
    return _Prepared(*testtime.prepare_view(image, scale, self.size_divisor, flip))

  def _canvas(self, orig_hw: Sequence[int]) -> tuple[int, int]:
    return size_to_multiple(orig_hw, self.canvas_multiple)

  @staticmethod
  def _check_image(image, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise InferenceError(
        f'{name}: expected an RGB uint8 image (H, W, 3), got dtype {image.dtype} shape {image.shape}'
      )
    if min(image.shape[:2]) < 1:
      raise InferenceError(f'{name}: empty image of shape {image.shape}')
    return image

  def _run_views(self, items: list[tuple[Any, _Prepared]], shape_key: tuple[int, int], mode: str, batch_size: int):
    """Forward of views that share an input shape, ``batch_size`` at a time
    (slide: one image at a time, its windows batched).
    Yields (item id, logits batch, index in batch, prepared view)."""
    if mode == 'slide':
      for item_id, p in items:
        canvas = np.zeros((1, *shape_key, 3), np.uint8)
        canvas[0, : p.image.shape[0], : p.image.shape[1]] = p.image
        windows = tuple(testtime.slide_windows(shape_key, self.crop_size, self.stride))
        logits = self._slide(self.variables, canvas, np.asarray([p.valid_hw], np.int32), windows=windows)
        yield item_id, logits, 0, p
      return
    bs = batch_size
    for start in range(0, len(items), bs):
      chunk = items[start : start + bs]
      batch = np.zeros((bs, *shape_key, 3), np.uint8)
      valid = np.zeros((bs, 2), np.int32)
      for k, (_, p) in enumerate(chunk):
        batch[k, : p.image.shape[0], : p.image.shape[1]] = p.image
        valid[k] = p.valid_hw
      logits = self._forward(self.variables, batch, valid)
      for k, (item_id, p) in enumerate(chunk):
        yield item_id, logits, k, p

  # --------------------------------------------------------------- public

  def predict(self, image: np.ndarray, tta=None, mode: Optional[str] = None, return_probs: bool = False):
    """Label map (H, W) int32 of one RGB uint8 image (H, W, 3); with
    `return_probs`, (labels, probabilities (H, W, K) float32)."""
    return self.predict_batch([image], tta=tta, mode=mode, batch_size=1, return_probs=return_probs)[0]

  def predict_batch(
    self,
    images: Iterable[np.ndarray],
    tta=None,
    mode: Optional[str] = None,
    batch_size: Optional[int] = None,
    return_probs: bool = False,
  ) -> list:
    """Label maps of several images of any sizes, in input order.

    Single-view inference groups the images by input bucket and runs
    ``batch_size`` at a time. With TTA each image is done on its own (its
    views grouped by bucket), so only one image's (H, W, K) softmax sum is
    alive at a time.

    `return_probs`: each entry is (labels, probabilities): the softmax at the
    original size, with TTA the mean of the views' softmaxes (mmseg
    `aug_test`); the labels are their argmax.
    """
    mode = mode or self.mode
    if mode not in ('whole', 'slide'):
      raise InferenceError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == 'slide':
      self._check_slide()
    batch_size = int(batch_size or self.batch_size)
    tta = TTA.parse(tta)
    images = [self._check_image(im, f'image {i}') for i, im in enumerate(images)]
    if tta is None:
      views = [(self.img_scale, False)]
      return self._predict_views(images, views, mode, batch_size, average=return_probs, return_probs=return_probs)
    views = [(testtime.scaled_img_scale(self.img_scale, r), f) for r, f in tta.views()]
    return [self._predict_views([im], views, mode, batch_size, True, return_probs)[0] for im in images]

  def _predict_views(self, images, views, mode: str, batch_size: int, average: bool, return_probs: bool = False):
    groups: dict[tuple[int, int], list] = {}
    for i, image in enumerate(images):
      for scale, flip in views:
        p = self._prepare(image, scale, flip)
        # Slide windows are laid out on mmseg's padded image: no extra padding.
        key = p.pad_hw if mode == 'slide' else self.bucket_for(p.pad_hw)
        groups.setdefault(key, []).append(((i, flip), p))
    results: list[Any] = [None] * len(images)
    for key in sorted(groups):
      for (i, flip), logits, k, p in self._run_views(groups[key], key, mode, batch_size):
        orig = images[i].shape[:2]
        canvas = self._canvas(orig)
        args = (logits, np.int32(k), np.asarray(p.valid_hw, np.int32), np.asarray(orig, np.int32))
        if not average:
          results[i] = self._labels(*args, canvas=canvas)
          continue
        if results[i] is None:
          results[i] = jnp.zeros((*canvas, self.num_classes), jnp.float32)
        results[i] = self._accumulate(results[i], *args, np.bool_(flip), canvas=canvas)
    out = []
    for image, r in zip(images, results):
      h, w = image.shape[:2]
      labels = self._argmax(r) if average else r  # mmseg divides the sum by the view count: same argmax
      labels = np.asarray(labels)[:h, :w]
      out.append((labels, np.asarray(r)[:h, :w] / np.float32(len(views))) if return_probs else labels)
    return out

  # --------------------------------------------------------- visualisation

  def colorize(self, labels: np.ndarray) -> np.ndarray:
    """RGB uint8 image of a label map in the dataset palette (ids outside
    [0, K) are black)."""
    return colorize(labels, self.palette)

  def overlay(self, image: np.ndarray, labels: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Image blended with its colour label map: (1 - opacity) image + opacity colours."""
    if not 0.0 <= opacity <= 1.0:
      raise InferenceError(f'opacity must be in [0, 1], got {opacity}')
    blend = image.astype(np.float32) * (1.0 - opacity) + self.colorize(labels).astype(np.float32) * opacity
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)

  def info(self) -> dict:
    return dict(
      num_classes=self.num_classes,
      dataset=self.dataset,
      img_scale=list(self.img_scale),
      mode=self.mode,
      bucket_multiple=self.bucket_multiple,
    )
