"""mmseg 0.27 transform semantics, checked against direct OpenCV / numpy
computations of the upstream formulas and against the draw distributions."""

import cv2
import numpy as np
import pytest

import mmcv_ops
from cgrseg_jax import errors
from cgrseg_jax.data import transforms as T


def _rng(seed=0):
  return np.random.default_rng(seed)


def _mmseg_keep_ratio_size(h, w, scale):
  # mmcv rescale_size + _scale_size, written out.
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * f + 0.5), int(w * f + 0.5)


# ---------------------------------------------------------------- resize


def test_rescale_size_known_answers():
  # ADE20K's typical 512x683 fits the short edge exactly.
  assert T.rescale_size((512, 683), (2048, 512))[0] == (512, 683)
  # Tall 1000x500: short-edge factor 512/500 = 1.024 wins over 2048/1000.
  assert T.rescale_size((1000, 500), (2048, 512))[0] == (1024, 512)
  # Very wide 100x1000: the long edge bounds it: f = 2048/1000.
  assert T.rescale_size((100, 1000), (2048, 512))[0] == (205, 2048)
  # Square scale: the long edge 401 bounds it; 333 * 512 / 401 = 425.18.
  assert T.rescale_size((333, 401), (512, 512))[0] == (425, 512)
  # Half-up rounding: 3 * 2.5 = 7.5 -> 8 (Python's round() would give 8 too,
  # but 5 * 2.5 = 12.5 -> 13 where round() gives 12).
  assert T.rescale_size((3, 5), (12.5, 10))[0] == (8, 13)  # f = min(12.5/5, 10/3)


def test_rescale_size_matches_formula_over_many_shapes_and_ratios():
  rng = _rng(1)
  for _ in range(2000):
    h, w = (int(v) for v in rng.integers(16, 2500, size=2))
    ratio = rng.uniform(0.5, 2.0)
    scale = (int(2048 * ratio), int(512 * ratio))
    assert T.rescale_size((h, w), scale)[0] == _mmseg_keep_ratio_size(h, w, scale)


def test_random_resize_matches_opencv_and_ratio_draw():
  rng_img = _rng(2)
  image = rng_img.integers(0, 256, size=(300, 420, 3), dtype=np.uint8)
  label = rng_img.integers(0, 150, size=(300, 420), dtype=np.uint8)
  op = T.RandomResize((2048, 512), (0.5, 2.0))
  for seed in range(20):
    out = op.random_map({'image': image, 'label': label}, _rng(seed))
    ratio = _rng(seed).random() * 1.5 + 0.5  # mmseg: U[0,1) * (max - min) + min
    h, w = _mmseg_keep_ratio_size(300, 420, (int(2048 * ratio), int(512 * ratio)))
    np.testing.assert_array_equal(out['image'], cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out['label'], cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST))


def test_ratio_distribution_is_uniform_on_range():
  rng = _rng(3)
  scales = np.array([T.sample_ratio_scale(rng, (2048, 512), (0.5, 2.0)) for _ in range(20000)])
  ratios = scales[:, 1] / 512
  assert scales[:, 0].min() >= 1024 and scales[:, 0].max() < 4096
  assert ratios.min() >= 0.5 - 1e-9 and ratios.max() < 2.0
  hist, _ = np.histogram(ratios, bins=10, range=(0.5, 2.0))
  assert np.all(np.abs(hist / len(ratios) - 0.1) < 0.015)


def test_test_time_resize_is_the_image_alone():
  image = np.zeros((200, 300, 3), np.uint8)
  assert T.resize_image(image, (2048, 512)).shape[:2] == _mmseg_keep_ratio_size(200, 300, (2048, 512))


def test_reduce_zero_label_all_values():
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  ref = np.where(values == 0, 255, np.where(values == 255, 255, values.astype(int) - 1))
  np.testing.assert_array_equal(T.reduce_zero_label(values), ref)
  np.testing.assert_array_equal(T.ReduceZeroLabel().map({'label': values})['label'], ref)


