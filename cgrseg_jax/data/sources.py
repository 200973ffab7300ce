"""Random-access data sources for semantic segmentation.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` and
``__getitem__``) whose records are ``{"image": uint8 (H, W, 3) BGR,
"label": uint8 (H, W) raw ids, "index": int}``. ``reduce_zero_label`` is
*not* applied here: it is a transform (transforms.py), as in mmseg, and
``DatasetInfo.reduce_zero_label`` says whether the pipeline adds it.

Directory layouts (mmseg 0.27, ``make_source(name, root, split)``):

===================  ==========================================================
``ade20k``           ``root/images/{training,validation}/*.jpg``,
                     ``root/annotations/{training,validation}/*.png``
                     (root = ``.../ADEChallengeData2016``; 150 classes, raw 0
                     = other, reduce_zero_label)
``coco_stuff10k``    ``root/images/{train2014,test2014}/*.jpg``,
                     ``root/annotations/{...}/*_labelTrainIds.png`` (171,
                     reduce_zero_label as in mmseg's config)
``coco_stuff164k``   ``root/images/{train2017,val2017}``, same suffixes (171)
``pascal_context59`` ``root/JPEGImages/*.jpg``,
                     ``root/SegmentationClassContext/*.png``, split files
                     ``root/ImageSets/SegmentationContext/{train,val}.txt``
                     (root = ``.../VOC2010``; 59, reduce_zero_label)
``cityscapes``       ``root/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``,
                     ``root/gtFine/{...}/*_gtFine_labelTrainIds.png`` (19)
``custom``           ``custom_source(img_dir, ann_dir, ...)``: any suffixes,
                     class names, palette, optional split file
``tfds_ade20k``      TFDS ``scene_parse150`` via ``tfds.data_source``
                     (optional extra ``pip install -e .[tfds]``)
``synthetic``        procedural scenes (synthetic.py), no files needed
===================  ==========================================================

Split names ``train``/``val`` are mapped to each layout's folder names.

Bad input raises ``DataError`` (a ``ValueError``) whose message starts with
the offending path: at construction for what is cheap to check (missing or
empty directories, missing label files, split entries without files), when a
record is read for the rest (undecodable or truncated images, label/image size
mismatch, label ids outside ``[0, num_classes)`` other than 255).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from .. import errors
from . import classes as class_lists

IGNORE_INDEX = 255


class DataError(errors.DataError):
  """A problem with one input file; the message names the file."""

  def __init__(self, path: str, problem: str):
    super().__init__(f'{path}: {problem}')
    self.path = path
    self.problem = problem

  def __reduce__(self):  # picklable, so errors cross from grain workers intact
    return (type(self), (self.path, self.problem))


# ---------------------------------------------------------------- decoding


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise DataError(path, f'cannot read file ({e.strerror or e})') from e


def _check_complete(path: str, data: bytes) -> None:
  """Reject truncated JPEG/PNG files, which OpenCV may decode silently
  (libjpeg fills the missing rows with grey and only prints a warning)."""
  if data[:2] == b'\xff\xd8':
    # Entropy-coded data cannot contain 0xFFD9 or 0xFFDA (0xFF bytes are
    # stuffed), so a complete file has an end-of-image marker after its
    # last start-of-scan marker.
    last_sos = data.rfind(b'\xff\xda')
    if last_sos < 0 or data.find(b'\xff\xd9', last_sos) < 0:
      raise DataError(path, 'truncated JPEG (no end-of-image marker after the image data)')
  elif data[:8] == b'\x89PNG\r\n\x1a\n':
    if data.rfind(b'IEND', max(0, len(data) - 64)) < 0:
      raise DataError(path, 'truncated PNG (no IEND chunk)')


def decode_image(data: bytes, path: str = '<bytes>') -> np.ndarray:
  """Decode to uint8 (H, W, 3) BGR like mmcv ``imfrombytes(flag='color')``."""
  if not data:
    raise DataError(path, 'empty image file')
  _check_complete(path, data)
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise DataError(path, 'not a decodable image (corrupt or unsupported format)')
  return image


def decode_label(data: bytes, path: str = '<bytes>') -> np.ndarray:
  """Decode a single-channel class-id map (uint8 (H, W))."""
  if not data:
    raise DataError(path, 'empty label file')
  _check_complete(path, data)
  label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if label is None:
    raise DataError(path, 'not a decodable label image (corrupt or unsupported format)')
  if label.ndim != 2:
    raise DataError(
      path,
      f'label has {label.shape[2]} channels; expected a single-channel map of '
      'class ids (palette/colour PNGs must be converted to class-id PNGs first)',
    )
  if label.dtype != np.uint8:
    if label.size and label.max() > 255:
      raise DataError(path, f'label is {label.dtype} with ids up to {label.max()}; expected uint8 ids')
    label = label.astype(np.uint8)
  return label


def read_image(path: str) -> np.ndarray:
  return decode_image(_read_bytes(path), path)


def read_label(path: str) -> np.ndarray:
  return decode_label(_read_bytes(path), path)


def image_size(path: str) -> tuple[int, int]:
  """(height, width) from a PNG or JPEG header without decoding; falls back
  to a full decode for other formats."""
  try:
    with open(path, 'rb') as f:
      head = f.read(64 * 1024)
  except OSError as e:
    raise DataError(path, f'cannot read file ({e.strerror or e})') from e
  if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
    w, h = struct.unpack('>II', head[16:24])
    return int(h), int(w)
  if head[:2] == b'\xff\xd8':
    pos = 2
    while pos + 9 < len(head):
      if head[pos] != 0xFF:
        break
      marker = head[pos + 1]
      if marker == 0xFF:  # fill byte
        pos += 1
        continue
      seg_len = struct.unpack('>H', head[pos + 2 : pos + 4])[0]
      if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
        h, w = struct.unpack('>HH', head[pos + 5 : pos + 9])
        return int(h), int(w)
      pos += 2 + seg_len
  img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
  if img is None:
    raise DataError(path, 'not a decodable image')
  return img.shape[:2]


def check_label_values(label: np.ndarray, num_classes: int, reduce_zero_label: bool, path: str) -> None:
  """Raw ids must be in [0, C) (or [0, C] with reduce_zero_label, where 0
  is 'other') or 255."""
  limit = num_classes + 1 if reduce_zero_label else num_classes
  counts = np.bincount(label.ravel(), minlength=256)
  bad = np.flatnonzero(counts[limit:IGNORE_INDEX]) + limit
  if bad.size:
    raise DataError(
      path,
      f'label ids {bad[:8].tolist()} are outside [0, {limit}) and not the ignore value '
      f'{IGNORE_INDEX} (num_classes={num_classes}, reduce_zero_label={reduce_zero_label})',
    )


# ----------------------------------------------------------------- sources


class SegmentationFiles:
  """Paired image / label files; a grain ``RandomAccessDataSource``.

  Records: ``{"image", "label", "index"}`` (see module docstring). Every
  read checks the label against the image and the class range.
  """

  def __init__(
    self,
    image_paths: Sequence[str],
    label_paths: Sequence[str],
    *,
    num_classes: int,
    reduce_zero_label: bool,
    name: str = 'custom',
  ):
    if len(image_paths) != len(label_paths):
      raise ValueError(f'{len(image_paths)} images but {len(label_paths)} labels')
    self.image_paths = list(image_paths)
    self.label_paths = list(label_paths)
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label
    self.name = name

  def __len__(self) -> int:
    return len(self.image_paths)

  def __repr__(self) -> str:
    return f'SegmentationFiles({self.name!r}, {len(self)} samples)'

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    img_path, lbl_path = self.image_paths[index], self.label_paths[index]
    image = read_image(img_path)
    label = read_label(lbl_path)
    if label.shape != image.shape[:2]:
      raise DataError(lbl_path, f'label size {label.shape} differs from image size {image.shape[:2]} of {img_path}')
    check_label_values(label, self.num_classes, self.reduce_zero_label, lbl_path)
    return {'image': image, 'label': label, 'index': index}

  def size(self, index: int) -> tuple[int, int]:
    """(height, width) of a sample from its label's header (cheap)."""
    return image_size(self.label_paths[index])


