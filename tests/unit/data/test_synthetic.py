"""The procedural synthetic dataset: determinism, label exactness, variety."""

import time

import cv2
import numpy as np
import pytest

from cgrseg_jax.data.synthetic import SyntheticSegmentation


def test_deterministic_from_seed_and_index():
  a = SyntheticSegmentation(num_samples=10, num_classes=7, image_size=(64, 80), seed=5)
  b = SyntheticSegmentation(num_samples=10, num_classes=7, image_size=(64, 80), seed=5)
  for i in (0, 3, 9):
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    np.testing.assert_array_equal(a[i]['label'], b[i]['label'])
  # Reading order does not matter (no hidden sequential state).
  np.testing.assert_array_equal(a[3]['image'], b[3]['image'])
  c = SyntheticSegmentation(num_samples=10, num_classes=7, image_size=(64, 80), seed=6)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  val = SyntheticSegmentation(num_samples=10, num_classes=7, image_size=(64, 80), seed=5, split='val')
  assert not np.array_equal(a[0]['label'], val[0]['label'])


def test_shapes_dtypes_and_class_range():
  src = SyntheticSegmentation(num_samples=30, num_classes=5, image_size=(50, 70), seed=0)
  seen = set()
  for i in range(len(src)):
    rec = src[i]
    assert rec['image'].shape == (50, 70, 3) and rec['image'].dtype == np.uint8
    assert rec['label'].shape == (50, 70) and rec['label'].dtype == np.uint8
    assert rec['index'] == i
    seen |= set(np.unique(rec['label']).tolist())
  assert seen == set(range(5))  # every class occurs, nothing else
  with pytest.raises(IndexError):
    src[30]


def test_labels_are_exact_shape_colours():
  """Pixels of a shape class carry that class's hue; the background is the
  only class without a fixed hue. A label that bled by even a pixel row
  into the neighbour would show up as hue outliers."""
  src = SyntheticSegmentation(num_samples=12, num_classes=7, image_size=(96, 128), seed=2)
  for i in range(len(src)):
    rec = src[i]
    hsv = cv2.cvtColor(rec['image'], cv2.COLOR_BGR2HSV)
    for cls in range(1, 7):
      mask = rec['label'] == cls
      if mask.sum() < 50:
        continue
      expected = 180.0 * (cls - 1) / 6
      # Textures darken but keep hue; compare on saturated pixels.
      sat = mask & (hsv[..., 1] > 60) & (hsv[..., 2] > 60)
      diff = np.abs((hsv[..., 0][sat].astype(float) - expected + 90) % 180 - 90)
      assert np.mean(diff <= 12) > 0.97, (i, cls)


def test_scenes_vary_in_size_count_and_occlusion():
  src = SyntheticSegmentation(num_samples=40, num_classes=8, image_size=(128, 160), seed=3)
  fg_fraction = [float((src[i]['label'] > 0).mean()) for i in range(len(src))]
  n_classes = [len(np.unique(src[i]['label'])) for i in range(len(src))]
  assert min(fg_fraction) < 0.25 < max(fg_fraction)
  assert min(n_classes) < max(n_classes)


def test_invalid_arguments():
  with pytest.raises(ValueError, match='num_classes'):
    SyntheticSegmentation(num_classes=1)
  with pytest.raises(ValueError, match='split'):
    SyntheticSegmentation(split='holdout')
  with pytest.raises(ValueError, match='image_size'):
    SyntheticSegmentation(image_size=(8, 8))


def test_fast_enough_for_cpu_training():
  src = SyntheticSegmentation(num_samples=20, num_classes=8, image_size=(512, 683), seed=0)
  src[0]  # build the noise field
  start = time.perf_counter()
  for i in range(20):
    src[i]
  per_image = (time.perf_counter() - start) / 20
  # A few ms on one core; generous bound for a loaded CI machine.
  assert per_image < 0.25
