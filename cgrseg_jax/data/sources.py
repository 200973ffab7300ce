"""Random-access data sources for semantic segmentation.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` and
``__getitem__``) whose records are ``{"image": uint8 (H, W, 3) BGR,
"label": uint8 (H, W) raw ids, "index": int}``. ``reduce_zero_label`` is
*not* applied here: it is a transform (transforms.py), as in mmseg, and
``DatasetInfo.reduce_zero_label`` says whether the pipeline adds it.

The datasets, their directory layouts and default roots are registered in
datasets.py (``make_source(name, root, split)`` builds any of them, with the
reader its entry names, ``SOURCES``): ``files`` reads a registered layout,
``custom`` takes its directories, suffixes and classes from the caller (the
config's ``data.custom``), ``synthetic`` needs no files, ``tfds`` reads TFDS
``scene_parse150`` (optional extra ``pip install -e .[tfds]``).

Labels are read as mmseg reads them: grey PNGs give their values, palette
PNGs their palette indices, 16-bit PNGs their values (which must fit the
class range); a dataset's ``label_map`` (CamVid: void 11 -> 255) is applied
on reading.

Bad input raises ``DataError`` (a ``ValueError``) whose message starts with
the offending path: at construction for what is cheap to check (missing or
empty directories, missing label files, split entries without files), when a
record is read for the rest (undecodable or truncated images, label/image size
mismatch, label ids outside ``[0, num_classes)`` other than 255).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any, Sequence

import cv2
import numpy as np

from .. import errors, storage
from . import datasets, synthetic
from .datasets import IGNORE_INDEX, DatasetInfo

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


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
    return storage.read_bytes(path)
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


def _png_chunks(data: bytes):
  """(type, payload) of each chunk of a PNG byte string."""
  pos = 8
  while pos + 8 <= len(data):
    (length,) = struct.unpack('>I', data[pos : pos + 4])
    kind = data[pos + 4 : pos + 8]
    yield kind, data[pos + 8 : pos + 8 + length]
    pos += 12 + length


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
  return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))


def _png_header(data: bytes) -> tuple[int, int] | None:
  """(bit depth, colour type) of a PNG, None for other formats."""
  if data[:8] == PNG_SIGNATURE and data[12:16] == b'IHDR' and len(data) >= 26:
    return data[24], data[25]
  return None


def _palette_as_indices(data: bytes) -> bytes:
  """The same palette PNG with palette entry i = grey (i, i, i) and no
  transparency: decoding it gives every pixel's palette index in each
  channel. mmseg reads palette labels as their indices (Pillow's 'P' mode);
  OpenCV alone would expand them to colours."""
  bit_depth = data[24]
  entries = min(256, 1 << bit_depth)
  grey = bytes(v for i in range(entries) for v in (i, i, i))
  out = [PNG_SIGNATURE]
  for kind, payload in _png_chunks(data):
    if kind == b'PLTE':
      payload = grey
    elif kind == b'tRNS':
      continue
    out.append(_png_chunk(kind, payload))
  return b''.join(out)


def decode_label(data: bytes, path: str = '<bytes>') -> np.ndarray:
  """Decode a single-channel class-id map (uint8 (H, W)) as mmseg reads it
  (``LoadAnnotations``: Pillow, 'unchanged'): grey PNGs give their values,
  palette PNGs their palette indices, 1-bit PNGs 0/1; 16-bit PNGs are read as
  they are and must hold ids that fit the class range (< 256)."""
  if not data:
    raise DataError(path, 'empty label file')
  _check_complete(path, data)
  header = _png_header(data)
  palette = header is not None and header[1] == 3
  if palette:
    data = _palette_as_indices(data)
  label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if label is None:
    raise DataError(path, 'not a decodable label image (corrupt or unsupported format)')
  if palette:
    label = np.ascontiguousarray(label[..., 0])
  elif header == (1, 0):  # libpng expands 1-bit grey to 0/255; the ids are 0/1
    label = (label > 0).astype(np.uint8)
  if label.ndim != 2:
    raise DataError(
      path,
      f'label has {label.shape[2]} channels; expected a single-channel map of '
      'class ids (a grey or palette PNG; colour-coded RGB labels must be converted to class ids first)',
    )
  if label.dtype != np.uint8:
    if label.size and label.max() > 255:
      raise DataError(
        path,
        f'{label.dtype} label has ids up to {label.max()}; class ids must be below the class count '
        f'(at most 255) or {IGNORE_INDEX} (ignore)',
      )
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
    head = storage.read_head(path, 64 * 1024)
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


def check_label_values(
  label: np.ndarray, num_classes: int, reduce_zero_label: bool, path: str, ignore_index: int = IGNORE_INDEX
) -> None:
  """Raw ids must be in [0, C) (or [0, C] with reduce_zero_label, where 0
  is 'other') or the ignore index."""
  limit = num_classes + 1 if reduce_zero_label else num_classes
  counts = np.bincount(label.ravel(), minlength=256)
  counts[ignore_index] = 0
  bad = np.flatnonzero(counts[limit:]) + limit
  if bad.size:
    raise DataError(
      path,
      f'label ids {bad[:8].tolist()} are outside [0, {limit}) and not the ignore value '
      f'{ignore_index} (num_classes={num_classes}, reduce_zero_label={reduce_zero_label})',
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
    label_lut: np.ndarray | None = None,
    ignore_index: int = IGNORE_INDEX,
  ):
    if len(image_paths) != len(label_paths):
      raise ValueError(f'{len(image_paths)} images but {len(label_paths)} labels')
    self.image_paths = list(image_paths)
    self.label_paths = list(label_paths)
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label
    self.name = name
    self.label_lut = label_lut  # DatasetInfo.label_map as a table (raw id -> id)
    self.ignore_index = ignore_index

  def __len__(self) -> int:
    return len(self.image_paths)

  def __repr__(self) -> str:
    return f'SegmentationFiles({self.name!r}, {len(self)} samples)'

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    img_path, lbl_path = self.image_paths[index], self.label_paths[index]
    image = read_image(img_path)
    label = read_label(lbl_path)
    if self.label_lut is not None:
      label = self.label_lut[label]
    if label.shape != image.shape[:2]:
      raise DataError(lbl_path, f'label size {label.shape} differs from image size {image.shape[:2]} of {img_path}')
    check_label_values(label, self.num_classes, self.reduce_zero_label, lbl_path, self.ignore_index)
    return {'image': image, 'label': label, 'index': index}

  def size(self, index: int) -> tuple[int, int]:
    """(height, width) of a sample from its label's header (cheap)."""
    return image_size(self.label_paths[index])


def _require_dir(path: str, what: str) -> None:
  if not storage.path(path).is_dir():
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
  with ``<stem><seg_map_suffix>``; with a split file, one stem per line.
  Each directory is listed once (one listing, not a request per file, on gs://)."""
  _require_dir(img_dir, 'image')
  _require_dir(ann_dir, 'annotation')
  image_stems = [r[: -len(img_suffix)] for r in storage.files_under(img_dir, img_suffix)]
  if split_file is not None:
    if not storage.path(split_file).is_file():
      raise DataError(split_file, 'split file does not exist')
    stems = [line.strip() for line in storage.path(split_file).read_text().splitlines() if line.strip()]
    if not stems:
      raise DataError(split_file, 'split file lists no samples')
    present = set(image_stems)
    for stem in stems:
      if stem not in present:
        raise DataError(
          os.path.join(img_dir, stem + img_suffix), f'image listed in split file {split_file} does not exist'
        )
  else:
    if not image_stems:
      raise DataError(img_dir, f'no images ending with {img_suffix!r} (empty directory or wrong layout)')
    stems = image_stems
  labelled = {r[: -len(seg_map_suffix)] for r in storage.files_under(ann_dir, seg_map_suffix)}
  images = [os.path.join(img_dir, s + img_suffix) for s in stems]
  labels = [os.path.join(ann_dir, s + seg_map_suffix) for s in stems]
  for stem, img, lbl in zip(stems, images, labels):
    if stem not in labelled:
      raise DataError(lbl, f'label file for image {img} is missing')
  return images, labels


# ----------------------------------------------------------------- readers


def _missing_data_hint(info: DatasetInfo, root: str) -> str:
  lines = [f'\n  dataset {info.name!r} looked for at root {storage.path(root)}']
  if info.layout is not None:
    lines.append(f'  expected layout: {info.layout.describe()}')
  if info.obtain:
    lines.append(f'  get it: {info.obtain}')
  lines.append(
    '  (set --config.data.root=DIR if it is elsewhere; `make demo` trains on generated data and needs no download)'
  )
  return '\n'.join(lines)


def _files(info: DatasetInfo, paths: dict) -> SegmentationFiles:
  imgs, lbls = paired_files(**paths)
  return SegmentationFiles(
    imgs,
    lbls,
    num_classes=info.num_classes,
    reduce_zero_label=info.reduce_zero_label,
    name=info.name,
    label_lut=info.label_lut(),
    ignore_index=info.ignore_index,
  )


def layout_source(info: DatasetInfo, root: str, split: str = 'train') -> SegmentationFiles:
  """The files of one split of a registered directory-layout dataset."""
  try:
    return _files(info, info.layout.paths(root, split, info.name))
  except DataError as e:  # missing or incomplete: say where the data should be and how to get it
    raise DataError(e.path, e.problem + _missing_data_hint(info, root)) from None


def custom_source(
  img_dir: str,
  ann_dir: str,
  *,
  img_suffix: str = '.jpg',
  seg_map_suffix: str = '.png',
  split_file: str | None = None,
  **info_kwargs,
) -> tuple[SegmentationFiles, DatasetInfo]:
  """Your own data: labels are single-channel (grey or palette) PNGs of class
  ids (the ignore index = ignore). `info_kwargs` are those of
  `datasets.custom_info` (class names or count, palette, reduce_zero_label,
  label_map). Returns the source and its ``DatasetInfo``."""
  info = datasets.custom_info(**info_kwargs)
  paths = dict(
    img_dir=img_dir, ann_dir=ann_dir, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, split_file=split_file
  )
  return _files(info, paths), info


def _layout_reader(info: DatasetInfo, root: str | None, split: str, **kwargs):
  if kwargs:
    raise TypeError(f'unexpected arguments for {info.name!r}: {sorted(kwargs)}')
  if info.layout is None:
    raise errors.ConfigError(f'dataset {info.name!r} has no layout to read')
  root = root or info.default_root
  if root is None:
    raise errors.ConfigError(f'dataset {info.name!r} needs a root (config.data.root)')
  return layout_source(info, root, split), info


def _custom_reader(
  info: DatasetInfo, root: str | None, split: str, *, img_dir: str, ann_dir: str, split_file=None, **kwargs
):
  """``custom`` from config fields: ``img_dir``/``ann_dir``/``split_file`` may
  contain ``{split}`` and are relative to ``root`` when one is given."""
  del info

  def where(p):
    if p is None:
      return None
    p = p.format(split=split)
    return os.path.join(root, p) if root else p

  return custom_source(where(img_dir), where(ann_dir), split_file=where(split_file), **kwargs)


def _synthetic_reader(info: DatasetInfo, root, split: str, **kwargs):
  del info, root
  src = synthetic.SyntheticSegmentation(split=split, **kwargs)
  return src, datasets.synthetic_info(src.num_classes)


def _tfds_reader(info: DatasetInfo, root, split: str, **kwargs):
  kwargs.setdefault('ignore_index', info.ignore_index)
  return TfdsSource(split, data_dir=root, **kwargs), info


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
    ignore_index: int = IGNORE_INDEX,
    download: bool = False,
  ):
    try:
      import tensorflow_datasets as tfds  # the `tfds` extra, heavy: only this source needs it
    except ImportError as e:
      raise ImportError('the TFDS source needs tensorflow-datasets: pip install -e .[tfds]') from e
    if name == 'scene_parse150':  # TFDS calls ADE20K's validation images 'test'
      split = {'val': 'test', 'validation': 'test'}.get(split, split)
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    self._where = f'tfds:{name}/{split}'
    self.image_key, self.label_key, self.label_channel = image_key, label_key, label_channel
    self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
    self.ignore_index = ignore_index

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
    check_label_values(label, self.num_classes, self.reduce_zero_label, where, self.ignore_index)
    return {'image': image, 'label': label, 'index': index}


def make_source(
  dataset: str,
  root: str | None = None,
  split: str = 'train',
  **kwargs,
) -> tuple[Any, DatasetInfo]:
  """Build a source by registered dataset name; returns ``(source, info)``.

  ``root`` defaults to the dataset's ``default_root`` (the mmseg location).
  ``kwargs`` go to the reader of the entry's ``source`` kind: ``custom`` takes
  those of ``custom_source`` (``img_dir``/``ann_dir`` relative to ``root``,
  with ``{split}``); ``synthetic`` those of ``synthetic.SyntheticSegmentation``
  (``split`` picks a disjoint seed range); ``tfds`` those of ``TfdsSource``
  (``root`` = data_dir).
  """
  info = datasets.get(dataset)
  if info.source not in SOURCES:
    raise errors.ConfigError(
      f'dataset {dataset!r}: unknown source kind {info.source!r}; expected one of {sorted(SOURCES)}'
    )
  return SOURCES[info.source](info, root, split, **kwargs)


# DatasetInfo.source -> reader(info, root, split, **kwargs) -> (source, info).
SOURCES = {'files': _layout_reader, 'custom': _custom_reader, 'synthetic': _synthetic_reader, 'tfds': _tfds_reader}
