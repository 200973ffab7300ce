"""The decode-head loss of mmseg 0.27 (`CrossEntropyLoss`, `avg_non_ignore=False`).

mmseg's `BaseDecodeHead.losses` resizes the stride-8 logits bilinearly
(align_corners False) to the label size, takes per-pixel cross-entropy with
`ignore_index=255` (ignored pixels contribute 0) and averages over ALL pixels
of the batch, ignored ones included. With `loss_weight=1.0` that is the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cgrseg_jax.models import resize

IGNORE_INDEX = 255


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
  """mmseg decode-head loss: resize the head output to the labels, then `cross_entropy`."""
  logits = resize.resize_bilinear(stride8_logits, labels.shape[1:3])
  return cross_entropy(logits, labels, ignore_index)


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


def build_loss(name: str, config):
  """config.loss (default: the model family's recipe) -> loss(logits at any stride, labels).
  'cross_entropy': mmseg's decode-head loss; 'ohem': `ohem_cross_entropy` with
  `config.ohem.thresh / min_kept`."""
  if name == 'cross_entropy':
    return segmentation_loss
  if name == 'ohem':
    thresh, min_kept = float(config.ohem.thresh), int(config.ohem.min_kept)
    return lambda logits, labels: ohem_cross_entropy(_to_labels(logits, labels), labels, thresh, min_kept)
  raise ValueError(f'config.loss={name!r}; expected one of {sorted(LOSSES)}')


LOSSES = ('cross_entropy', 'ohem')
