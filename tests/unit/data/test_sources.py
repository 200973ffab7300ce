"""Directory layouts, TFDS, class lists and bad-input errors of the sources."""

import logging
import os

import cv2
import numpy as np
import pytest

from cgrseg_jax.data import pipeline, sources
from cgrseg_jax.data import transforms as T
from cgrseg_jax.data.synthetic import SyntheticSegmentation


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, array)


def _random_pair(rng, h, w, max_id):
  image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  label = rng.integers(0, max_id, size=(h, w), dtype=np.uint8)
  return image, label


@pytest.fixture
def ade_root(tmp_path):
  root = str(tmp_path / 'ADEChallengeData2016')
  syn = SyntheticSegmentation(num_samples=4, num_classes=6, image_size=(48, 64), seed=3)
  syn.write_ade20k_layout(root, split_dir='training', image_suffix='.png')
  return root, syn


# ------------------------------------------------------------- layouts


def test_synthetic_ade20k_layout_reads_back_identically(tmp_path):
  root = str(tmp_path / 'ADEChallengeData2016')
  syn = SyntheticSegmentation(num_samples=5, num_classes=10, image_size=(40, 56), seed=1)
  syn.write_ade20k_layout(root, split_dir='training', image_suffix='.png')
  # The ADE20K reader looks for .jpg; point a directory source at the PNGs.
  imgs, lbls = sources.paired_files(
    os.path.join(root, 'images', 'training'),
    os.path.join(root, 'annotations', 'training'),
    img_suffix='.png',
    seg_map_suffix='.png',
  )
  src = sources.SegmentationFiles(imgs, lbls, num_classes=150, reduce_zero_label=True)
  assert len(src) == 5
  for i in range(5):
    rec, ref = src[i], syn[i]
    np.testing.assert_array_equal(rec['image'], ref['image'])
    # stored as id + 1; ADE20K's reduce_zero_label gives the ids back
    np.testing.assert_array_equal(T.reduce_zero_label(rec['label']), ref['label'])