def _scan(directory: str, suffix: str) -> list[str]:
  """Files under ``directory`` (recursively) ending with ``suffix``, as
  paths relative to ``directory``, sorted (mmcv ``scandir`` order)."""
  found = []
  for dirpath, _, filenames in os.walk(directory):
    for fn in filenames:
      if fn.endswith(suffix):
        found.append(os.path.relpath(os.path.join(dirpath, fn), directory))
  return sorted(found)


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise DataError(path, f'{what} directory does not exist (wrong root or layout?)')


def paired_files(
  img_dir: str,
  ann_dir: str,
  *,
  img_suffix: str,
  seg_map_suffix: str,
  split_file: str | None = None,
) -> tuple[list[str], list[str]]:
  """mmseg ``CustomDataset.load_annotations``: pair ``<stem><img_suffix>``
  with ``<stem><seg_map_suffix>``; with a split file, one stem per line."""
  _require_dir(img_dir, 'image')
  _require_dir(ann_dir, 'annotation')
  if split_file is not None:
    if not os.path.isfile(split_file):
      raise DataError(split_file, 'split file does not exist')
    with open(split_file) as f:
      stems = [line.strip() for line in f if line.strip()]
    if not stems:
      raise DataError(split_file, 'split file lists no samples')
    for stem in stems:
      p = os.path.join(img_dir, stem + img_suffix)
      if not os.path.isfile(p):
        raise DataError(p, f'image listed in split file {split_file} does not exist')
  else:
    rel = _scan(img_dir, img_suffix)
    if not rel:
      raise DataError(img_dir, f'no images ending with {img_suffix!r} (empty directory or wrong layout)')
    stems = [r[: -len(img_suffix)] for r in rel]
  images = [os.path.join(img_dir, s + img_suffix) for s in stems]
  labels = [os.path.join(ann_dir, s + seg_map_suffix) for s in stems]
  for img, lbl in zip(images, labels):
    if not os.path.isfile(lbl):
      raise DataError(lbl, f'label file for image {img} is missing')
  return images, labels


