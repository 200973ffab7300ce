"""CSFCN augmentations against the upstream formulas (restated here; neither PIL
nor torchvision is installed)."""

import colorsys

import numpy as np
import pytest

from cgrseg_jax.data import torchvision_transforms as T


def _element(h=30, w=44, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
    'label': rng.integers(0, 19, (h, w), dtype=np.uint8),
  }


def upstream_city_size(h, w, short):  # segbase._sync_transform
  if h > w:
    return int(1.0 * h * short / w), short
  return short, int(1.0 * w * short / h)


def upstream_camvid_size(h, w, long):  # camvid._sync_transform
  if h > w:
    return long, int(1.0 * w * long / h + 0.5)
  return int(1.0 * h * long / w + 0.5), long


@pytest.mark.parametrize('hw', [(1024, 2048), (720, 960), (960, 720), (500, 500), (333, 517)])
@pytest.mark.parametrize('size', [128, 777, 2048])
def test_side_scale_sizes(hw, size):
  assert T.side_scale_size(hw, size, 'short') == upstream_city_size(*hw, size)
  assert T.side_scale_size(hw, size, 'long', round_half_up=True) == upstream_camvid_size(*hw, size)


def test_random_side_scale_draws_inclusive_range_and_label_is_pil_nearest():
  e = _element(20, 30)
  seen = set()
  for seed in range(60):
    out = T.RandomSideScale((10, 12)).random_map(e, np.random.default_rng(seed))
    short = out['image'].shape[0]
    seen.add(short)
    assert out['image'].shape[:2] == out['label'].shape == upstream_city_size(20, 30, short)
    ys = [min(int((i + 0.5) * 20 / out['label'].shape[0]), 19) for i in range(out['label'].shape[0])]
    xs = [min(int((j + 0.5) * 30 / out['label'].shape[1]), 29) for j in range(out['label'].shape[1])]
    np.testing.assert_array_equal(out['label'], e['label'][np.ix_(ys, xs)])
    assert set(np.unique(out['label'])) <= set(np.unique(e['label']))  # no interpolated ids
  assert seen == {10, 11, 12}
  # x2 nearest duplicates pixels
  small = {'image': np.zeros((1, 2, 3), np.uint8), 'label': np.array([[1, 2]], np.uint8)}
  np.testing.assert_array_equal(T.resize_pair(small, (2, 4))['label'], [[1, 1, 2, 2], [1, 1, 2, 2]])


def test_pad_crop_pads_with_ignore_and_crops_where_drawn():
  e = _element(30, 44)
  out = T.RandomPadCrop((40, 40)).random_map(e, np.random.default_rng(3))
  rng = np.random.default_rng(3)
  x1 = int(rng.integers(0, 44 - 40 + 1))
  y1 = int(rng.integers(0, 40 - 40 + 1))
  assert y1 == 0
  want_img = np.zeros((40, 40, 3), np.uint8)
  want_lab = np.full((40, 40), 255, np.uint8)
  want_img[:30] = e['image'][:, x1 : x1 + 40]
  want_lab[:30] = e['label'][:, x1 : x1 + 40]
  np.testing.assert_array_equal(out['image'], want_img)
  np.testing.assert_array_equal(out['label'], want_lab)
  # every offset in [0, margin] is reachable
  offsets = set()
  for s in range(80):
    o = T.RandomPadCrop((30, 42)).random_map(e, np.random.default_rng(s))
    offsets.add(next(x for x in range(3) if np.array_equal(o['label'], e['label'][:, x : x + 42])))
  assert offsets == {0, 1, 2}


@pytest.mark.parametrize('sigma', [0.3, 0.7, 0.99])
def test_gaussian_blur_is_a_gaussian(sigma):
  img = _element(16, 20, seed=1)['image']
  r = int(np.ceil(3 * sigma))
  k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
  k /= k.sum()
  pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode='edge')
  rows = sum(k[i] * pad[i : i + 16] for i in range(2 * r + 1))
  want = sum(k[j] * rows[:, j : j + 20] for j in range(2 * r + 1))
  got = T.gaussian_blur(img, sigma).astype(np.float64)
  assert np.abs(got - want).max() <= 1.0
  assert np.abs(got - img).max() > 2
  np.testing.assert_array_equal(T.gaussian_blur(img, 0.0), img)


