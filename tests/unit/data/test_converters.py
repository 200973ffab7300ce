"""Dataset converters on tiny inputs in the official formats, written here
(a .mat via scipy, a PASCAL-in-Detail JSON with COCO RLE masks, a Cityscapes
polygon JSON, stuffthingmaps PNGs); label values checked against known answers
of the published class tables."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from cgrseg_jax import errors
from cgrseg_jax.data import classes, converters, sources

from paths import REPO

# COCO id (1-based, as in the 10k .mat files) -> train id, from mmseg's table.
COCO10K_KNOWN = {0: 0, 1: 1, 11: 11, 13: 12, 25: 24, 27: 25, 28: 26, 31: 27, 44: 40, 46: 41, 65: 60, 67: 61}
COCO10K_KNOWN.update({70: 62, 72: 63, 82: 73, 84: 74, 90: 80, 92: 81, 93: 82, 181: 170, 182: 171})
# stuffthingmaps id (0-based) -> train id.
COCO164K_KNOWN = {0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 43: 39, 45: 40, 64: 59, 66: 60, 69: 61}
COCO164K_KNOWN.update({71: 62, 81: 72, 83: 73, 89: 79, 91: 80, 181: 170, 255: 255})


def _grid(values, shape=(6, 8)):
  v = np.array(list(values))
  return v[np.arange(shape[0] * shape[1]).reshape(shape) % len(v)]


def test_coco_stuff10k_from_mat(tmp_path):
  src = tmp_path / 'cocostuff-10k-v1.1'
  for d in ('imageLists', 'images', 'annotations'):
    (src / d).mkdir(parents=True)
  (src / 'imageLists' / 'train.txt').write_text('COCO_train2014_000000000077\nCOCO_train2014_000000000078\n')
  (src / 'imageLists' / 'test.txt').write_text('COCO_train2014_000000000079\n')
  raws = {}
  for k, stem in enumerate(
    ['COCO_train2014_000000000077', 'COCO_train2014_000000000078', 'COCO_train2014_000000000079']
  ):
    raw = np.roll(_grid(COCO10K_KNOWN), k).astype(np.uint16)
    savemat(str(src / 'annotations' / f'{stem}.mat'), {'S': raw, 'names': np.array(['x'], dtype=object)})
    cv2.imwrite(str(src / 'images' / f'{stem}.jpg'), np.full((6, 8, 3), 40 * k, np.uint8))
    raws[stem] = raw
  out = tmp_path / 'coco_stuff10k'
  summary = converters.convert_coco_stuff10k(str(src), str(out))
  assert (summary.images, summary.labels, summary.splits) == (3, 3, {'train2014': 2, 'test2014': 1})
  for stem, raw in raws.items():
    split = 'test2014' if stem.endswith('79') else 'train2014'
    got = cv2.imread(str(out / 'annotations' / split / f'{stem}_labelTrainIds.png'), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(got, np.vectorize(COCO10K_KNOWN.get)(raw))
    assert os.path.isfile(out / 'images' / split / f'{stem}.jpg')
  assert summary.histogram[171] > 0 and summary.histogram[172:].sum() == 0
  # The result is what the coco_stuff10k source reads (reduce_zero_label in its recipe).
  src_, info = sources.make_source('coco_stuff10k', str(out), 'val')
  assert len(src_) == 1 and info.reduce_zero_label
  assert len(converters.coco_stuff10k_mapping()) == 172


def test_coco_stuff164k_from_stuffthingmaps(tmp_path):
  for split in ('train2017', 'val2017'):
    (tmp_path / 'annotations' / split).mkdir(parents=True)
    (tmp_path / 'images' / split).mkdir(parents=True)
    raw = _grid(COCO164K_KNOWN).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'annotations' / split / '000000000139.png'), raw)
    cv2.imwrite(str(tmp_path / 'images' / split / '000000000139.jpg'), np.zeros((6, 8, 3), np.uint8))
  summary = converters.convert_coco_stuff164k(str(tmp_path))
  assert (summary.images, summary.labels) == (2, 2)
  got = cv2.imread(str(tmp_path / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png'), cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(got, np.vectorize(COCO164K_KNOWN.get)(_grid(COCO164K_KNOWN)))
  # Running again leaves the written *_labelTrainIds.png out of the inputs.
  assert converters.convert_coco_stuff164k(str(tmp_path)).labels == 2


# ---------------------------------------------------------- Pascal Context


def _rle_encode(mask):
  """COCO compressed RLE of a binary mask (column-major runs from 0)."""
  flat = mask.T.ravel()
  counts, value, run = [], 0, 0
  for v in flat:
    if v != value:
      counts.append(run)
      value, run = v, 0
    run += 1
  counts.append(run)
  text = ''
  for i, x in enumerate(counts):
    if i > 2:
      x -= counts[i - 2]
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      if more:
        c |= 0x20
      text += chr(c + 48)
  return {'size': list(mask.shape), 'counts': text}


def _rle_list(mask):
  flat = mask.T.ravel()
  counts, value, run = [], 0, 0
  for v in flat:
    if v != value:
      counts.append(run)
      value, run = v, 0
    run += 1
  counts.append(run)
  return {'size': list(mask.shape), 'counts': counts}


# Ids of the 459-class Pascal Context label list and their names.
CONTEXT_NAMES = {2: 'aeroplane', 9: 'bag', 284: 'person', 360: 'sky', 458: 'wood', 115: 'door'}


def _names(label):
  return {classes.PASCAL_CONTEXT59_CLASSES[v - 1] if v else 'background' for v in np.unique(label)}


def test_pascal_context59_from_detail_json(tmp_path):
  h, w = 40, 50
  sky = np.zeros((h, w), np.uint8)
  sky[:20] = 1
  person = np.zeros((h, w), np.uint8)
  person[10:35, 5:25] = 1  # painted after the sky: wins where they overlap
  wood = np.zeros((h, w), np.uint8)
  wood[30:, 30:] = 1
  door = np.zeros((h, w), np.uint8)
  door[:5, 40:] = 1
  data = {
    'images': [
      {'image_id': 2008000002, 'file_name': '2008_000002.jpg', 'height': h, 'width': w, 'phase': 'train'},
      {'image_id': 2008000003, 'file_name': '2008_000003.jpg', 'height': h, 'width': w, 'phase': 'val'},
      {'image_id': 2008000004, 'file_name': '2008_000004.jpg', 'height': h, 'width': w, 'phase': 'test'},
    ],
    'annos_segmentation': [
      {'id': 1, 'image_id': 2008000002, 'category_id': 360, 'segmentation': _rle_encode(sky)},
      {'id': 2, 'image_id': 2008000003, 'category_id': 458, 'segmentation': _rle_list(wood)},
      {'id': 3, 'image_id': 2008000002, 'category_id': 284, 'segmentation': _rle_encode(person)},
      {'id': 4, 'image_id': 2008000003, 'category_id': 115, 'segmentation': _rle_encode(door)},
    ],
    'categories': [{'category_id': k, 'name': v} for k, v in CONTEXT_NAMES.items()],
  }
  devkit = tmp_path / 'VOCdevkit'
  (devkit / 'VOC2010' / 'JPEGImages').mkdir(parents=True)
  for stem in ('2008_000002', '2008_000003'):
    cv2.imwrite(str(devkit / 'VOC2010' / 'JPEGImages' / f'{stem}.jpg'), np.zeros((h, w, 3), np.uint8))
  js = tmp_path / 'trainval_merged.json'
  js.write_text(json.dumps(data))
  summary = converters.convert_pascal_context59(str(devkit), str(js))
  assert (summary.images, summary.labels, summary.splits) == (2, 2, {'train': 1, 'val': 1})
  voc = devkit / 'VOC2010'
  a = cv2.imread(str(voc / 'SegmentationClassContext' / '2008_000002.png'), cv2.IMREAD_UNCHANGED)
  names = np.array(['background', *classes.PASCAL_CONTEXT59_CLASSES])[a]
  expected = np.full((h, w), 'background', object)
  expected[:20] = 'sky'
  expected[10:35, 5:25] = 'person'
  np.testing.assert_array_equal(names, expected)
  b = cv2.imread(str(voc / 'SegmentationClassContext' / '2008_000003.png'), cv2.IMREAD_UNCHANGED)
  assert _names(b) == {'background', 'wood', 'door'} and b[35, 45] == 59  # wood is the last class
  assert (voc / 'ImageSets' / 'SegmentationContext' / 'train.txt').read_text() == '2008_000002\n'
  assert (voc / 'ImageSets' / 'SegmentationContext' / 'val.txt').read_text() == '2008_000003\n'
  train, info = sources.make_source('pascal_context59', str(voc), 'train')
  assert len(train) == 1 and info.num_classes == 59
  # A category outside the 59 classes is named.
  data['annos_segmentation'].append(
    {'id': 5, 'image_id': 2008000002, 'category_id': 1, 'segmentation': _rle_list(door)}
  )
  js.write_text(json.dumps(data))
  with pytest.raises(errors.DataError, match=r'2008_000002.jpg: category ids \[1\] are not Pascal Context 59'):
    converters.convert_pascal_context59(str(devkit), str(js))


def test_pascal_context59_from_mat_release(tmp_path):
  devkit = tmp_path / 'VOCdevkit'
  (devkit / 'VOC2010' / 'ImageSets' / 'Main').mkdir(parents=True)
  (devkit / 'VOC2010' / 'ImageSets' / 'Main' / 'train.txt').write_text('2008_000002\n2008_000005\n')
  (devkit / 'VOC2010' / 'ImageSets' / 'Main' / 'val.txt').write_text('2008_000003\n')
  mats = tmp_path / 'trainval'
  mats.mkdir()
  label_map = np.array([[1, 2, 9], [284, 360, 458], [3, 115, 459]], np.uint16)  # 1, 3, 459: not in the 59
  for stem in ('2008_000002', '2008_000003'):
    savemat(str(mats / f'{stem}.mat'), {'LabelMap': label_map})
  summary = converters.convert_pascal_context59(str(devkit), str(mats))
  assert summary.splits == {'train': 1, 'val': 1}  # 2008_000005 has no .mat
  got = cv2.imread(str(devkit / 'VOC2010' / 'SegmentationClassContext' / '2008_000003.png'), cv2.IMREAD_UNCHANGED)
  names = np.array(['background', *classes.PASCAL_CONTEXT59_CLASSES])[got]
  np.testing.assert_array_equal(
    names, [['background', 'aeroplane', 'bag'], ['person', 'sky', 'wood'], ['background', 'door', 'background']]
  )


# -------------------------------------------------------------- Cityscapes


def test_cityscapes_polygons_to_train_ids(tmp_path):
  h, w = 20, 30
  ann = {
    'imgHeight': h,
    'imgWidth': w,
    'objects': [
      {'label': 'road', 'polygon': [[0, 10], [29, 10], [29, 19], [0, 19]]},
      {'label': 'sky', 'polygon': [[0, 0], [8, 0], [0, 8]]},  # 45-degree edge through pixel centres
      {'label': 'car', 'polygon': [[3, 12], [9, 12], [9, 16], [3, 16]]},
      {'label': 'license plate', 'polygon': [[5, 14], [7, 14], [7, 15], [5, 15]]},  # id -1: not drawn
      {'label': 'cargroup', 'polygon': [[12, 12], [14, 12], [14, 13], [12, 13]]},  # -> car
      {'label': 'polegroup', 'polygon': [[20, 11], [21, 11], [21, 18], [20, 18]]},  # in the table: ignored
      {'label': 'person', 'polygon': [[24, 12], [26, 12], [26, 17], [24, 17]], 'deleted': 1},
      {'label': 'ego vehicle', 'polygon': [[0, 18], [29, 18], [29, 19], [0, 19]]},
    ],
  }
  y, x = np.mgrid[:h, :w]
  expected = np.full((h, w), 255, np.uint8)
  expected[(y >= 10) & (y <= 19)] = 0  # road
  expected[(x + y <= 8)] = 10  # sky
  expected[(x >= 3) & (x <= 9) & (y >= 12) & (y <= 16)] = 13  # car (plate stays car)
  expected[(x >= 12) & (x <= 14) & (y >= 12) & (y <= 13)] = 13  # cargroup
  expected[(x >= 20) & (x <= 21) & (y >= 11) & (y <= 18)] = 255  # polegroup
  expected[y >= 18] = 255  # ego vehicle
  np.testing.assert_array_equal(converters.cityscapes_polygons_to_train_ids(ann), expected)

  city = tmp_path / 'gtFine' / 'val' / 'lindau'
  city.mkdir(parents=True)
  (city / 'lindau_000000_000019_gtFine_polygons.json').write_text(json.dumps(ann))
  img_dir = tmp_path / 'leftImg8bit' / 'val' / 'lindau'
  img_dir.mkdir(parents=True)
  cv2.imwrite(str(img_dir / 'lindau_000000_000019_leftImg8bit.png'), np.zeros((h, w, 3), np.uint8))
  run = subprocess.run(
    [sys.executable, 'scripts/convert_dataset.py', 'cityscapes', str(tmp_path)],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'cityscapes: 1 images, 1 labels (val 1)' in run.stdout and '13: ' in run.stdout
  got = cv2.imread(str(city / 'lindau_000000_000019_gtFine_labelTrainIds.png'), cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(got, expected)
  src, _ = sources.make_source('cityscapes', str(tmp_path), 'val')
  np.testing.assert_array_equal(src[0]['label'], expected)
  ann['objects'].append({'label': 'spaceship', 'polygon': [[0, 0], [1, 0], [1, 1]]})
  with pytest.raises(errors.DataError, match="unknown Cityscapes label 'spaceship'"):
    converters.cityscapes_polygons_to_train_ids(ann)


def _random_cityscapes_annotation(rng, h, w, integer: bool) -> dict:
  """A *_gtFine_polygons.json in the official format: overlapping objects of
  random labels (groups, ignored labels, the never-drawn license plate,
  deleted ones), polygons of 3-12 vertices, some reaching past the border."""
  names = [*converters.cityscapes_labels(), 'cargroup', 'persongroup', 'bicyclegroup', 'ridergroup']
  objects = []
  for _ in range(rng.integers(15, 40)):
    cy, cx = rng.uniform(-10, h + 10), rng.uniform(-10, w + 10)
    n = int(rng.integers(3, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(2, 80) * rng.uniform(0.3, 1.0, n)
    xs, ys = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    points = [[int(round(x)), int(round(y))] if integer else [float(x), float(y)] for x, y in zip(xs, ys)]
    obj = {'label': str(rng.choice(names)), 'polygon': points}
    if rng.random() < 0.1:
      obj['deleted'] = 1
    objects.append(obj)
  return {'imgHeight': h, 'imgWidth': w, 'objects': objects}


@pytest.mark.parametrize('integer', [True, False])
def test_cityscapes_labels_are_cityscapesscripts_json2labelimg_pixel_for_pixel(tmp_path, integer):
  from cityscapesscripts.helpers.annotation import Annotation
  from cityscapesscripts.preparation.json2labelImg import createLabelImage

  rng = np.random.default_rng(7 if integer else 8)
  differ, seen = 0, set()
  for i in range(20):
    ann = _random_cityscapes_annotation(rng, 256, 512, integer)
    path = tmp_path / f'{i}_gtFine_polygons.json'
    path.write_text(json.dumps(ann))
    official = Annotation()
    official.fromJsonFile(str(path))
    want = np.asarray(createLabelImage(official, 'trainIds'))
    got = converters.cityscapes_polygons_to_train_ids(json.loads(path.read_text()), str(path))
    assert got.dtype == np.uint8 and got.shape == (256, 512)
    differ += int(np.sum(got != want))
    seen.update(np.unique(want).tolist())
  assert differ == 0
  assert len(seen) >= 15  # nearly every train id, and the ignore index, drawn somewhere