# --------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts of a dataset and its mmseg training recipe."""

  name: str
  num_classes: int
  reduce_zero_label: bool
  img_scale: tuple[int, int] = (2048, 512)
  crop_size: tuple[int, int] = (512, 512)
  class_names: tuple[str, ...] = ()
  palette: np.ndarray | None = dataclasses.field(default=None, compare=False)


def _info(name: str, num_classes: int, rzl: bool, **kw) -> DatasetInfo:
  names = class_lists.class_names(name, num_classes)
  return DatasetInfo(name, num_classes, rzl, class_names=names, palette=class_lists.palette(name, num_classes), **kw)


DATASETS: dict[str, DatasetInfo] = {
  'ade20k': _info('ade20k', 150, True),
  'tfds_ade20k': _info('tfds_ade20k', 150, True),
  'coco_stuff10k': _info('coco_stuff10k', 171, True),
  'coco_stuff164k': _info('coco_stuff164k', 171, False),
  'pascal_context59': _info('pascal_context59', 59, True, img_scale=(520, 520), crop_size=(480, 480)),
  'cityscapes': _info('cityscapes', 19, False, img_scale=(2048, 1024), crop_size=(512, 1024)),
  'synthetic': _info('synthetic', 8, False),
}

_SPLIT_DIRS = {
  'ade20k': {'train': 'training', 'val': 'validation'},
  'coco_stuff10k': {'train': 'train2014', 'val': 'test2014', 'test': 'test2014'},
  'coco_stuff164k': {'train': 'train2017', 'val': 'val2017'},
  'cityscapes': {'train': 'train', 'val': 'val', 'test': 'test'},
  'pascal_context59': {'train': 'train', 'val': 'val'},
}


def _split_dir(dataset: str, split: str) -> str:
  table = _SPLIT_DIRS[dataset]
  if split in table:
    return table[split]
  if split in table.values():
    return split
  raise ValueError(f'unknown split {split!r} for {dataset}; expected one of {sorted(table)}')


