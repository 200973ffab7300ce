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