def test_blur_probability_and_sigma_draw():
  e = _element()
  n_blurred = 0
  for s in range(200):
    rng = np.random.default_rng(s)
    blur = rng.random() < 0.5
    want = T.gaussian_blur(e['image'], rng.random()) if blur else e['image']
    n_blurred += blur
    np.testing.assert_array_equal(T.RandomGaussianBlur(0.5).random_map(e, np.random.default_rng(s))['image'], want)
  assert 70 < n_blurred < 130


def _gray(rgb):  # torchvision rgb_to_grayscale on uint8: truncation
  return np.floor(0.2989 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])


def _blend(a, b, f):
  return np.floor(np.clip(f * a + (1 - f) * b, 0, 255))


@pytest.mark.parametrize('factor', [0.5, 0.8, 1.3, 1.5])
def test_brightness_contrast_saturation_formulas(factor):
  rgb = _element(seed=2)['image']
  f = rgb.astype(np.float64)
  assert np.abs(T.adjust_brightness(rgb, factor) - _blend(f, 0, factor)).max() <= 1
  assert np.abs(T.adjust_contrast(rgb, factor) - _blend(f, _gray(f).mean(), factor)).max() <= 1
  assert np.abs(T.adjust_saturation(rgb, factor) - _blend(f, _gray(f)[..., None], factor)).max() <= 1
  np.testing.assert_array_equal(T.adjust_saturation(rgb, 1.0), rgb)


@pytest.mark.parametrize('factor', [-0.1, 0.05, 0.37, -0.5])
def test_hue_rotation_formula(factor):
  rgb = _element(6, 7, seed=3)['image']
  got = T.adjust_hue(rgb, factor).astype(int)
  for y in range(6):
    for x in range(7):
      h, s, v = colorsys.rgb_to_hsv(*(rgb[y, x] / 255.0))
      want = np.floor(np.array(colorsys.hsv_to_rgb((h + factor) % 1.0, s, v)) * 255.999)
      assert np.abs(got[y, x] - want).max() <= 1, (y, x)
  with pytest.raises(ValueError, match='hue factor'):
    T.adjust_hue(rgb, 0.6)


def test_color_jitter_order_ranges_and_channel_order():
  cj = T.ColorJitter(0.3, 0.3, 0.3, 0.1)
  assert cj.ranges() == ((0.7, 1.3), (0.7, 1.3), (0.7, 1.3), (-0.1, 0.1))
  assert T.ColorJitter(1.5, 0, 0, 0).ranges() == ((0.0, 2.5), None, None, None)
  orders = set()
  for s in range(40):
    steps = cj.draw(np.random.default_rng(s))
    orders.add(tuple(i for i, _ in steps))
    rng = np.random.default_rng(s)
    perm = rng.permutation(4)
    factors = [rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(-0.1, 0.1)]
    assert steps == [(int(i), factors[i]) for i in perm]
  assert len(orders) > 6
  # apply = the adjustments in the drawn order, on RGB (the element is BGR)
  e = _element(seed=4)
  steps = cj.draw(np.random.default_rng(9))
  rgb = e['image'][..., ::-1]
  adjust = {0: T.adjust_brightness, 1: T.adjust_contrast, 2: T.adjust_saturation, 3: T.adjust_hue}
  for i, f in steps:
    rgb = adjust[i](rgb, f)
  np.testing.assert_array_equal(cj.random_map(e, np.random.default_rng(9))['image'], rgb[..., ::-1])
  # strength 0 adjustments are skipped (Cityscapes: no hue)
  assert [i for i, _ in T.ColorJitter(0.5, 0.5, 0.5).draw(np.random.default_rng(0))] != []
  assert 3 not in [i for i, _ in T.ColorJitter(0.5, 0.5, 0.5).draw(np.random.default_rng(0))]
  np.testing.assert_array_equal(T.ColorJitter(0, 0, 0, 0).random_map(e, np.random.default_rng(0))['label'], e['label'])
