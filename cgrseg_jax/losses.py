"""The decode-head losses, mmseg's `loss_decode`: named losses whose weighted sum trains the model.

`config.loss` (unset: the model family's recipe, 'cross_entropy' for CGRSeg,
'ohem' for CSFCN) is one name, or a list of `(name, weight)` /
`(name, weight, {options})` entries, e.g.
`[('cross_entropy', 1.0, {'class_weight': 'auto'}), ('dice', 3.0)]`;
`build_loss` turns it into `loss(logits at any stride, labels)`. The logits
(N, h, w, K) are resized bilinearly (align_corners False) to the labels
(N, H, W), as mmseg's `BaseDecodeHead.losses` does, once for all entries.

  cross_entropy  mmseg 0.27 `CrossEntropyLoss` (avg_non_ignore False): per-pixel
                 class_weight[y] * nll, 0 on ignored pixels, averaged over ALL
                 pixels of the batch, ignored ones included.
  ohem           CSFCN's OHEM cross-entropy (`config.ohem.*` unless given).
  dice           mmseg 1.x `DiceLoss` (V-Net dice over each image's whole
                 (class, pixel) map; naive_dice, eps).
  dice_0x        mmseg 0.x `DiceLoss` (per-class dice with smooth, exponent).
  focal          mmseg 1.x `FocalLoss` (sigmoid, gamma, alpha).
  lovasz         Lovász-softmax (Berman et al. 2018), per_image, classes.

`class_weight` (cross_entropy, dice_0x, focal, lovasz) is K numbers or 'auto':
weights from the training labels' class histogram (data/class_stats.py:
`class_weight_method` 'median_frequency' or 'enet'), counted once and cached
in `<workdir>/class_histogram.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors
from cgrseg_jax.data import class_stats, input_pipeline
from cgrseg_jax.data.datasets import IGNORE_INDEX
from cgrseg_jax.models import resize
from cgrseg_jax.platforms import target_platform

log = logging.getLogger(__name__)


def _pixel_weights(labels, valid, class_weight):
  """class_weight[label] per pixel (0 where ignored); None without class weights."""
  if class_weight is None:
    return None
  w = jnp.asarray(class_weight, jnp.float32)
  return jnp.where(valid, w[jnp.where(valid, labels, 0)], 0.0)


def _denominator(labels, valid, avg_non_ignore: bool):
  # mmseg: all pixels, or (avg_non_ignore) the labelled ones; never the sum of the class weights.
  return jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32) if avg_non_ignore else labels.size


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX, class_weight=None, avg_non_ignore: bool = False):
  """Mean over all pixels of -class_weight[label] * log softmax(logits)[label], 0 where label is ignored.

  logits: (N, H, W, K) at the label size, any float dtype (computed in float32).
  labels: (N, H, W) integer class ids; `ignore_index` marks unlabelled pixels.
  class_weight: None or K weights (torch's `weight=`; the mean still divides by
  the pixel count, as mmseg does). avg_non_ignore: divide by the labelled
  pixels instead (mmseg's option of that name).
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  weights = _pixel_weights(labels, valid, class_weight)
  if weights is not None:
    nll = nll * weights
  return jnp.sum(jnp.where(valid, nll, 0.0)) / _denominator(labels, valid, avg_non_ignore)


def segmentation_loss(
  stride8_logits,
  labels,
  ignore_index: int = IGNORE_INDEX,
  class_weight=None,
  avg_non_ignore: bool = False,
  platform: Optional[str] = None,
):
  """mmseg decode-head loss: resize the head output to the labels, then `cross_entropy`
  (with its `class_weight` and `avg_non_ignore`).

  When the labels are an integer multiple of the logits in height (the
  training crops), this runs band by band (`_banded_loss`): the full-size
  logits, 8x512x512x150 floats for an ADE20K batch, are never written to
  memory, and the gradient is computed in the same pass (3x faster than
  resize + cross-entropy + autodiff on a CPU, where the full-size passes are
  bound by memory bandwidth). Same arithmetic per pixel, class weights
  included. Other shapes, and GPU/TPU (where a loop of small bands would only
  add launches), take the plain path. `platform`: the one the loss is compiled
  for (platforms.target_platform: None = this process's devices)."""
  plan = _band_plan(stride8_logits.shape, labels.shape) if target_platform(platform) == 'cpu' else None
  if plan is None:
    logits = resize.resize_bilinear(stride8_logits, labels.shape[1:3], impl=resize.resolve_resize('auto', platform))
    return cross_entropy(logits, labels, ignore_index, class_weight, avg_non_ignore)
  weight = None if class_weight is None else jnp.asarray(class_weight, jnp.float32)
  valid = labels != ignore_index
  return _banded_loss(stride8_logits, labels, weight, plan, ignore_index) / _denominator(labels, valid, avg_non_ignore)


# Full-size rows per band are sized to stay in a core's L2 cache.
_BAND_BYTES = 2 << 20


class _BandPlan(NamedTuple):
  factor: int  # label rows per logit row
  band: int  # logit rows per band
  shifts: tuple[int, ...]  # per output phase r: first source row, relative to the band, minus 1
  w_first: tuple[float, ...]  # per label row: weight of its first source row (a tuple: the plan is hashed)
  w_second: tuple[float, ...]  # ... of its second


def _band_plan(logit_shape, label_shape) -> Optional[_BandPlan]:
  """Row interpolation of `resize.resize_bilinear` as a fixed pattern: output
  row o = f*i + r reads edge-padded rows i + 1 + d_r and i + 2 + d_r (padded
  row q holds logit row clip(q - 1)) with PyTorch's per-row weights; None
  when there is no such pattern."""
  (h8, _, k), (h, w) = logit_shape[1:], label_shape[1:]
  phases = resize.linear_phases(h8, h)
  if phases is None or logit_shape[0] != label_shape[0]:
    return None
  f, rows, _, _ = phases
  i0, i1, w0, w1 = resize.linear_taps(h8, h)
  d = np.array([r[0] for r in rows])
  first = np.arange(h) // f + d[np.arange(h) % f] + 1
  src0, src1 = np.clip(first - 1, 0, h8 - 1), np.clip(first, 0, h8 - 1)
  # Clamped border rows read a padding copy where PyTorch reads a neighbour with weight 0.
  if not ((src0 == i0) & ((src1 == i1) | (w1 == 0))).all():
    return None
  row_bytes = f * w * k * 4
  band = max([b for b in range(1, h8 + 1) if h8 % b == 0 and b * row_bytes <= _BAND_BYTES] or [1])
  return _BandPlan(f, band, tuple(int(v) for v in d), tuple(map(float, w0)), tuple(map(float, w1)))


def _upsample_band(zb, w_first, w_second, plan: _BandPlan, width: int):
  """(band + 2, w8, K) edge-padded logit rows -> (band * f, width, K) label-size rows."""
  nb, f = plan.band, plan.factor
  a, b = w_first.reshape(nb, f), w_second.reshape(nb, f)
  phases = []
  for r, d in enumerate(plan.shifts):
    one = jax.lax.slice_in_dim(zb, 1 + d, 1 + d + nb, axis=0)
    two = jax.lax.slice_in_dim(zb, 2 + d, 2 + d + nb, axis=0)
    phases.append(one * a[:, r, None, None] + two * b[:, r, None, None])
  rows = jnp.stack(phases, axis=1).reshape((nb * f,) + zb.shape[1:])
  return resize.resize_bilinear(rows[None], (nb * f, width))[0]


def _band_pass(logits, labels, weight, plan: _BandPlan, ignore_index: int, with_grad: bool):
  """Sum over pixels of the (class-weighted, when `weight` is not None)
  cross-entropy and, with `with_grad`, its gradient with respect to `logits`,
  one band of rows of one image at a time."""
  n, h8, w8, k = logits.shape
  width = labels.shape[2]
  nb, f = plan.band, plan.factor
  bands = h8 // nb
  padded = jnp.concatenate([logits[:, :1], logits, logits[:, -1:]], axis=1).astype(jnp.float32)
  w_first, w_second = (jnp.asarray(np.float32(v)) for v in (plan.w_first, plan.w_second))
  labels = labels.astype(jnp.int32)
  classes = jnp.arange(k, dtype=jnp.int32)

  def body(index, carry):
    total, grad = carry
    i, j = index // bands, index % bands
    zb = jax.lax.dynamic_slice(padded, (i, j * nb, 0, 0), (1, nb + 2, w8, k))[0]
    lab = jax.lax.dynamic_slice(labels, (i, j * nb * f, 0), (1, nb * f, width))[0]
    a = jax.lax.dynamic_slice(w_first, (j * nb * f,), (nb * f,))
    b = jax.lax.dynamic_slice(w_second, (j * nb * f,), (nb * f,))
    upsample = lambda t: _upsample_band(t, a, b, plan, width)
    z, pull = jax.vjp(upsample, zb) if with_grad else (upsample(zb), None)
    z = jax.lax.optimization_barrier(z)  # materialised once, not recomputed for each consumer
    top = jnp.max(z, -1, keepdims=True)
    lse = top + jnp.log(jnp.sum(jnp.exp(z - top), -1, keepdims=True))
    valid = lab != ignore_index
    picked = jnp.take_along_axis(z, jnp.where(valid, lab, 0)[..., None], -1)
    nll = (lse - picked)[..., 0]
    wpix = _pixel_weights(lab, valid, weight)
    if wpix is not None:
      nll = nll * wpix
    total = total + jnp.sum(jnp.where(valid, nll, 0.0))
    if with_grad:
      target = (classes == lab[..., None]).astype(jnp.float32)
      dz = jnp.exp(z - lse) - target
      if wpix is not None:
        dz = dz * wpix[..., None]
      (dzb,) = pull(jnp.where(valid[..., None], dz, 0.0))
      here = jax.lax.dynamic_slice(grad, (i, j * nb, 0, 0), (1, nb + 2, w8, k))
      grad = jax.lax.dynamic_update_slice(grad, here + dzb[None], (i, j * nb, 0, 0))
    return total, grad

  grad = jnp.zeros(padded.shape, jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
  total, grad = jax.lax.fori_loop(0, n * bands, body, (jnp.zeros((), jnp.float32), grad))
  if not with_grad:
    return total, None
  # The padding rows are copies of the first and last logit rows: fold their gradient back.
  inner = grad[:, 1:-1]
  return total, inner.at[:, 0].add(grad[:, 0]).at[:, -1].add(grad[:, -1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _banded_loss(logits, labels, weight, plan: _BandPlan, ignore_index: int):
  """The pixel SUM of the weighted cross-entropy (the caller divides); no gradient for labels or weights."""
  return _band_pass(logits, labels, weight, plan, ignore_index, with_grad=False)[0]


def _banded_loss_fwd(logits, labels, weight, plan, ignore_index):
  total, grad = _band_pass(logits, labels, weight, plan, ignore_index, with_grad=True)
  return total, grad.astype(logits.dtype)


def _banded_loss_bwd(plan, ignore_index, grad, g):
  del plan, ignore_index
  return (grad * g.astype(grad.dtype), None, None)


_banded_loss.defvjp(_banded_loss_fwd, _banded_loss_bwd)


def ohem_cross_entropy(
  logits,
  labels,
  thresh: float = 0.9,
  min_kept: int = 110_000,
  ignore_index: int = IGNORE_INDEX,
):
  """CSFCN's OHEM cross-entropy (upstream `OhemCrossEntropy2d`), with fixed shapes.

  Over the whole batch: p = softmax probability of each valid pixel's target
  class (1 for ignored pixels). When there are at least `min_kept` valid pixels,
  keep those with p <= threshold, where threshold = max(thresh, the
  `min_kept`-th smallest p); otherwise keep every valid pixel. The loss is the
  mean cross-entropy over the kept pixels. The k-th smallest value comes from a
  full sort (static shape under jit). Deviation: a batch with nothing kept gives
  0 instead of upstream's NaN.

  logits: (N, H, W, K) at the label size (computed in float32); labels (N, H, W).
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), safe[..., None], axis=-1)[..., 0]
  prob = jax.lax.stop_gradient(jnp.where(valid, prob, 1.0))  # selection only; no gradient through it
  threshold = jnp.float32(thresh)
  if min_kept > 0:
    k = min(labels.size, int(min_kept))
    kth = jnp.sort(prob.reshape(-1))[k - 1]
    threshold = jnp.where(kth > threshold, kth, threshold)
  num_valid = jnp.sum(valid)
  use_ohem = (num_valid >= min_kept) & (num_valid > 0)
  kept = valid & jnp.where(use_ohem, prob <= threshold, True)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(kept, nll, 0.0)) / jnp.maximum(jnp.sum(kept), 1)


def _probabilities(logits, use_sigmoid: bool):
  x = logits.astype(jnp.float32)
  if use_sigmoid:
    return jax.nn.sigmoid(x)
  return jax.nn.softmax(x, axis=-1) if x.shape[-1] != 1 else x  # mmseg: no softmax over a single channel


def _kept_classes(num_classes: int, ignore_index: int) -> np.ndarray:
  # mmseg's dice drops the channel whose index is the ignore index (none for 255).
  return np.arange(num_classes) != ignore_index


def dice_loss(
  logits,
  labels,
  use_sigmoid: bool = True,
  naive_dice: bool = False,
  eps: float = 1e-3,
  mask_ignored: bool = False,
  ignore_index: int = IGNORE_INDEX,
):
  """mmseg 1.x `DiceLoss` (v1.1 on; plain path: resize, then this).

  p = sigmoid(logits) (use_sigmoid, mmseg's default) or softmax; t = one-hot
  labels, all-zero on ignored pixels. Per image, over its whole (pixel, class)
  map: d = 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps), or with naive_dice
  d = (2 sum(p t) + eps) / (sum(p) + sum(t) + eps); the loss is mean over
  images of 1 - d. As upstream, ignored pixels only lose their target: their
  predictions still count in sum(p^2) (pushing them towards 0);
  `mask_ignored=True` (not upstream) leaves them out of the sums.

  logits (N, H, W, K) at the label size (float32 inside); labels (N, H, W).
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  k = logits.shape[-1]
  p = _probabilities(logits, use_sigmoid)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  t = ((labels[..., None] == jnp.arange(k)) & valid[..., None]).astype(jnp.float32)
  keep = _kept_classes(k, ignore_index)
  if not keep.all():
    p, t = p[..., keep], t[..., keep]
  if mask_ignored:
    p = p * valid[..., None]
  axes = (1, 2, 3)
  a = jnp.sum(p * t, axes)
  if naive_dice:
    d = (2 * a + eps) / (jnp.sum(p, axes) + jnp.sum(t, axes) + eps)
  else:
    d = 2 * a / (jnp.sum(p * p, axes) + eps + jnp.sum(t * t, axes) + eps)
  return jnp.mean(1 - d)


def dice_loss_0x(
  logits,
  labels,
  smooth: float = 1.0,
  exponent: float = 2.0,
  class_weight=None,
  ignore_index: int = IGNORE_INDEX,
):
  """mmseg 0.x (0.27) `DiceLoss` (plain path: resize, then this).

  p = softmax(logits), t = one-hot of the labels clipped to [0, K-1] (so, as
  upstream, an ignored pixel is class K-1 in t), m = 1 on labelled pixels. For
  each class c and image: 1 - (2 sum(p_c t_c m) + smooth) / (sum(p_c^e + t_c^e)
  + smooth) with e = exponent; averaged over images, times class_weight[c],
  summed over the classes other than the ignore index and divided by K.
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  k = logits.shape[-1]
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index)[..., None]
  t = (jnp.clip(labels, 0, k - 1)[..., None] == jnp.arange(k)).astype(jnp.float32)
  num = 2 * jnp.sum(p * t * valid, (1, 2)) + smooth
  den = jnp.sum(p**exponent + t**exponent, (1, 2)) + smooth
  per_class = jnp.mean(1 - num / den, axis=0)
  if class_weight is not None:
    per_class = per_class * jnp.asarray(class_weight, jnp.float32)
  return jnp.sum(jnp.where(_kept_classes(k, ignore_index), per_class, 0.0)) / k


def focal_loss(
  logits,
  labels,
  gamma: float = 2.0,
  alpha=0.5,
  class_weight=None,
  ignore_index: int = IGNORE_INDEX,
):
  """mmseg 1.x `FocalLoss` (sigmoid; plain path: resize, then this).

  Each (pixel, class) is a binary problem with target t = one-hot label:
  bce(logit, t) * (alpha t + (1 - alpha)(1 - t)) * (1 - p_t)^gamma, p_t the
  sigmoid probability of t; times class_weight[c], 0 on ignored pixels, and
  the mean over ALL N*H*W*K elements (ignored pixels in the denominator, as
  upstream's `weight_reduce_loss` mean). alpha: a number or K numbers.
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  k = logits.shape[-1]
  x = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  t = (jnp.where(valid, labels, 0)[..., None] == jnp.arange(k)).astype(jnp.float32)
  s = jax.nn.sigmoid(x)
  alpha = jnp.asarray(alpha, jnp.float32)
  modulating = ((1 - s) * t + s * (1 - t)) ** gamma
  loss = (jax.nn.softplus(x) - x * t) * (alpha * t + (1 - alpha) * (1 - t)) * modulating
  if class_weight is not None:
    loss = loss * jnp.asarray(class_weight, jnp.float32)
  return jnp.mean(jnp.where(valid[..., None], loss, 0.0))


def _lovasz_flat(probs, labels, valid, classes, class_weight):
  """Lovász-softmax of one group of pixels: probs (P, K), labels and valid (P,)."""
  k = probs.shape[-1]
  fg = ((labels[:, None] == jnp.arange(k)) & valid[:, None]).astype(jnp.float32).T  # (K, P)
  # Ignored pixels get error -1: sorted behind every real error (>= 0), they
  # leave the Jaccard of the labelled prefix unchanged and are masked below.
  errors = jnp.where(valid[None], jnp.abs(fg - probs.T), -1.0)
  order = jnp.argsort(-errors, axis=-1)  # descending errors
  errors = jnp.take_along_axis(errors, order, -1)
  fg = jnp.take_along_axis(fg, order, -1)
  gts = jnp.sum(fg, -1, keepdims=True)
  intersection = gts - jnp.cumsum(fg, -1)
  union = gts + jnp.cumsum(1 - fg, -1)  # >= 1: no division by zero
  jaccard = 1 - intersection / union
  grad = jnp.concatenate([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], -1)  # the extension's gradient
  labelled = jnp.arange(errors.shape[-1]) < jnp.sum(valid)  # the sorted labelled pixels come first
  per_class = jnp.sum(jnp.where(labelled, errors, 0.0) * grad, -1)  # (K,)
  if class_weight is not None:
    per_class = per_class * jnp.asarray(class_weight, jnp.float32)
  if classes == 'present':
    chosen = gts[:, 0] > 0
  elif classes == 'all':
    chosen = jnp.ones((k,), bool)
  else:
    chosen = jnp.asarray(np.isin(np.arange(k), classes))
  loss = jnp.sum(jnp.where(chosen, per_class, 0.0)) / jnp.maximum(jnp.sum(chosen), 1)
  return jnp.where(jnp.any(valid), loss, 0.0)  # a group with no labelled pixel: 0


def lovasz_softmax_loss(
  logits,
  labels,
  per_image: bool = False,
  classes='present',
  class_weight=None,
  ignore_index: int = IGNORE_INDEX,
):
  """Lovász-softmax (Berman et al. 2018; mmseg's `LovaszLoss`, multi_class; plain path).

  Over the labelled pixels of the batch (or of each image, `per_image`, then
  the mean over images, an image without labelled pixels giving 0): for class
  c, errors e = |[label == c] - softmax_c|, sorted descending, dotted with the
  gradient of the Lovász extension of the Jaccard loss at the sorted ground
  truth; times class_weight[c]; averaged over the classes: 'present' (those
  with a labelled pixel in the group), 'all', or a list of class ids.
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  n, k = logits.shape[0], logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  classes = classes if isinstance(classes, str) else tuple(int(c) for c in classes)
  flat = functools.partial(_lovasz_flat, classes=classes, class_weight=class_weight)
  if per_image:
    per = jax.vmap(flat)(probs.reshape(n, -1, k), labels.reshape(n, -1), valid.reshape(n, -1))
    return jnp.mean(per)
  return flat(probs.reshape(-1, k), labels.reshape(-1), valid.reshape(-1))


def _to_labels(logits, labels, platform=None):
  # Logits at another stride are resized as mmseg does (bilinear, align_corners False).
  if logits.shape[1:3] == labels.shape[1:3]:
    return logits
  return resize.resize_bilinear(logits, labels.shape[1:3], impl=resize.resolve_resize('auto', platform))


# ------------------------------------------------------------------ config.loss -> loss


class _BadOption(Exception):
  """An option of one loss entry; `build_loss` names the entry."""

  def __init__(self, option: str, value, expected: str):
    super().__init__(option)
    self.option, self.value, self.expected = option, value, expected


class _Term(NamedTuple):
  fn: Callable  # (logits, labels) -> scalar
  at_label_size: bool  # fn wants logits resized to the labels (False: it resizes itself)
  describe: str


def _number(option, value, minimum=None, maximum=None) -> float:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
  if not ok:
    bounds = f' in [{minimum}, {maximum}]' if maximum is not None else (f' >= {minimum}' if minimum is not None else '')
    raise _BadOption(option, value, 'a number' + bounds)
  return float(value)


def _flag(option, value) -> bool:
  if not isinstance(value, bool):
    raise _BadOption(option, value, 'True or False')
  return value


def _numbers(option, value, k: Optional[int], minimum=None, maximum=None, what='weights') -> np.ndarray:
  if isinstance(value, str) or not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
    raise _BadOption(option, value, f'a list of {k or "K"} {what}')
  if k is not None and len(value) != k:
    raise _BadOption(option, value, f'{k} {what} (one per class), got {len(value)}')
  return np.asarray([_number(option, v, minimum, maximum) for v in value], np.float32)


@dataclasses.dataclass
class _Context:
  config: object
  ignore_index: int
  workdir: object
  num_classes: Optional[int]
  platform: Optional[str] = None  # what the loss is compiled for (the banded CPU path)
  _histogram: object = None

  def histogram(self):
    if self._histogram is None:  # counted (or read) once for every entry of the spec
      self._histogram = class_stats.train_histogram(self.config, self.workdir)
    return self._histogram

  def class_weight(self, value, method) -> tuple[Optional[np.ndarray], str]:
    """(K weights or None, how they were chosen for the log)."""
    auto = isinstance(value, str) and value == 'auto'
    if method is not None and not auto:
      raise _BadOption('class_weight_method', method, "nothing unless class_weight='auto'")
    if value is None:
      return None, ''
    if auto:
      method = 'median_frequency' if method is None else method
      if method not in class_stats.WEIGHT_METHODS:
        raise _BadOption('class_weight_method', method, f'one of {list(class_stats.WEIGHT_METHODS)}')
      hist = self.histogram()
      weights = class_stats.class_weights(hist.counts, method)
      log.info(
        'class weights (%s) from the class histogram of %s: %s',
        method,
        hist.origin,
        [round(float(w), 4) for w in weights],
      )
      return weights, f'class_weight=auto {method}'
    if isinstance(value, str):
      raise _BadOption('class_weight', value, f"'auto' or a list of {self.num_classes or 'K'} weights")
    return _numbers('class_weight', value, self.num_classes), 'class_weight=[...]'


def _with_options(describe: str, *options: str) -> str:
  options = [o for o in options if o]
  return f'{describe}({", ".join(options)})' if options else describe


def _cross_entropy(ctx, class_weight=None, class_weight_method=None, avg_non_ignore=False) -> _Term:
  weight, how = ctx.class_weight(class_weight, class_weight_method)
  avg = _flag('avg_non_ignore', avg_non_ignore)
  fn = functools.partial(
    segmentation_loss, ignore_index=ctx.ignore_index, class_weight=weight, avg_non_ignore=avg, platform=ctx.platform
  )
  return _Term(fn, False, _with_options('cross_entropy', how, 'avg_non_ignore' if avg else ''))


def _ohem(ctx, thresh=None, min_kept=None) -> _Term:
  ohem = ctx.config.get('ohem') if hasattr(ctx.config, 'get') else None
  thresh = _number('thresh', ohem.thresh if thresh is None and ohem is not None else thresh, 0.0, 1.0)
  min_kept = ohem.min_kept if min_kept is None and ohem is not None else min_kept
  if not isinstance(min_kept, int) or isinstance(min_kept, bool) or min_kept < 0:
    raise _BadOption('min_kept', min_kept, 'an integer >= 0 (pixels of the global batch)')
  fn = functools.partial(ohem_cross_entropy, thresh=thresh, min_kept=min_kept, ignore_index=ctx.ignore_index)
  return _Term(fn, True, f'ohem(thresh={thresh}, min_kept={min_kept})')


def _dice(ctx, use_sigmoid=True, naive_dice=False, eps=1e-3, mask_ignored=False) -> _Term:
  kw = dict(
    use_sigmoid=_flag('use_sigmoid', use_sigmoid),
    naive_dice=_flag('naive_dice', naive_dice),
    eps=_number('eps', eps, 0.0),
    mask_ignored=_flag('mask_ignored', mask_ignored),
  )
  describe = _with_options('dice', *(f'{k}={v}' for k, v in kw.items()))
  return _Term(functools.partial(dice_loss, ignore_index=ctx.ignore_index, **kw), True, describe)


def _dice_0x(ctx, smooth=1.0, exponent=2.0, class_weight=None, class_weight_method=None) -> _Term:
  weight, how = ctx.class_weight(class_weight, class_weight_method)
  smooth, exponent = _number('smooth', smooth, 0.0), _number('exponent', exponent, 1.0)
  fn = functools.partial(
    dice_loss_0x, smooth=smooth, exponent=exponent, class_weight=weight, ignore_index=ctx.ignore_index
  )
  return _Term(fn, True, _with_options('dice_0x', f'smooth={smooth}', f'exponent={exponent}', how))


def _focal(ctx, gamma=2.0, alpha=0.5, class_weight=None, class_weight_method=None) -> _Term:
  weight, how = ctx.class_weight(class_weight, class_weight_method)
  gamma = _number('gamma', gamma, 0.0)
  if isinstance(alpha, (list, tuple)):
    alpha = _numbers('alpha', alpha, ctx.num_classes, 0.0, 1.0, what='numbers in [0, 1]')
  else:
    alpha = _number('alpha', alpha, 0.0, 1.0)
  fn = functools.partial(focal_loss, gamma=gamma, alpha=alpha, class_weight=weight, ignore_index=ctx.ignore_index)
  return _Term(fn, True, _with_options('focal', f'gamma={gamma}', how))


def _lovasz(ctx, per_image=False, classes='present', class_weight=None, class_weight_method=None) -> _Term:
  weight, how = ctx.class_weight(class_weight, class_weight_method)
  per_image = _flag('per_image', per_image)
  if not (classes in ('present', 'all') if isinstance(classes, str) else isinstance(classes, (list, tuple))):
    raise _BadOption('classes', classes, "'present', 'all' or a list of class ids")
  if not isinstance(classes, str):
    k = ctx.num_classes
    bad = [c for c in classes if not isinstance(c, int) or isinstance(c, bool) or c < 0 or (k and c >= k)]
    if bad or not classes or len(set(classes)) != len(classes):
      raise _BadOption('classes', classes, f'distinct class ids in [0, {k or "K"})')
    classes = tuple(classes)
  fn = functools.partial(
    lovasz_softmax_loss, per_image=per_image, classes=classes, class_weight=weight, ignore_index=ctx.ignore_index
  )
  return _Term(fn, True, _with_options('lovasz', 'per_image' if per_image else '', f'classes={classes}', how))


# name -> builder(context, **options) -> _Term; the options are the builder's keywords.
LOSSES = {
  'cross_entropy': _cross_entropy,
  'ohem': _ohem,
  'dice': _dice,
  'dice_0x': _dice_0x,
  'focal': _focal,
  'lovasz': _lovasz,
}


def _entries(spec) -> list[tuple[str, str, float, dict]]:
  """config.loss -> [(where, name, weight, options)]."""
  if isinstance(spec, str):
    return [('config.loss', spec, 1.0, {})]
  form = 'a loss name or a list of (name, weight) / (name, weight, {options}) entries'
  if not isinstance(spec, (list, tuple)) or not spec:
    raise errors.ConfigError(f'config.loss={spec!r}; expected {form}')
  if isinstance(spec[0], str) and len(spec) in (2, 3) and isinstance(spec[1], (int, float)):
    spec = [spec]  # one entry on its own: ('cross_entropy', 1.0, {...})
  out = []
  for i, entry in enumerate(spec):
    where = f'config.loss[{i}]'
    if isinstance(entry, str):
      entry = (entry, 1.0)
    if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3) or not isinstance(entry[0], str):
      raise errors.ConfigError(f'{where}={entry!r}; expected (name, weight) or (name, weight, {{options}}) ({form})')
    name, weight = entry[0], entry[1]
    options = entry[2] if len(entry) == 3 else {}
    try:
      weight = _number('weight', weight, 0.0)
    except _BadOption:
      raise errors.ConfigError(f'{where} ({name!r}): weight {weight!r}; expected a number >= 0') from None
    if options is None:
      options = {}
    if not hasattr(options, 'items'):
      raise errors.ConfigError(f'{where} ({name!r}): options {options!r}; expected a dict of option: value')
    out.append((where, name, weight, dict(options.items())))
  return out


def _num_classes(config) -> Optional[int]:
  try:
    k = config.model.get('num_classes')
    if k is None:
      k = input_pipeline.dataset_info(config).num_classes
    return int(k)
  except Exception:  # a partial config (tests): the lengths are checked against the logits instead
    return None


def _build_term(where: str, name: str, options: dict, ctx: _Context) -> _Term:
  if name not in LOSSES:
    raise errors.ConfigError(f'{where}={name!r}; expected one of {sorted(LOSSES)}')
  builder = LOSSES[name]
  accepted = [p for p in inspect.signature(builder).parameters if p != 'ctx']
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise errors.ConfigError(f'{where} ({name!r}): unknown option {unknown[0]!r}; expected some of {accepted}')
  try:
    return builder(ctx, **options)
  except _BadOption as e:
    raise errors.ConfigError(f'{where} ({name!r}): {e.option}={e.value!r}; expected {e.expected}') from None


def build_loss(spec, config, ignore_index: int, workdir=None, platform=None):
  """config.loss (default: the model family's recipe) -> loss(logits at any stride, labels),
  with the dataset's `ignore_index`. `spec`: a name of `LOSSES` or a list of
  (name, weight[, {options}]) entries, summed with their weights (module
  docstring). `workdir` holds the class histogram cache of class_weight='auto'
  (None: count without caching). Bad names or options: ConfigError naming the entry."""
  ctx = _Context(config, int(ignore_index), workdir, _num_classes(config), platform)
  terms = [(weight, _build_term(where, name, options, ctx)) for where, name, weight, options in _entries(spec)]
  log.info('training loss: %s', ' + '.join(f'{w:g} * {t.describe}' for w, t in terms))
  if len(terms) == 1 and terms[0][0] == 1.0:
    weight, term = terms[0]
    return (
      term.fn
      if not term.at_label_size
      else lambda logits, labels: term.fn(_to_labels(logits, labels, platform), labels)
    )

  def loss(logits, labels):
    resized = _to_labels(logits, labels, platform) if any(t.at_label_size for _, t in terms) else None  # once for all
    values = [t.fn(resized if t.at_label_size else logits, labels) for _, t in terms]
    return sum(w * v for (w, _), v in zip(terms, values))

  return loss