def ade20k_source(root: str, split: str = 'train') -> SegmentationFiles:
  d = _split_dir('ade20k', split)
  imgs, lbls = paired_files(
    os.path.join(root, 'images', d),
    os.path.join(root, 'annotations', d),
    img_suffix='.jpg',
    seg_map_suffix='.png',
  )
  return SegmentationFiles(imgs, lbls, num_classes=150, reduce_zero_label=True, name='ade20k')


def coco_stuff_source(root: str, split: str = 'train', variant: str = '10k') -> SegmentationFiles:
  name = f'coco_stuff{variant}'
  if name not in _SPLIT_DIRS:
    raise ValueError(f"COCO-Stuff variant must be '10k' or '164k', got {variant!r}")
  d = _split_dir(name, split)
  imgs, lbls = paired_files(
    os.path.join(root, 'images', d),
    os.path.join(root, 'annotations', d),
    img_suffix='.jpg',
    seg_map_suffix='_labelTrainIds.png',
  )
  return SegmentationFiles(imgs, lbls, num_classes=171, reduce_zero_label=DATASETS[name].reduce_zero_label, name=name)


def pascal_context_source(root: str, split: str = 'train') -> SegmentationFiles:
  d = _split_dir('pascal_context59', split)
  imgs, lbls = paired_files(
    os.path.join(root, 'JPEGImages'),
    os.path.join(root, 'SegmentationClassContext'),
    img_suffix='.jpg',
    seg_map_suffix='.png',
    split_file=os.path.join(root, 'ImageSets', 'SegmentationContext', f'{d}.txt'),
  )
  return SegmentationFiles(imgs, lbls, num_classes=59, reduce_zero_label=True, name='pascal_context59')


def cityscapes_source(root: str, split: str = 'train') -> SegmentationFiles:
  d = _split_dir('cityscapes', split)
  imgs, lbls = paired_files(
    os.path.join(root, 'leftImg8bit', d),
    os.path.join(root, 'gtFine', d),
    img_suffix='_leftImg8bit.png',
    seg_map_suffix='_gtFine_labelTrainIds.png',
  )
  return SegmentationFiles(imgs, lbls, num_classes=19, reduce_zero_label=False, name='cityscapes')


def custom_source(
  img_dir: str,
  ann_dir: str,
  *,
  num_classes: int | None = None,
  class_names: Sequence[str] | None = None,
  palette: np.ndarray | Sequence[Sequence[int]] | None = None,
  img_suffix: str = '.jpg',
  seg_map_suffix: str = '.png',
  split_file: str | None = None,
  reduce_zero_label: bool = False,
) -> tuple[SegmentationFiles, DatasetInfo]:
  """Your own data: labels are single-channel PNGs of class ids (255 =
  ignore). Returns the source and a ``DatasetInfo`` for the pipeline."""
  if class_names is not None:
    class_names = tuple(class_names)
    if num_classes is not None and num_classes != len(class_names):
      raise ValueError(f'num_classes={num_classes} but {len(class_names)} class names')
    num_classes = len(class_names)
  if num_classes is None:
    raise ValueError('custom datasets need num_classes or class_names')
  if not 1 <= num_classes <= 255:
    raise ValueError(f'num_classes must be in [1, 255], got {num_classes}')
  names = class_names or tuple(f'class_{i}' for i in range(num_classes))
  if palette is None:
    pal = class_lists.voc_colormap(num_classes + 1)[1:]
  else:
    pal = np.asarray(palette, dtype=np.uint8)
    if pal.shape != (num_classes, 3):
      raise ValueError(f'palette must have shape ({num_classes}, 3), got {pal.shape}')
  imgs, lbls = paired_files(
    img_dir, ann_dir, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, split_file=split_file
  )
  src = SegmentationFiles(imgs, lbls, num_classes=num_classes, reduce_zero_label=reduce_zero_label, name='custom')
  return src, DatasetInfo('custom', num_classes, reduce_zero_label, class_names=names, palette=pal)


