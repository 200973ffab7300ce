"""Dataset converters: the official releases -> the layouts of datasets.py
(what mmseg's tools/convert_datasets scripts produce). The command line is
scripts/convert_dataset.py; each converter returns a ``Summary``.

* COCO-Stuff 10k: ``.mat`` annotations (``S``: 0 = unlabeled, 1..182 COCO
  ids) -> ``*_labelTrainIds.png`` with mmseg's 182 -> 171 mapping (the 11
  unused COCO thing ids removed, 0 kept: reduce_zero_label ignores it).
* COCO-Stuff 164k: stuffthingmaps PNGs (0-based ids 0..181, 255 unlabeled)
  -> ``*_labelTrainIds.png`` (0..170, 255).
* Pascal Context 59: ``trainval_merged.json`` (PASCAL in Detail format, RLE
  masks of the 59 classes) or the ``.mat`` release (``LabelMap`` of 459
  classes) -> ``SegmentationClassContext/*.png`` (0 = background, 1..59) and
  the split files ``ImageSets/SegmentationContext/{train,val}.txt``.
* Cityscapes: ``*_gtFine_polygons.json`` -> ``*_gtFine_labelTrainIds.png``,
  drawn as cityscapesscripts' ``json2labelImg(..., 'trainIds')`` draws them
  (what mmseg's ``tools/convert_datasets/cityscapes.py`` runs): Pillow's
  ``ImageDraw.polygon`` on an 'L' image, with its label table (Pillow: the
  ``cityscapes`` extra).

Unlabelled pixels get the dataset entry's ignore index (datasets.py).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import cv2
import numpy as np

from .. import errors
from . import datasets


@dataclasses.dataclass
class Summary:
  """What a converter wrote: counts and the pixel histogram of the label ids."""

  dataset: str
  images: int = 0
  labels: int = 0
  splits: dict[str, int] = dataclasses.field(default_factory=dict)
  histogram: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(256, np.int64))

  def add_label(self, label: np.ndarray) -> None:
    self.labels += 1
    self.histogram += np.bincount(label.ravel(), minlength=256)

  def __str__(self) -> str:
    ids = np.flatnonzero(self.histogram)
    total = max(int(self.histogram.sum()), 1)
    hist = ', '.join(f'{i}: {self.histogram[i] / total:.2%}' for i in ids)
    splits = ', '.join(f'{k} {v}' for k, v in self.splits.items())
    return (
      f'{self.dataset}: {self.images} images, {self.labels} labels ({splits})\n'
      f'  label ids (share of pixels): {hist or "none"}'
    )


def _write_label(path: str, label: np.ndarray, summary: Summary) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not cv2.imwrite(path, label.astype(np.uint8)):
    raise errors.DataError(f'{path}: cannot write the label PNG')
  summary.add_label(label)


def _lut(mapping: dict[int, int]) -> np.ndarray:
  """256-entry table: mapped ids, identity elsewhere (as mmseg's loops)."""
  lut = np.arange(256, dtype=np.uint8)
  for k, v in mapping.items():
    lut[k] = v
  return lut


# ------------------------------------------------------------- COCO-Stuff

# COCO's 91 thing ids include 11 that no annotation uses (1-based ids).
COCO_UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)


def coco_stuff10k_mapping() -> dict[int, int]:
  """1-based COCO ids 1..182 -> train ids 1..171 (0 = unlabeled stays 0)."""
  used = [i for i in range(1, 183) if i not in COCO_UNUSED_THING_IDS]
  return {0: 0, **{cid: k + 1 for k, cid in enumerate(used)}}


# The stuffthingmaps release marks unlabelled pixels with this value.
STUFFTHINGMAPS_UNLABELED = 255


def coco_stuff164k_mapping() -> dict[int, int]:
  """0-based stuffthingmaps ids 0..181 -> train ids 0..170; unlabelled -> the ignore index."""
  used = [i - 1 for i in range(1, 183) if i not in COCO_UNUSED_THING_IDS]
  return {
    **{cid: k for k, cid in enumerate(used)},
    STUFFTHINGMAPS_UNLABELED: datasets.get('coco_stuff164k').ignore_index,
  }


