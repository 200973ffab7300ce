"""The decode-head losses: mmseg 0.27's (`CrossEntropyLoss`, `avg_non_ignore=False`) and CSFCN's OHEM.

mmseg's `BaseDecodeHead.losses` resizes the stride-8 logits bilinearly
(align_corners False) to the label size, takes per-pixel cross-entropy with
the dataset's ignore index (255; ignored pixels contribute 0) and averages
over ALL pixels of the batch, ignored ones included. With `loss_weight=1.0`
that is the loss. `LOSSES` names them for `config.loss` (or the family's recipe).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import errors
from cgrseg_jax.data.datasets import IGNORE_INDEX
from cgrseg_jax.models import resize


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Mean over all pixels of -log softmax(logits)[label], 0 where label is ignored.

  logits: (N, H, W, K) at the label size, any float dtype (computed in float32).
  labels: (N, H, W) integer class ids; `ignore_index` marks unlabelled pixels.
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} disagree in (N, H, W)')
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size


def segmentation_loss(stride8_logits, labels, ignore_index: int = IGNORE_INDEX):
  """mmseg decode-head loss: resize the head output to the labels, then `cross_entropy`.

  When the labels are an integer multiple of the logits in height (the
  training crops), this runs band by band (`_banded_loss`): the full-size
  logits, 8x512x512x150 floats for an ADE20K batch, are never written to
  memory, and the gradient is computed in the same pass (3x faster than
  resize + cross-entropy + autodiff on a CPU, where the full-size passes are
  bound by memory bandwidth). Same arithmetic per pixel. Other shapes, and
  GPU/TPU (where a loop of small bands would only add launches), take the
  plain path."""
  plan = _band_plan(stride8_logits.shape, labels.shape) if jax.default_backend() == 'cpu' else None
  if plan is None:
    logits = resize.resize_bilinear(stride8_logits, labels.shape[1:3])
    return cross_entropy(logits, labels, ignore_index)
  return _banded_loss(stride8_logits, labels, plan, ignore_index)


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


def _band_pass(logits, labels, plan: _BandPlan, ignore_index: int, with_grad: bool):
  """Sum over pixels of the cross-entropy and, with `with_grad`, its gradient
  with respect to `logits`, one band of rows of one image at a time."""
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
    total = total + jnp.sum(jnp.where(valid, (lse - picked)[..., 0], 0.0))
    if with_grad:
      target = (classes == lab[..., None]).astype(jnp.float32)
      (dzb,) = pull(jnp.where(valid[..., None], jnp.exp(z - lse) - target, 0.0))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _banded_loss(logits, labels, plan: _BandPlan, ignore_index: int):
  return _band_pass(logits, labels, plan, ignore_index, with_grad=False)[0] / labels.size


def _banded_loss_fwd(logits, labels, plan, ignore_index):
  total, grad = _band_pass(logits, labels, plan, ignore_index, with_grad=True)
  return total / labels.size, (grad / labels.size).astype(logits.dtype)


def _banded_loss_bwd(plan, ignore_index, grad, g):
  del plan, ignore_index
  return (grad * g.astype(grad.dtype), None)


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


def _to_labels(logits, labels):
  # Logits at another stride are resized as mmseg does (bilinear, align_corners False).
  return logits if logits.shape[1:3] == labels.shape[1:3] else resize.resize_bilinear(logits, labels.shape[1:3])


def _ohem(config, ignore_index: int):
  thresh, min_kept = float(config.ohem.thresh), int(config.ohem.min_kept)
  return lambda logits, labels: ohem_cross_entropy(_to_labels(logits, labels), labels, thresh, min_kept, ignore_index)


# config.loss -> builder(config, ignore_index) -> loss(logits at any stride, labels).
LOSSES = {
  'cross_entropy': lambda config, ignore_index: functools.partial(segmentation_loss, ignore_index=ignore_index),
  'ohem': _ohem,
}


def build_loss(name: str, config, ignore_index: int):
  """config.loss (default: the model family's recipe) -> loss(logits at any stride, labels),
  with the dataset's `ignore_index`. 'cross_entropy': mmseg's decode-head loss;
  'ohem': `ohem_cross_entropy` with `config.ohem.thresh / min_kept`."""
  if name not in LOSSES:
    raise errors.ConfigError(f'config.loss={name!r}; expected one of {sorted(LOSSES)}')
  return LOSSES[name](config, ignore_index)