# ------------------------------------------------------------------ crop


def _coordinate_image(h, w):
  # Each pixel encodes its own (y, x), so a crop reveals its offset.
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([yy & 255, xx & 255, (yy >> 8) * 16 + (xx >> 8)], axis=-1).astype(np.uint8)


def _offset(crop):
  y = int(crop[0, 0, 0]) + 256 * (int(crop[0, 0, 2]) // 16)
  x = int(crop[0, 0, 1]) + 256 * (int(crop[0, 0, 2]) % 16)
  return y, x


def test_crop_content_and_offset_distribution_without_cat_max_ratio():
  image = _coordinate_image(600, 800)
  label = np.zeros((600, 800), np.uint8)
  op = T.RandomCrop((512, 512), cat_max_ratio=1.0)
  offsets = []
  for seed in range(3000):
    out = op.random_map({'image': image, 'label': label}, _rng(seed))
    y, x = _offset(out['image'])
    np.testing.assert_array_equal(out['image'], image[y : y + 512, x : x + 512])
    offsets.append((y, x))
  offsets = np.array(offsets)
  # offset_h ~ randint(0, 89), offset_w ~ randint(0, 289)
  assert offsets[:, 0].min() == 0 and offsets[:, 0].max() == 88
  assert offsets[:, 1].min() == 0 and offsets[:, 1].max() == 288
  assert abs(offsets[:, 0].mean() - 44) < 2.0 and abs(offsets[:, 1].mean() - 144) < 6.0


def test_crop_smaller_image_keeps_whole_image():
  image = _coordinate_image(300, 400)
  label = np.arange(300 * 400).reshape(300, 400).astype(np.uint8)
  out = T.RandomCrop((512, 512), 0.75).random_map({'image': image, 'label': label}, _rng(0))
  np.testing.assert_array_equal(out['image'], image)
  np.testing.assert_array_equal(out['label'], label)


def _reference_boxes(seed, hw, crop, n):
  rng = _rng(seed)
  mh, mw = max(hw[0] - crop[0], 0), max(hw[1] - crop[1], 0)
  boxes = []
  for _ in range(n):
    oy = int(rng.integers(0, mh + 1))
    ox = int(rng.integers(0, mw + 1))
    boxes.append((oy, ox))
  return boxes


def test_cat_max_ratio_uses_eleventh_box_when_all_rejected():
  # A single class everywhere: no crop is ever acceptable, so upstream
  # tries 10 boxes and then uses the freshly drawn 11th one.
  image = _coordinate_image(600, 800)
  label = np.full((600, 800), 3, np.uint8)
  op = T.RandomCrop((512, 512), cat_max_ratio=0.75)
  for seed in range(30):
    out = op.random_map({'image': image, 'label': label}, _rng(seed))
    assert _offset(out['image']) == _reference_boxes(seed, (600, 800), (512, 512), 11)[10]


def test_cat_max_ratio_accepts_first_box_when_balanced():
  image = _coordinate_image(600, 800)
  label = (np.arange(800)[None, :] % 2).repeat(600, 0).astype(np.uint8)  # 50/50 everywhere
  op = T.RandomCrop((512, 512), cat_max_ratio=0.75)
  for seed in range(30):
    out = op.random_map({'image': image, 'label': label}, _rng(seed))
    assert _offset(out['image']) == _reference_boxes(seed, (600, 800), (512, 512), 1)[0]


def test_cat_max_ratio_ignores_255_and_rejects_dominant_class():
  # Columns [0, 700) class 0, [700, 1024) class 1, plus ignore rows that
  # must not count. A 512-wide crop at x is balanced iff the class-1
  # share (x + 512 - 700) / 512 lies in (0.25, 0.75), i.e. x in [317, 512].
  label = np.zeros((512, 1024), np.uint8)
  label[:, 700:] = 1
  label[:100, :] = 255
  image = _coordinate_image(512, 1024)
  op = T.RandomCrop((512, 512), cat_max_ratio=0.75)
  accepted = 0
  trials = 600
  for seed in range(trials):
    out = op.random_map({'image': image, 'label': label}, _rng(seed))
    _, x = _offset(out['image'])
    boxes = _reference_boxes(seed, (512, 1024), (512, 512), 11)
    balanced = [317 <= bx <= 512 for _, bx in boxes[:10]]
    if any(balanced):
      assert x == boxes[balanced.index(True)][1]  # the first acceptable try
      accepted += 1
    else:
      assert x == boxes[10][1]
  # P(all 10 rejected) = (317/513)^10 ~ 0.8%
  assert accepted / trials > 0.97


def test_crop_is_balanced_matches_np_unique_rule():
  rng = _rng(5)
  for _ in range(300):
    k = int(rng.integers(1, 5))
    seg = rng.choice(np.array([0, 1, 2, 7, 255], np.uint8)[: k + 1], size=(20, 20), p=None).astype(np.uint8)
    labels, cnt = np.unique(seg, return_counts=True)
    cnt = cnt[labels != 255]
    ref = len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < 0.75
    assert T.crop_is_balanced(seg, 0.75) == ref


# ------------------------------------------------------------------ flip


def test_flip_probability_and_consistency():
  image = _coordinate_image(40, 60)
  label = (np.arange(60)[None, :].repeat(40, 0)).astype(np.uint8)
  op = T.RandomFlip(0.5)
  flips = 0
  for seed in range(4000):
    out = op.random_map({'image': image, 'label': label}, _rng(seed))
    flipped = out['label'][0, 0] == 59
    if flipped:
      np.testing.assert_array_equal(out['image'], image[:, ::-1])
      np.testing.assert_array_equal(out['label'], label[:, ::-1])
    else:
      np.testing.assert_array_equal(out['image'], image)
    flips += flipped
  assert abs(flips / 4000 - 0.5) < 0.03
  assert all(
    T.RandomFlip(0.0).random_map({'image': image, 'label': label}, _rng(s))['label'][0, 0] == 0 for s in range(50)
  )


# ----------------------------------------------------------- photometric


def _mmseg_convert(img, alpha=1, beta=0):
  img = img.astype(np.float32) * alpha + beta
  return np.clip(img, 0, 255).astype(np.uint8)


def _mmseg_photometric(img, rng):
  """mmseg PhotoMetricDistortion.__call__, written directly with float32
  arithmetic and OpenCV HSV (mmcv bgr2hsv / hsv2bgr), drawing from rng in
  the upstream order."""
  if rng.integers(2):
    img = _mmseg_convert(img, beta=rng.uniform(-32, 32))
  mode = rng.integers(2)

  def contrast(img):
    if rng.integers(2):
      img = _mmseg_convert(img, alpha=rng.uniform(0.5, 1.5))
    return img

  if mode == 1:
    img = contrast(img)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = _mmseg_convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if mode == 0:
    img = contrast(img)
  return img


def test_photometric_matches_direct_float32_formula():
  image = _rng(7).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
  op = T.PhotoMetricDistortion()
  for seed in range(200):
    out = op.random_map({'image': image}, _rng(seed))['image']
    np.testing.assert_array_equal(out, _mmseg_photometric(image, _rng(seed)), err_msg=f'seed {seed}')


def test_photometric_draw_distribution():
  op = T.PhotoMetricDistortion()
  rng = _rng(8)
  n = 8000
  counts = {'brightness': 0, 'contrast': 0, 'saturation': 0, 'hue': 0}
  contrast_first = contrast_last = 0
  hues, alphas, betas = [], [], []
  for _ in range(n):
    steps = op.draw(rng)
    names = [s for s, _ in steps]
    for s, v in steps:
      counts[s] += 1
      if s == 'hue':
        hues.append(v)
      elif s == 'contrast':
        alphas.append(v)
      elif s == 'brightness':
        betas.append(v)
    if 'contrast' in names:
      pos = names.index('contrast')
      others = [s for s in names if s in ('saturation', 'hue')]
      if others:
        if pos < names.index(others[0]):
          contrast_first += 1
        else:
          contrast_last += 1
  for name, c in counts.items():
    assert abs(c / n - 0.5) < 0.03, name
  assert abs(contrast_first - contrast_last) / (contrast_first + contrast_last) < 0.08
  assert set(hues) == set(range(-18, 18))  # numpy randint: 18 excluded
  assert min(alphas) >= 0.5 and max(alphas) < 1.5
  assert min(betas) >= -32 and max(betas) < 32
  assert abs(np.mean(betas)) < 1.0


def test_hsv_round_trip_and_hue_shift_against_opencv():
  image = _rng(9).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
  hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
  assert hsv[..., 0].max() < 180  # OpenCV 8-bit hue range
  np.testing.assert_array_equal(T.adjust_hue(image, 0), cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))
  for delta in (-18, -5, 7, 17):
    ref = hsv.copy()
    ref[..., 0] = (ref[..., 0].astype(int) + delta) % 180
    np.testing.assert_array_equal(T.adjust_hue(image, delta), cv2.cvtColor(ref, cv2.COLOR_HSV2BGR))
  for alpha in (0.5, 0.93, 1.49):
    ref = hsv.copy()
    ref[..., 1] = np.clip(ref[..., 1].astype(np.float32) * alpha, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(T.adjust_saturation(image, alpha), cv2.cvtColor(ref, cv2.COLOR_HSV2BGR))


def test_affine_lut_clips_and_truncates():
  lut = T.affine_lut(alpha=1.3, beta=-10.7)
  ref = np.clip(np.arange(256, dtype=np.float32) * 1.3 - 10.7, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(lut, ref)
  assert lut[0] == 0 and lut[255] == 255 and lut[10] == 2  # 13.0 - 10.7 = 2.3 -> 2


# ------------------------------------------------------------ pad, norm


def test_pad_matches_numpy_and_records_valid_size():
  image = _rng(10).integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
  label = _rng(11).integers(0, 150, size=(300, 500), dtype=np.uint8)
  out = T.Pad((512, 512)).map({'image': image, 'label': label})
  np.testing.assert_array_equal(out['image'], np.pad(image, ((0, 212), (0, 12), (0, 0)), constant_values=0))
  np.testing.assert_array_equal(out['label'], np.pad(label, ((0, 212), (0, 12)), constant_values=255))
  np.testing.assert_array_equal(out['valid_hw'], [300, 500])
  with pytest.raises(ValueError, match='cannot pad'):
    T.Pad((256, 256)).map({'image': image, 'label': label})


def test_size_to_multiple():
  for h in range(1, 200, 7):
    assert T.size_to_multiple((h, 64), 32) == (int(np.ceil(h / 32) * 32), 64)


def test_normalize_table_is_mmseg_normalize_of_every_value():
  # channel c of pixel k holds (k + 85 c) % 256: every uint8 value in every channel
  k = np.arange(256).reshape(16, 16, 1)
  image = ((k + 85 * np.arange(3)) % 256).astype(np.uint8)
  rgb = image[..., ::-1]
  # as the pipeline calls it: the Normalize class, whose mean/std are float32 arrays
  ref = mmcv_ops.normalize_transform(image)
  np.testing.assert_array_equal(T.normalize_table()[rgb, np.arange(3)], ref)
  # imnormalize called directly with float64 mean/std: the table with float64 statistics
  direct = mmcv_ops.imnormalize(image)
  np.testing.assert_array_equal(T.normalize_table(stats_dtype=np.float64)[rgb, np.arange(3)], direct)
  # the two differ by 1 ulp in 84 of the 768 (value, channel) entries (the test can fail)
  assert np.sum(ref != direct) == 84 and np.max(np.abs(ref - direct) / np.spacing(np.abs(ref))) <= 1
  # the older float32 multiply by float32(1 / std) is neither
  old = (rgb.astype(np.float32) - np.float32(T.MEAN_RGB)) * (1.0 / np.asarray(T.STD_RGB)).astype(np.float32)
  assert not np.array_equal(old, ref)
  # mean and std are mmseg's img_norm_cfg
  assert (T.MEAN_RGB, T.STD_RGB) == (mmcv_ops.MMSEG_MEAN, mmcv_ops.MMSEG_STD)


def test_train_transforms_end_to_end_shapes_and_label_range():
  rng = _rng(13)
  image = rng.integers(0, 256, size=(400, 533, 3), dtype=np.uint8)
  label = rng.integers(0, 151, size=(400, 533), dtype=np.uint8)
  data = {'img_scale': (2048, 512), 'crop_size': (512, 512), 'ignore_index': 255}
  ops = [T.ReduceZeroLabel()] + T.build_pipeline(T.DEFAULT_TRAIN_PIPELINE, data)
  for seed in range(10):
    el = {'image': image, 'label': label}
    r = _rng(seed)
    for op in ops:
      el = op.random_map(el, r) if hasattr(op, 'random_map') else op.map(el)
    assert el['image'].shape == (512, 512, 3) and el['image'].dtype == np.uint8
    assert el['label'].shape == (512, 512)
    values = set(np.unique(el['label']).tolist())
    assert values <= set(range(150)) | {255}
    h, w = el['valid_hw']
    assert (el['image'][h:] == 0).all() and (el['image'][:, w:] == 0).all()
    assert (el['label'][h:] == 255).all() and (el['label'][:, w:] == 255).all()


# ------------------------------------------------------------- registry


def test_default_pipeline_resolves_to_the_mmseg_transforms():
  data = {'img_scale': (2048, 512), 'crop_size': (512, 512), 'ignore_index': 255}
  ops = T.build_pipeline(T.DEFAULT_TRAIN_PIPELINE, data)
  assert ops == [
    T.RandomResize((2048, 512), (0.5, 2.0)),
    T.RandomCrop((512, 512), 0.75, 255),
    T.RandomFlip(0.5),
    T.PhotoMetricDistortion(32, (0.5, 1.5), (0.5, 1.5), 18),
    T.Pad((512, 512), 0, 255),
  ]
  # An entry's own arguments win over the data values; lists become tuples.
  (op,) = T.build_pipeline([['RandomCrop', {'crop_size': [8, 9]}]], data)
  assert op == T.RandomCrop((8, 9), 0.75, 255)
  with pytest.raises(errors.ConfigError, match="unknown transform 'Blurr'"):
    T.build_pipeline([('Blurr', {})], data)
  with pytest.raises(errors.ConfigError, match=r"'RandomFlip' has no argument\(s\) \['p'\]"):
    T.build_pipeline([('RandomFlip', {'p': 0.2})], data)


def test_csfcn_transforms_are_registered_by_name():
  from cgrseg_jax.data import torchvision_transforms as TV

  camvid = (
    ('RandomSideScale', {'size_range': (480, 1920), 'side': 'long', 'round_half_up': True}),
    ('RandomPadCrop', {'crop_size': (720, 960)}),
    ('RandomFlip', {}),
    ('ColorJitter', {'brightness': 0.3, 'contrast': 0.3, 'saturation': 0.3, 'hue': 0.1}),
  )
  ops = T.build_pipeline(camvid)
  assert ops[0] == TV.RandomSideScale((480, 1920), 'long', True)
  assert isinstance(ops[1], TV.RandomPadCrop) and ops[1].crop_size == (720, 960)
  assert ops[3] == TV.ColorJitter(0.3, 0.3, 0.3, 0.1)
  assert 'RandomGaussianBlur' in T.TRANSFORMS