def convert_coco_stuff10k(src: str, out: str | None = None, move: bool = False) -> Summary:
  """cocostuff-10k-v1.1 (``imageLists/{train,test}.txt``, ``images/*.jpg``,
  ``annotations/*.mat``) -> ``images/{train2014,test2014}``,
  ``annotations/{...}/*_labelTrainIds.png`` under ``out`` (default ``src``)."""
  from scipy.io import loadmat  # SciPy: only the .mat releases need it

  out = out or src
  lut = _lut(coco_stuff10k_mapping())
  summary = Summary('coco_stuff10k')
  for list_name, split in (('train', 'train2014'), ('test', 'test2014')):
    list_file = os.path.join(src, 'imageLists', f'{list_name}.txt')
    if not os.path.isfile(list_file):
      raise errors.DataError(
        f'{list_file}: missing (expected the cocostuff-10k-v1.1 layout: imageLists/, images/, annotations/)'
      )
    stems = [line.strip() for line in open(list_file) if line.strip()]
    os.makedirs(os.path.join(out, 'images', split), exist_ok=True)
    for stem in stems:
      mat_path = os.path.join(src, 'annotations', stem + '.mat')
      if not os.path.isfile(mat_path):
        raise errors.DataError(f'{mat_path}: annotation listed in {list_file} is missing')
      label = lut[loadmat(mat_path)['S'].astype(np.uint8)]
      _write_label(os.path.join(out, 'annotations', split, stem + '_labelTrainIds.png'), label, summary)
      img_src, img_dst = os.path.join(src, 'images', stem + '.jpg'), os.path.join(out, 'images', split, stem + '.jpg')
      if os.path.abspath(img_src) != os.path.abspath(img_dst):
        (shutil.move if move else shutil.copyfile)(img_src, img_dst)
      summary.images += 1
    summary.splits[split] = len(stems)
  return summary


def convert_coco_stuff164k(root: str) -> Summary:
  """``root/annotations/{train2017,val2017}/*.png`` (stuffthingmaps) ->
  ``*_labelTrainIds.png`` next to them."""
  lut = _lut(coco_stuff164k_mapping())
  summary = Summary('coco_stuff164k')
  for split in ('train2017', 'val2017'):
    files = sorted(
      f for f in glob.glob(os.path.join(root, 'annotations', split, '*.png')) if not f.endswith('_labelTrainIds.png')
    )
    if not files:
      raise errors.DataError(f'{os.path.join(root, "annotations", split)}: no stuffthingmaps PNGs found')
    for path in files:
      raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
      if raw is None or raw.ndim != 2:
        raise errors.DataError(f'{path}: not a single-channel label PNG')
      _write_label(path[: -len('.png')] + '_labelTrainIds.png', lut[raw], summary)
    summary.splits[split] = len(files)
    summary.images += len(glob.glob(os.path.join(root, 'images', split, '*.jpg')))
  return summary


# -------------------------------------------------------- Pascal Context

