"""The mmseg metric (evaluation/metric.py) against a numpy confusion matrix."""

import jax.numpy as jnp
import numpy as np

from cgrseg_jax.evaluation import metric


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
    np.asarray(metric.area_counts(jnp.asarray(p), jnp.asarray(l), k, 255), np.int64) for p, l in zip(preds, labels)
  )
  got = metric.metrics_from_areas(areas, [f'c{i}' for i in range(k)])
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
  table = metric.format_table(got)
  assert 'c6' in table and 'mIoU' in table


def test_ignore_index_is_the_one_given():
  # A dataset whose ignore index is not 255: its pixels are left out, 255 is an id like any other.
  label = np.array([[0, 1, 7], [7, 2, 1]])
  pred = np.array([[0, 2, 1], [0, 2, 1]])
  areas = np.asarray(metric.area_counts(jnp.asarray(pred), jnp.asarray(label), 3, ignore_index=7))
  # valid pixels: (0,0) 0->0, (0,1) 1->2, (1,1) 2->2, (1,2) 1->1
  np.testing.assert_array_equal(areas[3], [1, 2, 1])  # label areas without the two 7s
  np.testing.assert_array_equal(areas[2], [1, 1, 2])  # predictions on ignored pixels do not count
  np.testing.assert_array_equal(areas[0], [1, 1, 1])