def test_ade20k_source_jpeg(tmp_path):
  root = str(tmp_path / 'ADE')
  syn = SyntheticSegmentation(num_samples=3, num_classes=5, image_size=(32, 48), seed=2, split='val')
  syn.write_ade20k_layout(root, image_suffix='.jpg', jpeg_quality=90)
  src, info = sources.make_source('ade20k', root, 'val')
  assert info.num_classes == 150 and info.reduce_zero_label and len(info.class_names) == 150
  for i in range(3):
    ok, enc = cv2.imencode('.jpg', syn[i]['image'], [cv2.IMWRITE_JPEG_QUALITY, 90])
    np.testing.assert_array_equal(src[i]['image'], cv2.imdecode(enc, cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(src[i]['label'], syn[i]['label'] + 1)


@pytest.mark.parametrize('variant,split_dir', [('10k', 'train2014'), ('164k', 'val2017')])
def test_coco_stuff_layout(tmp_path, variant, split_dir):
  rng = np.random.default_rng(0)
  written = {}
  for stem in ('COCO_b', 'COCO_a', 'COCO_c'):
    img, lbl = _random_pair(rng, 20, 30, 171)
    _write(str(tmp_path / 'images' / split_dir / f'{stem}.jpg'), img)
    _write(str(tmp_path / 'annotations' / split_dir / f'{stem}_labelTrainIds.png'), lbl)
    written[stem] = lbl
  split = 'train' if variant == '10k' else 'val'
  src, info = sources.make_source(f'coco_stuff{variant}', str(tmp_path), split)
  assert info.num_classes == 171 and len(info.class_names) == 171
  assert info.reduce_zero_label == (variant == '10k')  # mmseg configs
  assert [os.path.basename(p) for p in src.image_paths] == ['COCO_a.jpg', 'COCO_b.jpg', 'COCO_c.jpg']
  for i, stem in enumerate(['COCO_a', 'COCO_b', 'COCO_c']):
    np.testing.assert_array_equal(src[i]['label'], written[stem])


def test_pascal_context_layout_uses_split_files(tmp_path):
  rng = np.random.default_rng(1)
  labels = {}
  for stem in ('2008_000001', '2008_000002', '2008_000003'):
    img, lbl = _random_pair(rng, 24, 18, 60)
    _write(str(tmp_path / 'JPEGImages' / f'{stem}.jpg'), img)
    _write(str(tmp_path / 'SegmentationClassContext' / f'{stem}.png'), lbl)
    labels[stem] = lbl
  split_dir = tmp_path / 'ImageSets' / 'SegmentationContext'
  split_dir.mkdir(parents=True)
  (split_dir / 'train.txt').write_text('2008_000003\n2008_000001\n')
  (split_dir / 'val.txt').write_text('2008_000002\n')
  train, info = sources.make_source('pascal_context59', str(tmp_path), 'train')
  assert info.num_classes == 59 and info.reduce_zero_label and info.crop_size == (480, 480)
  assert len(train) == 2
  np.testing.assert_array_equal(train[0]['label'], labels['2008_000003'])
  np.testing.assert_array_equal(train[1]['label'], labels['2008_000001'])
  val, _ = sources.make_source('pascal_context59', str(tmp_path), 'val')
  assert len(val) == 1
  np.testing.assert_array_equal(val[0]['label'], labels['2008_000002'])


def test_cityscapes_layout_nested_cities(tmp_path):
  rng = np.random.default_rng(2)
  expected = []
  for city in ('aachen', 'bochum'):
    for k in range(2):
      stem = f'{city}_000000_00001{k}'
      img, lbl = _random_pair(rng, 16, 32, 19)
      lbl[0, 0] = 255
      _write(str(tmp_path / 'leftImg8bit' / 'train' / city / f'{stem}_leftImg8bit.png'), img)
      _write(str(tmp_path / 'gtFine' / 'train' / city / f'{stem}_gtFine_labelTrainIds.png'), lbl)
      expected.append((img, lbl))
  src, info = sources.make_source('cityscapes', str(tmp_path), 'train')
  assert info.num_classes == 19 and not info.reduce_zero_label
  assert len(src) == 4
  for i, (img, lbl) in enumerate(expected):
    np.testing.assert_array_equal(src[i]['image'], img)
    np.testing.assert_array_equal(src[i]['label'], lbl)
  np.testing.assert_array_equal(info.palette[0], [128, 64, 128])


def test_custom_layout_with_split_file_names_and_palette(tmp_path):
  rng = np.random.default_rng(3)
  for stem in ('x1', 'x2', 'x3'):
    img, lbl = _random_pair(rng, 10, 12, 3)
    _write(str(tmp_path / 'img' / f'{stem}.tif.png'), img)
    _write(str(tmp_path / 'ann' / f'{stem}_mask.png'), lbl)
  (tmp_path / 'split.txt').write_text('x3\nx1\n')
  pal = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
  src, info = sources.make_source(
    'custom',
    img_dir=str(tmp_path / 'img'),
    ann_dir=str(tmp_path / 'ann'),
    img_suffix='.tif.png',
    seg_map_suffix='_mask.png',
    split_file=str(tmp_path / 'split.txt'),
    class_names=['sky', 'sea', 'boat'],
    palette=pal,
  )
  assert len(src) == 2 and info.num_classes == 3 and info.class_names == ('sky', 'sea', 'boat')
  np.testing.assert_array_equal(info.palette, pal)
  assert src.label_paths[0].endswith('x3_mask.png')
  assert src[1]['label'].max() < 3


def test_image_size_from_headers(tmp_path):
  rng = np.random.default_rng(4)
  for h, w in ((17, 23), (480, 640), (1, 300)):
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    for ext in ('.png', '.jpg'):
      path = str(tmp_path / f'im_{h}_{w}{ext}')
      _write(path, img)
      assert sources.image_size(path) == cv2.imread(path).shape[:2]


# ----------------------------------------------------------- bad input


def test_unreadable_image_names_file(ade_root):
  root, _ = ade_root
  path = os.path.join(root, 'images', 'training', 'synthetic_train_00000001.png')
  with open(path, 'wb') as f:
    f.write(b'this is not an image at all' * 10)
  src = sources.SegmentationFiles(
    *sources.paired_files(
      os.path.join(root, 'images', 'training'),
      os.path.join(root, 'annotations', 'training'),
      img_suffix='.png',
      seg_map_suffix='.png',
    ),
    num_classes=150,
    reduce_zero_label=True,
  )
  with pytest.raises(sources.DataError, match='synthetic_train_00000001.png: .*not a decodable image'):
    src[1]
  src[0]  # the others are fine


@pytest.mark.parametrize('ext', ['.jpg', '.png'])
def test_truncated_image_names_file(tmp_path, ext):
  img = np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
  path = str(tmp_path / f'cut{ext}')
  _write(path, img)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[: len(data) // 2])
  with pytest.raises(sources.DataError, match=rf'cut\{ext}: truncated'):
    sources.read_image(path)


def test_missing_label_file_fails_at_startup(ade_root):
  root, _ = ade_root
  missing = os.path.join(root, 'annotations', 'training', 'synthetic_train_00000002.png')
  os.remove(missing)
  with pytest.raises(sources.DataError) as e:
    sources.paired_files(
      os.path.join(root, 'images', 'training'),
      os.path.join(root, 'annotations', 'training'),
      img_suffix='.png',
      seg_map_suffix='.png',
    )
  assert missing in str(e.value) and 'missing' in str(e.value)


def test_label_size_mismatch_names_label(tmp_path):
  _write(str(tmp_path / 'img' / 'a.png'), np.zeros((20, 30, 3), np.uint8))
  _write(str(tmp_path / 'ann' / 'a.png'), np.zeros((20, 31), np.uint8))
  src, _ = sources.custom_source(str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=4, img_suffix='.png')
  with pytest.raises(sources.DataError, match=r'ann/a.png: label size \(20, 31\) differs from image size \(20, 30\)'):
    src[0]


@pytest.mark.parametrize('reduce_zero_label,bad', [(False, 4), (True, 5), (False, 254)])
def test_label_values_out_of_range_name_label_and_values(tmp_path, reduce_zero_label, bad):
  _write(str(tmp_path / 'img' / 'a.png'), np.zeros((8, 8, 3), np.uint8))
  lbl = np.zeros((8, 8), np.uint8)
  lbl[0, 0] = 255  # ignore is always fine
  lbl[1, 1] = 4 if reduce_zero_label else 3  # the largest valid raw id
  _write(str(tmp_path / 'ann' / 'ok.png'), lbl)
  _write(str(tmp_path / 'img' / 'ok.png'), np.zeros((8, 8, 3), np.uint8))
  lbl2 = lbl.copy()
  lbl2[2, 2] = bad
  _write(str(tmp_path / 'ann' / 'a.png'), lbl2)
  src, _ = sources.custom_source(
    str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=4, img_suffix='.png', reduce_zero_label=reduce_zero_label
  )
  with pytest.raises(sources.DataError, match=rf'ann/a.png: label ids \[{bad}\] are outside'):
    src[0]
  src[1]  # ok.png


def test_colour_label_is_rejected(tmp_path):
  _write(str(tmp_path / 'img' / 'a.png'), np.zeros((8, 8, 3), np.uint8))
  _write(str(tmp_path / 'ann' / 'a.png'), np.zeros((8, 8, 3), np.uint8))
  src, _ = sources.custom_source(str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=4, img_suffix='.png')
  with pytest.raises(sources.DataError, match='ann/a.png: label has 3 channels'):
    src[0]


def test_empty_directory_and_wrong_layout(tmp_path):
  (tmp_path / 'images' / 'training').mkdir(parents=True)
  (tmp_path / 'annotations' / 'training').mkdir(parents=True)
  with pytest.raises(sources.DataError, match=r"images/training: no images ending with '.jpg'"):
    sources.make_source('ade20k', str(tmp_path), 'train')
  with pytest.raises(sources.DataError, match=r'nowhere/images/validation: image directory does not exist'):
    sources.make_source('ade20k', str(tmp_path / 'nowhere'), 'val')
  with pytest.raises(ValueError, match='unknown split'):
    sources.make_source('ade20k', str(tmp_path), 'holdout')


def test_split_file_entry_without_image(tmp_path):
  (tmp_path / 'JPEGImages').mkdir()
  (tmp_path / 'SegmentationClassContext').mkdir()
  d = tmp_path / 'ImageSets' / 'SegmentationContext'
  d.mkdir(parents=True)
  (d / 'train.txt').write_text('2008_000123\n')
  with pytest.raises(sources.DataError, match=r'JPEGImages/2008_000123.jpg: image listed in split file'):
    sources.make_source('pascal_context59', str(tmp_path), 'train')


def test_skip_bad_samples_logs_counts_and_never_feeds_them(ade_root, caplog):
  root, syn = ade_root
  bad = os.path.join(root, 'images', 'training', 'synthetic_train_00000002.png')
  open(bad, 'wb').write(b'\x89PNG\r\n\x1a\n garbage')
  imgs, lbls = sources.paired_files(
    os.path.join(root, 'images', 'training'),
    os.path.join(root, 'annotations', 'training'),
    img_suffix='.png',
    seg_map_suffix='.png',
  )
  src = sources.SegmentationFiles(imgs, lbls, num_classes=150, reduce_zero_label=True)
  checked = pipeline.CheckedSource(src, skip_bad_samples=True)
  with caplog.at_level(logging.WARNING):
    got = [checked[i] for i in range(len(checked))]
  assert got[2] is None and checked.skipped == 1
  assert any('synthetic_train_00000002.png' in r.getMessage() for r in caplog.records)
  # Through the train pipeline: one epoch holds the 3 good samples only.
  ds = pipeline.make_train_dataset(
    'ade20k',
    source=src,
    batch_size=1,
    crop_size=(32, 32),
    img_scale=(64, 48),
    num_epochs=1,
    skip_bad_samples=True,
    shard_index=0,
    shard_count=1,
    read_threads=1,
  )
  seen = sorted(int(b['index'][0]) for b in ds)
  assert seen == [0, 1, 3]
  # Without the flag the error surfaces, naming the file.
  ds = pipeline.make_train_dataset(
    'ade20k',
    source=src,
    batch_size=1,
    crop_size=(32, 32),
    img_scale=(64, 48),
    num_epochs=1,
    shard_index=0,
    shard_count=1,
    read_threads=1,
  )
  with pytest.raises(Exception, match='synthetic_train_00000002.png'):
    list(ds)


# ----------------------------------------------------------------- TFDS


def test_tfds_scene_parse150_with_mock_data():
  import tensorflow_datasets as tfds  # the tfds extra, which make test installs: a failure, not a skip, without it

  rng = np.random.default_rng(6)
  records = []
  for _ in range(3):
    rgb = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    ann = np.zeros((12, 20, 3), np.uint8)
    ann[..., 0] = rng.integers(0, 151, size=(12, 20))  # class id in the red channel
    ann[..., 1] = 7  # instance ids must be ignored
    records.append({'image': rgb, 'annotation': ann})

  def as_data_source(*args, **kwargs):
    return records

  with tfds.testing.mock_data(num_examples=3, as_data_source_fn=as_data_source):
    src, info = sources.make_source('tfds_ade20k', None, 'train')
    assert len(src) == 3 and info.num_classes == 150 and info.reduce_zero_label
    for i, r in enumerate(records):
      np.testing.assert_array_equal(src[i]['image'], r['image'][..., ::-1])  # RGB -> BGR
      np.testing.assert_array_equal(src[i]['label'], r['annotation'][..., 0])

  # TFDS's own random mock records have mismatched image / label sizes:
  # the error names the record.
  with tfds.testing.mock_data(num_examples=2):
    src, _ = sources.make_source('tfds_ade20k', None, 'val')
    with pytest.raises(sources.DataError, match=r'tfds:scene_parse150/test\[0\]'):
      src[0]
