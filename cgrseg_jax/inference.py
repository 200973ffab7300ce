"""Single-image and batch inference with the mmseg 0.27 test pipeline (SPEC §7).

Pipeline per image (RGB ``uint8`` ``(H, W, 3)`` in, ``int32`` ``(H, W)`` labels out):

1. keep-ratio resize to ``img_scale`` (OpenCV bilinear, mmcv's size rule);
2. normalise with the ImageNet mean/std and pad right/bottom with zeros to a
   multiple of ``size_divisor`` (normalisation runs on the device; the padded
   pixels are forced to exactly 0 as mmseg pads after normalising);
3. whole-image forward (logits at the padded size) or mmseg's slide inference;
4. crop the logits to the resized size, resize them bilinearly to the original
   size, softmax, argmax.  Multi-scale/flip test time augmentation (mmseg
   ``aug_test`` with ``MultiScaleFlipAug``) averages the softmax maps of every
   (ratio, flip) at the original size.

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
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors
from cgrseg_jax.data import classes as class_lists
from cgrseg_jax.data import datasets
from cgrseg_jax.data import transforms as T

DEFAULT_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class InferenceError(errors.UserError, ValueError):
  """Bad input to the segmenter; the message names the file or value."""


@dataclasses.dataclass(frozen=True)
class TTA:
  """Multi-scale / flip test-time augmentation (mmseg ``MultiScaleFlipAug``).

  ``scales`` are ratios of ``img_scale``: ratio r resizes with the keep-ratio
  scale ``(int(s0 * r), int(s1 * r))``.  ``flip`` adds a horizontally flipped
  copy of every scale, whose output is flipped back before averaging.
  """

  scales: tuple[float, ...] = DEFAULT_TTA_SCALES
  flip: bool = True

  @classmethod
  def parse(cls, tta) -> Optional['TTA']:
    """None / a TTA / a mapping with 'scales' and 'flip' (as in the issue's API)."""
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


# ----------------------------------------------------------------- geometry


def round_up(hw: Sequence[int], multiple: int) -> tuple[int, int]:
  return tuple(int(-(-int(x) // multiple) * multiple) for x in hw)  # type: ignore[return-value]


def scaled_img_scale(img_scale: Sequence[int], ratio: float) -> tuple[int, int]:
  """mmseg ``MultiScaleFlipAug``: ``(int(s0 * r), int(s1 * r))``."""
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def slide_windows(hw: Sequence[int], crop: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg 0.27 ``slide_inference`` windows (y1, y2, x1, x2) over an (H, W) image.

  ``grids = max(H - crop + stride - 1, 0) // stride + 1`` per axis; the last
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


def _normalise(images_u8, valid_hw):
  """RGB uint8 (B, H, W, 3) -> mmcv-normalised float32, padding exactly 0."""
  x = images_u8.astype(jnp.float32)
  mean = jnp.asarray(np.asarray(T.MEAN_RGB, np.float32))
  stdinv = jnp.asarray((1.0 / np.asarray(T.STD_RGB, np.float64)).astype(np.float32))
  x = (x - mean) * stdinv
  h, w = x.shape[1], x.shape[2]
  inside = (jnp.arange(h)[None, :, None] < valid_hw[:, 0, None, None]) & (
    jnp.arange(w)[None, None, :] < valid_hw[:, 1, None, None]
  )
  return jnp.where(inside[..., None], x, 0.0)


def _linear_taps(in_size, out_size, n_out: int, flip=None):
  """PyTorch bilinear (align_corners=False) taps from a traced ``in_size`` to a
  traced ``out_size``, at ``n_out`` static output positions (positions past
  ``out_size`` are computed but unused).  With ``flip`` the output is mirrored
  inside ``[0, out_size)``, which undoes a horizontal flip of the input."""
  d = jnp.arange(n_out, dtype=jnp.int32)
  if flip is not None:
    d = jnp.where(flip, jnp.maximum(out_size - 1 - d, 0), d)
  scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  src = jnp.maximum((d.astype(jnp.float32) + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  return i0, i1, 1.0 - w1, w1


def _to_original(logits, valid_hw, orig_hw, canvas, flip):
  """One image's logits (Hb, Wb, K): crop to ``valid_hw``, resize to ``orig_hw``
  (placed at the top-left of a static ``canvas``), optionally mirrored."""
  i0, i1, a0, a1 = _linear_taps(valid_hw[0], orig_hw[0], canvas[0])
  rows = logits[i0] * a0[:, None, None] + logits[i1] * a1[:, None, None]
  j0, j1, b0, b1 = _linear_taps(valid_hw[1], orig_hw[1], canvas[1], flip)
  return rows[:, j0] * b0[None, :, None] + rows[:, j1] * b1[None, :, None]


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
    model: a ``CGRSegModel`` (``build_segmentor``).
    variables: its ``{'params', 'batch_stats'}``.
    dataset: names the classes, palette and default ``img_scale``.
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
    crop_size, stride: slide windows (mmseg ``test_cfg``).
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
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    batch_size: int = 1,
    canvas_multiple: int = 64,
    class_names: Optional[Sequence[str]] = None,
    palette: Optional[np.ndarray] = None,
  ):
    self.model = model
    self.variables = jax.device_put(variables)
    self.num_classes = int(model.decode_head.num_classes)
    self.dataset = dataset
    known = datasets.DATASETS.get(dataset.lower())  # mmseg's keep-ratio test scale of the dataset
    self.img_scale = tuple(int(s) for s in (img_scale or (known.img_scale if known else (2048, 512))))
    self.size_divisor = int(size_divisor)
    self.bucket_multiple = int(bucket_multiple or size_divisor)
    if self.bucket_multiple % self.size_divisor:
      raise InferenceError(f'bucket_multiple={bucket_multiple} must be a multiple of size_divisor={size_divisor}')
    self.buckets = sorted((tuple(int(v) for v in b) for b in (buckets or ())), key=lambda b: (b[0] * b[1], b))
    if mode not in ('whole', 'slide'):
      raise InferenceError(f"mode must be 'whole' or 'slide', got {mode!r}")
    self.mode = mode
    self.crop_size = tuple(int(v) for v in crop_size)
    self.stride = tuple(int(v) for v in stride)
    self.batch_size = int(batch_size)
    self.canvas_multiple = int(canvas_multiple)
    self.class_names = tuple(class_names) if class_names is not None else self._default_names()
    if len(self.class_names) != self.num_classes:
      raise InferenceError(f'{len(self.class_names)} class names for a model with {self.num_classes} classes')
    self.palette = np.asarray(palette, np.uint8) if palette is not None else self._default_palette()
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
    cls, path: str, variant: Optional[str] = None, dataset: str = 'ade20k', dtype=jnp.float32, **kwargs
  ) -> 'Segmenter':
    """From an upstream mmseg ``.pth``, a converted checkpoint directory
    (``convert.save_variables``) or a training run (its workdir, its
    ``checkpoints/`` dir or one step dir; the latest step is used).

    The variant and class count are read off the weights' shapes; a given
    ``variant`` must agree with them.
    """
    from cgrseg_jax import convert
    from cgrseg_jax.models import build_segmentor

    if not os.path.exists(path):
      raise InferenceError(f'{path}: no such checkpoint file or directory')
    if os.path.isfile(path):
      try:
        variables, report = convert.load_torch_checkpoint(path, variant=variant, return_report=True)
      except convert.ConversionError as e:
        raise InferenceError(str(e)) from None
      found_variant, num_classes = report.variant, report.num_classes
    elif os.path.exists(os.path.join(path, 'cgrseg.json')):
      variables, meta = convert.load_variables(path)
      found_variant, num_classes = meta['variant'], int(meta['num_classes'])
    else:
      from cgrseg_jax import checkpointing

      try:
        variables = checkpointing.load_orbax_variables(path)
      except checkpointing.InitError as e:
        raise InferenceError(
          f'{path}: not a .pth file, a converted checkpoint (cgrseg.json) or a training checkpoint ({e})'
        ) from None
      state = convert.variables_to_state_dict(variables)
      found_variant, num_classes = convert.detect_variant(state)
    if variant is not None and variant != found_variant:
      raise InferenceError(f'{path}: the weights are CGRSeg-{found_variant}, but variant={variant!r} was given')
    variables = {
      c: jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), variables[c]) for c in ('params', 'batch_stats')
    }
    return cls(build_segmentor(found_variant, num_classes, dtype=dtype), variables, dataset=dataset, **kwargs)

  def _default_names(self) -> tuple[str, ...]:
    try:
      names = class_lists.class_names(self.dataset, self.num_classes)
    except KeyError:
      names = ()
    if len(names) != self.num_classes:  # custom dataset or a class count the dataset lacks
      return tuple(f'class_{i}' for i in range(self.num_classes))
    return tuple(names)

  def _default_palette(self) -> np.ndarray:
    try:
      pal = class_lists.palette(self.dataset, self.num_classes)
    except KeyError:
      pal = np.zeros((0, 3), np.uint8)
    if len(pal) != self.num_classes:
      pal = (
        class_lists.voc_colormap(self.num_classes + 1)[1:]
        if self.num_classes < 256
        else np.random.default_rng(0).integers(0, 256, (self.num_classes, 3), dtype=np.uint8)
      )
    return pal

  # ------------------------------------------------------ jitted functions

  def _forward_impl(self, variables, images_u8, valid_hw):
    self.traces[('forward',) + images_u8.shape] += 1
    return self.model.apply(variables, _normalise(images_u8, valid_hw), train=False)

  def _slide_impl(self, variables, image_u8, valid_hw, windows):
    """mmseg slide inference on one padded image (1, H, W, 3): all windows in
    one batch, logits summed into place and divided by the overlap count."""
    self.traces[('slide',) + image_u8.shape + (windows,)] += 1
    x = _normalise(image_u8, valid_hw)[0]
    crops = jnp.stack([x[y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    logits = self.model.apply(variables, crops, train=False)
    h, w = x.shape[:2]
    total = jnp.zeros((h, w, logits.shape[-1]), jnp.float32)
    count = np.zeros((h, w, 1), np.float32)  # static: depends on shapes only
    for k, (y1, y2, x1, x2) in enumerate(windows):
      total = total.at[y1:y2, x1:x2].add(logits[k])
      count[y1:y2, x1:x2] += 1
    return (total / count)[None]

  def _labels_impl(self, logits, index, valid_hw, orig_hw, canvas):
    self.traces[('labels',) + logits.shape + canvas] += 1
    one = jax.lax.dynamic_index_in_dim(logits, index, keepdims=False)
    # softmax does not change the argmax, so single-view inference skips it.
    return jnp.argmax(_to_original(one, valid_hw, orig_hw, canvas, None), axis=-1).astype(jnp.int32)

  def _accumulate_impl(self, acc, logits, index, valid_hw, orig_hw, flip, canvas):
    self.traces[('accumulate',) + logits.shape + canvas] += 1
    one = jax.lax.dynamic_index_in_dim(logits, index, keepdims=False)
    return acc + jax.nn.softmax(_to_original(one, valid_hw, orig_hw, canvas, flip), axis=-1)

  def _argmax_impl(self, acc):
    self.traces[('argmax',) + acc.shape] += 1
    return jnp.argmax(acc, axis=-1).astype(jnp.int32)

  # ---------------------------------------------------------- host helpers

  def bucket_for(self, pad_hw: Sequence[int]) -> tuple[int, int]:
    """The model input shape that serves an image of mmseg padded size ``pad_hw``."""
    for b in self.buckets:
      if b[0] >= pad_hw[0] and b[1] >= pad_hw[1]:
        return b
    return round_up(pad_hw, self.bucket_multiple)

  def _prepare(self, image: np.ndarray, scale: Sequence[int], flip: bool) -> _Prepared:
    (h, w), _ = T.rescale_size(image.shape[:2], scale)
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if flip:
      resized = resized[:, ::-1]
    pad_hw = round_up((h, w), self.size_divisor)
    return _Prepared(np.ascontiguousarray(resized), (h, w), pad_hw)

  def _canvas(self, orig_hw: Sequence[int]) -> tuple[int, int]:
    return round_up(orig_hw, self.canvas_multiple)

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
        windows = tuple(slide_windows(shape_key, self.crop_size, self.stride))
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

  def predict(self, image: np.ndarray, tta=None, mode: Optional[str] = None) -> np.ndarray:
    """Label map (H, W) int32 of one RGB uint8 image (H, W, 3)."""
    return self.predict_batch([image], tta=tta, mode=mode, batch_size=1)[0]

  def predict_batch(
    self, images: Iterable[np.ndarray], tta=None, mode: Optional[str] = None, batch_size: Optional[int] = None
  ) -> list[np.ndarray]:
    """Label maps of several images of any sizes, in input order.

    Single-view inference groups the images by input bucket and runs
    ``batch_size`` at a time. With TTA each image is done on its own (its
    views grouped by bucket), so only one image's (H, W, K) softmax sum is
    alive at a time.
    """
    mode = mode or self.mode
    if mode not in ('whole', 'slide'):
      raise InferenceError(f"mode must be 'whole' or 'slide', got {mode!r}")
    batch_size = int(batch_size or self.batch_size)
    tta = TTA.parse(tta)
    images = [self._check_image(im, f'image {i}') for i, im in enumerate(images)]
    if tta is None:
      return self._predict_views(images, [(self.img_scale, False)], mode, batch_size, average=False)
    views = [(scaled_img_scale(self.img_scale, r), f) for r, f in tta.views()]
    return [self._predict_views([im], views, mode, batch_size, average=True)[0] for im in images]

  def _predict_views(self, images, views, mode: str, batch_size: int, average: bool) -> list[np.ndarray]:
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
      if average:
        r = self._argmax(r)  # mmseg divides the sum by the view count: same argmax
      out.append(np.asarray(r)[: image.shape[0], : image.shape[1]])
    return out

  # --------------------------------------------------------- visualisation

  def colorize(self, labels: np.ndarray) -> np.ndarray:
    """RGB uint8 image of a label map in the dataset palette (ids outside
    [0, K) are black)."""
    lut = np.zeros((max(self.num_classes, int(labels.max(initial=0)) + 1), 3), np.uint8)
    lut[: self.num_classes] = self.palette
    return lut[np.clip(labels, 0, len(lut) - 1)]

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

  def describe(self) -> str:
    return json.dumps(self.info())
