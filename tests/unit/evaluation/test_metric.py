"""The mmseg metric (evaluation/metric.py) against a numpy confusion matrix:
the areas, the device confusion matrix (np.bincount), the metrics and
most-confused classes it gives, and the per-image mIoU and worst-image ranking."""

import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax.evaluation import metric, report


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


def _random_batch(rng, shape, k, ignore):
  label = rng.integers(0, k, size=shape)
  label[rng.random(shape) < 0.15] = ignore
  pred = np.where(rng.random(shape) < 0.5, label % k, rng.integers(0, k, size=shape))
  return pred, label


@pytest.mark.parametrize('shape, k', [((2, 17, 23), 3), ((3, 9, 31), 7), ((1, 40, 5), 150), ((4, 8, 8), 19)])
def test_confusion_is_a_bincount_of_the_valid_pixels(shape, k):
  rng = np.random.default_rng(k)
  pred, label = _random_batch(rng, shape, k, ignore=255)
  got = np.asarray(metric.confusion_counts(jnp.asarray(pred), jnp.asarray(label), k, 255))
  assert got.shape == (shape[0], k + 1, k + 1) and got.dtype == np.int32
  for b in range(shape[0]):
    m = label[b] != 255
    want = np.bincount(label[b][m] * k + pred[b][m], minlength=k * k).reshape(k, k)
    np.testing.assert_array_equal(got[b, :k, :k], want)
    assert got[b, k].sum() == got[b, :, k].sum() == 0  # no id out of range here


def test_confusion_areas_and_metrics_reproduce_the_area_counts_exactly():
  k = 7
  rng = np.random.default_rng(3)
  total = np.zeros((k + 1, k + 1), np.int64)
  areas = np.zeros((4, k), np.int64)
  for shape in [(2, 17, 23), (3, 9, 31)]:
    pred, label = _random_batch(rng, shape, 5, ignore=255)  # classes 5, 6 never labelled or predicted
    pred[0, 0, :4] = [6, 9, -1, 6]  # ids outside [0, K) count in no area, as mmseg's histc
    label[0, 1, :2] = [12, 6]
    conf = metric.confusion_counts(jnp.asarray(pred), jnp.asarray(label), k, 255)
    total += np.asarray(conf, np.int64).sum(0)
    batch_areas = np.asarray(metric.area_counts(jnp.asarray(pred), jnp.asarray(label), k, 255), np.int64)
    np.testing.assert_array_equal(np.asarray(metric.areas_from_confusion(conf)).sum(0), batch_areas)
    areas += batch_areas
  np.testing.assert_array_equal(metric.areas_from_confusion(total), areas)
  names = [f'c{i}' for i in range(k)]
  want, got = metric.metrics_from_areas(areas, names), metric.metrics_from_confusion(total, names)
  for key in ('mIoU', 'mAcc', 'aAcc'):
    np.testing.assert_array_equal(got[key], want[key])
  for n in names:
    np.testing.assert_array_equal(got['per_class'][n]['IoU'], want['per_class'][n]['IoU'])
    np.testing.assert_array_equal(got['per_class'][n]['Acc'], want['per_class'][n]['Acc'])
  np.testing.assert_array_equal(got['confusion'], total[:k, :k])
  # Most confused: the largest off-diagonal entry of the class's row, as a share of the row.
  square = total[:k, :k].astype(np.float64)
  for i, n in enumerate(names[:5]):
    row = square[i].copy()
    row[i] = 0
    assert got['per_class'][n]['confused_with'] == names[int(row.argmax())]
    assert got['per_class'][n]['confused_rate'] == pytest.approx(row.max() / square[i].sum())
  assert got['per_class']['c5']['confused_with'] is None  # never labelled
  assert 'Most confused with' in metric.format_table(got)


def test_image_miou_and_the_worst_ranking_match_a_numpy_recomputation():
  k = 6
  rng = np.random.default_rng(11)
  pred, label = _random_batch(rng, (9, 12, 10), k, ignore=255)
  pred[3] = label[3] % k  # a perfect image
  label[5] = 255  # no valid pixel: NaN, left out of the ranking
  conf = metric.confusion_counts(jnp.asarray(pred), jnp.asarray(label), k, 255)
  got = np.asarray(metric.image_miou(metric.areas_from_confusion(conf)))
  want = []
  for p, l in zip(pred, label):
    m = l != 255
    ious = [((p == c) & (l == c) & m).sum() / u for c in range(k) if (u := (((p == c) | (l == c)) & m).sum()) > 0]
    want.append(np.mean(ious) if ious else np.nan)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[3] == 1.0 and np.isnan(got[5])
  scores = {100 + i: float(s) for i, s in enumerate(got)}
  ranked = report.worst_images(scores, 4)
  order = sorted((i for i in range(9) if i != 5), key=lambda i: want[i])[:4]
  assert [i for i, _ in ranked] == [100 + i for i in order]
