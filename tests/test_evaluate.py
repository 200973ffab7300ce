"""The mmseg metric against a numpy confusion matrix, and the test-time
crop + resize against torch.nn.functional.interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax import evaluate, testtime


def numpy_reference(preds, labels, k, ignore=255):
  """Confusion matrix over all batches, then the mmseg formulas."""
  cm = np.zeros((k, k), np.int64)
  for p, l in zip(preds, labels):
    m = l != ignore
    cm += np.bincount(l[m].astype(np.int64) * k + p[m], minlength=k * k).reshape(k, k)
  inter = np.diag(cm).astype(np.float64)
  label_area, pred_area = cm.sum(1), cm.sum(0)
  union = label_area + pred_area - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    iou, acc = inter / union, inter / label_area
  return dict(iou=iou, acc=acc, miou=np.nanmean(iou), macc=np.nanmean(acc), aacc=inter.sum() / label_area.sum())


def test_metric_matches_confusion_matrix():
  k = 7
  rng = np.random.default_rng(0)
  preds, labels = [], []
  for shape in [(2, 17, 23), (3, 9, 31), (1, 40, 5)]:
    label = rng.integers(0, 5, size=shape)  # classes 5, 6 never labelled
    label[rng.random(shape) < 0.2] = 255  # ignore pixels
    pred = np.where(rng.random(shape) < 0.6, np.minimum(label, k - 1), rng.integers(0, k, size=shape))
    pred[pred == 5] = 0  # class 5: absent everywhere -> NaN IoU
    pred[(label == 255) & (rng.random(shape) < 0.5)] = 6  # predictions on ignored pixels don't count
    preds.append(pred)
    labels.append(label)
  areas = sum(
    np.asarray(testtime.area_counts(jnp.asarray(p), jnp.asarray(l), k), np.int64) for p, l in zip(preds, labels)
  )
  got = evaluate.metrics_from_areas(areas, [f'c{i}' for i in range(k)])
  ref = numpy_reference(preds, labels, k)
  iou = np.array([got['per_class'][f'c{i}']['IoU'] for i in range(k)])
  acc = np.array([got['per_class'][f'c{i}']['Acc'] for i in range(k)])
  assert np.isnan(iou[5]) and np.isnan(ref['iou'][5])
  assert iou[6] == 0.0 and np.isnan(acc[6])  # predicted, never labelled
  np.testing.assert_allclose(iou, ref['iou'], rtol=1e-12)
  np.testing.assert_allclose(acc, ref['acc'], rtol=1e-12)
  np.testing.assert_allclose(got['mIoU'], ref['miou'], rtol=1e-12)
  np.testing.assert_allclose(got['mAcc'], ref['macc'], rtol=1e-12)
  np.testing.assert_allclose(got['aAcc'], ref['aacc'], rtol=1e-12)
  table = evaluate.format_table(got)
  assert 'c6' in table and 'mIoU' in table


@pytest.mark.parametrize('valid,orig', [((32, 48), (70, 101)), ((40, 40), (23, 17)), ((13, 64), (13, 64))])
def test_crop_and_resize_matches_torch(valid, orig):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  padded = rng.normal(size=(64, 64, 5)).astype(np.float32)
  out_shape = (96, 128)
  got = jax.jit(testtime.crop_and_resize, static_argnums=3)(
    jnp.asarray(padded), jnp.asarray(valid, jnp.int32), jnp.asarray(orig, jnp.int32), out_shape
  )
  t = torch.from_numpy(padded.transpose(2, 0, 1)[None, :, : valid[0], : valid[1]].copy())
  ref = torch.nn.functional.interpolate(t, size=orig, mode='bilinear', align_corners=False)[0].numpy()
  ref = ref.transpose(1, 2, 0)
  np.testing.assert_allclose(np.asarray(got)[: orig[0], : orig[1]], ref, rtol=1e-5, atol=1e-5)