class TfdsSource:
  """TFDS ``scene_parse150`` (or another image/annotation dataset) through
  ``tfds.data_source`` (ArrayRecord, random access, no TensorFlow needed).

  Caveat: TFDS builds ``scene_parse150`` from the SceneParsing *instance*
  annotations (RGB PNGs, class id in the red channel), not from the
  ``ADEChallengeData2016`` semantic maps mmseg trains on; for numbers
  comparable to the paper use the ``ade20k`` directory source.
  """

  def __init__(
    self,
    split: str = 'train',
    *,
    name: str = 'scene_parse150',
    data_dir: str | None = None,
    image_key: str = 'image',
    label_key: str = 'annotation',
    label_channel: int = 0,
    num_classes: int = 150,
    reduce_zero_label: bool = True,
    download: bool = False,
  ):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError('the TFDS source needs tensorflow-datasets: pip install -e .[tfds]') from e
    if name == 'scene_parse150':  # TFDS calls ADE20K's validation images 'test'
      split = {'val': 'test', 'validation': 'test'}.get(split, split)
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    self._where = f'tfds:{name}/{split}'
    self.image_key, self.label_key, self.label_channel = image_key, label_key, label_channel
    self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label

  def __len__(self) -> int:
    return len(self._ds)

  def __repr__(self) -> str:
    return f'TfdsSource({self._where}, {len(self)} samples)'

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    record = self._ds[index]
    where = f'{self._where}[{index}]'
    rgb = np.asarray(record[self.image_key])
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
      raise DataError(where, f'image has shape {rgb.shape} {rgb.dtype}; expected (H, W, 3) uint8')
    label = np.asarray(record[self.label_key])
    if label.ndim == 3:
      label = label[..., self.label_channel]
    label = np.ascontiguousarray(label.astype(np.uint8))
    image = np.ascontiguousarray(rgb[..., ::-1])  # TFDS decodes RGB; the pipeline is BGR
    if label.shape != image.shape[:2]:
      raise DataError(where, f'label size {label.shape} differs from image size {image.shape[:2]}')
    check_label_values(label, self.num_classes, self.reduce_zero_label, where)
    return {'image': image, 'label': label, 'index': index}


def make_source(
  dataset: str,
  root: str | None = None,
  split: str = 'train',
  **kwargs,
) -> tuple[Any, DatasetInfo]:
  """Build a source by dataset name; returns ``(source, info)``.

  ``kwargs`` go to the specific builder: ``custom`` takes the arguments of
  ``custom_source`` (``root`` is then unused); ``synthetic`` those of
  ``synthetic.SyntheticSegmentation`` (``split`` picks a disjoint seed
  range); ``tfds_ade20k`` those of ``TfdsSource`` (``root`` = data_dir).
  """
  key = dataset.lower()
  if key == 'custom':
    return custom_source(**kwargs)
  if key == 'synthetic':
    from . import synthetic  # pylint: disable=import-outside-toplevel

    src = synthetic.SyntheticSegmentation(split=split, **kwargs)
    info = dataclasses.replace(
      DATASETS['synthetic'],
      num_classes=src.num_classes,
      class_names=class_lists.synthetic_classes(src.num_classes),
      palette=class_lists.palette('synthetic', src.num_classes),
    )
    return src, info
  if key in ('tfds_ade20k', 'scene_parse150'):
    return TfdsSource(split, data_dir=root, **kwargs), DATASETS['tfds_ade20k']
  builders: dict[str, Callable[..., SegmentationFiles]] = {
    'ade20k': ade20k_source,
    'coco_stuff10k': lambda r, s: coco_stuff_source(r, s, '10k'),
    'coco_stuff164k': lambda r, s: coco_stuff_source(r, s, '164k'),
    'pascal_context59': pascal_context_source,
    'cityscapes': cityscapes_source,
  }
  if key not in builders:
    raise ValueError(
      f'unknown dataset {dataset!r}; expected one of {sorted(list(builders) + ["custom", "synthetic", "tfds_ade20k"])}'
    )
  if root is None:
    raise ValueError(f'dataset {dataset!r} needs root= (the directory of its mmseg layout)')
  if kwargs:
    raise TypeError(f'unexpected arguments for {dataset!r}: {sorted(kwargs)}')
  return builders[key](root, split), DATASETS[key]