# The 59 classes of Pascal Context 59 as ids of the 459-class label list,
# and 0 (background); sorted, position = 59-class id.
PASCAL_CONTEXT59_IDS = np.array(
  sorted(
    (0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158)
    + (159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360)
    + (366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
  )
)


def decode_coco_rle(segmentation: dict) -> np.ndarray:
  """COCO run-length encoding (``{'size': [h, w], 'counts': str | list}``,
  column-major runs starting with 0s) -> uint8 (h, w) mask."""
  h, w = segmentation['size']
  counts = segmentation['counts']
  if isinstance(counts, str):
    counts = _rle_string_counts(counts)
  flat = np.zeros(h * w, np.uint8)
  pos, value = 0, 0
  for run in counts:
    if value:
      flat[pos : pos + run] = 1
    pos += run
    value ^= 1
  if pos != h * w:
    raise errors.DataError(f'RLE mask covers {pos} pixels, expected {h}x{w}')
  return flat.reshape(w, h).T


def _rle_string_counts(text: str) -> list[int]:
  # 6-bit characters (offset 48): 5 value bits, bit 0x20 = more follows, the
  # last chunk's bit 0x10 = negative; counts after the second are stored as
  # differences to the count two before.
  counts: list[int] = []
  p = 0
  while p < len(text):
    value, shift = 0, 0
    while True:
      c = ord(text[p]) - 48
      p += 1
      value |= (c & 0x1F) << shift
      shift += 5
      if not c & 0x20:
        if c & 0x10:
          value |= -1 << shift
        break
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
  return counts


def pascal_context_to_59(mask: np.ndarray, where: str, strict: bool = True) -> np.ndarray:
  """459-class ids -> 59-class ids (0 = background). ``strict``: ids other
  than the 59 classes and 0 are an error (the Detail JSON holds only those);
  otherwise they become background (the .mat release has all 459)."""
  mask = np.asarray(mask).astype(np.int64)
  known = np.isin(mask, PASCAL_CONTEXT59_IDS)
  if not known.all():
    if strict:
      bad = np.unique(mask[~known])[:8].tolist()
      raise errors.DataError(f'{where}: category ids {bad} are not Pascal Context 59 classes')
    mask = np.where(known, mask, 0)
  return np.searchsorted(PASCAL_CONTEXT59_IDS, mask).astype(np.uint8)


def convert_pascal_context59(devkit: str, annotations: str, out: str | None = None) -> Summary:
  """``annotations``: ``trainval_merged.json`` (Detail) or a directory of the
  ``.mat`` release (``<stem>.mat`` with ``LabelMap``; splits then from
  ``VOC2010/ImageSets/Main/{train,val}.txt``). Writes under
  ``devkit/VOC2010`` (or ``out``)."""
  voc = os.path.join(devkit, 'VOC2010')
  out = out or voc
  summary = Summary('pascal_context59')
  splits: dict[str, list[str]] = {'train': [], 'val': []}
  label_dir = os.path.join(out, 'SegmentationClassContext')
  if os.path.isdir(annotations):
    from scipy.io import loadmat  # SciPy: only the .mat releases need it

    for split in splits:
      list_file = os.path.join(voc, 'ImageSets', 'Main', f'{split}.txt')
      if not os.path.isfile(list_file):
        raise errors.DataError(f'{list_file}: missing (the VOC2010 split lists)')
      for stem in (line.split()[0] for line in open(list_file) if line.strip()):
        mat = os.path.join(annotations, stem + '.mat')
        if not os.path.isfile(mat):
          continue  # not every VOC2010 image has a context label
        label = pascal_context_to_59(loadmat(mat)['LabelMap'], mat, strict=False)
        _write_label(os.path.join(label_dir, stem + '.png'), label, summary)
        splits[split].append(stem)
  else:
    with open(annotations) as f:
      data = json.load(f)
    by_image: dict[int, list[dict]] = {}
    for ann in data['annos_segmentation']:
      by_image.setdefault(ann['image_id'], []).append(ann)
    for img in data['images']:
      if img['phase'] not in splits:
        continue
      mask = np.zeros((img['height'], img['width']), np.int64)
      for ann in by_image.get(img['image_id'], []):  # later annotations paint over earlier ones
        mask[decode_coco_rle(ann['segmentation']) != 0] = ann['category_id']
      stem = os.path.splitext(img['file_name'])[0]
      label = pascal_context_to_59(mask, f'{annotations} image {img["file_name"]}')
      _write_label(os.path.join(label_dir, stem + '.png'), label, summary)
      splits[img['phase']].append(stem)
  split_dir = os.path.join(out, 'ImageSets', 'SegmentationContext')
  os.makedirs(split_dir, exist_ok=True)
  for split, stems in splits.items():
    with open(os.path.join(split_dir, f'{split}.txt'), 'w') as f:
      f.writelines(s + '\n' for s in sorted(stems))
    summary.splits[split] = len(stems)
  summary.images = sum(
    os.path.isfile(os.path.join(voc, 'JPEGImages', s + '.jpg')) for stems in splits.values() for s in stems
  )
  return summary


# ------------------------------------------------------------- Cityscapes

# cityscapesscripts' label table. The 19 train classes (names: the dataset
# entry's `class_names`, in train-id order) have these label ids; every other
# label is ignored (trainId 255); id -1 (license plate) is never drawn.
CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_IGNORED_LABEL_IDS = {
  'unlabeled': 0,
  'ego vehicle': 1,
  'rectification border': 2,
  'out of roi': 3,
  'static': 4,
  'dynamic': 5,
  'ground': 6,
  'parking': 9,
  'rail track': 10,
  'guard rail': 14,
  'bridge': 15,
  'tunnel': 16,
  'polegroup': 18,
  'caravan': 29,
  'trailer': 30,
  'license plate': -1,
}


def cityscapes_labels() -> dict[str, tuple[int, int]]:
  """Label name -> (id, trainId), trainId the ignore index for labels not trained on."""
  info = datasets.get('cityscapes')
  table = {name: (label_id, info.ignore_index) for name, label_id in CITYSCAPES_IGNORED_LABEL_IDS.items()}
  table.update(
    {name: (label_id, k) for k, (name, label_id) in enumerate(zip(info.class_names, CITYSCAPES_TRAIN_LABEL_IDS))}
  )
  return table


def cityscapes_polygons_to_train_ids(annotation: dict, where: str = '<json>') -> np.ndarray:
  """One ``*_gtFine_polygons.json`` -> uint8 train-id map, pixel for pixel what
  cityscapesscripts' ``createLabelImage(annotation, 'trainIds')`` draws: an 'L'
  image of the ignore index, then every object in file order (later ones on
  top) filled by Pillow's ``ImageDraw.polygon`` at the JSON's coordinates
  (integers or floats, as written); ``<label>group`` falls back to ``<label>``
  when the table has no group entry; deleted objects and negative ids are skipped."""
  try:
    from PIL import Image, ImageDraw  # Pillow, the `cityscapes` extra: the rasteriser cityscapesscripts uses
  except ImportError:
    raise errors.DataError(
      f'{where}: Cityscapes labels are drawn with Pillow, as cityscapesscripts draws them: pip install -e .[cityscapes]'
    ) from None
  labels = cityscapes_labels()
  size = (int(annotation['imgWidth']), int(annotation['imgHeight']))
  image = Image.new('L', size, datasets.get('cityscapes').ignore_index)
  drawer = ImageDraw.Draw(image)
  for obj in annotation['objects']:
    if obj.get('deleted'):
      continue
    name = obj['label']
    if name not in labels and name.endswith('group'):
      name = name[: -len('group')]
    if name not in labels:
      raise errors.DataError(f'{where}: unknown Cityscapes label {obj["label"]!r}')
    label_id, train_id = labels[name]
    if label_id < 0:
      continue
    drawer.polygon([(p[0], p[1]) for p in obj['polygon']], fill=int(train_id))
  return np.asarray(image, np.uint8)


def convert_cityscapes(root: str) -> Summary:
  """``root/gtFine/<split>/<city>/*_gtFine_polygons.json`` ->
  ``*_gtFine_labelTrainIds.png`` next to them."""
  summary = Summary('cityscapes')
  files = sorted(glob.glob(os.path.join(root, 'gtFine', '*', '*', '*_gtFine_polygons.json')))
  if not files:
    raise errors.DataError(
      f'{os.path.join(root, "gtFine")}: no */*/*_gtFine_polygons.json files (gtFine_trainvaltest.zip unpacked here?)'
    )
  for path in files:
    with open(path) as f:
      label = cityscapes_polygons_to_train_ids(json.load(f), path)
    _write_label(path.replace('_gtFine_polygons.json', '_gtFine_labelTrainIds.png'), label, summary)
    split = os.path.basename(os.path.dirname(os.path.dirname(path)))
    summary.splits[split] = summary.splits.get(split, 0) + 1
  summary.images = len(glob.glob(os.path.join(root, 'leftImg8bit', '*', '*', '*_leftImg8bit.png')))
  return summary
