"""A dataset split as ArrayRecord shards: what a pod reads from GCS instead of loose files.

  <dir>/<split>/manifest.json
  <dir>/<split>/<split>-00000-of-00008.array_record   ...

Records are msgpack maps `{"id": str, "image": bytes, "label": bytes}`, in the
order of the source they were written from, cut into contiguous runs, one per
shard: record i of the shards in file order is sample i of the source. The
bytes are the original files of a folder dataset (no re-encoding; the label
map of the dataset is applied on reading, as the folder source does) and
lossless PNGs for sources that only hold arrays (synthetic, TFDS). The
manifest gives the dataset, class names, count, each shard's record count and
SHA-256, and every sample's (height, width), so evaluation plans its buckets
without reading a record.

`ShardSource` reads them through grain's `ArrayRecordDataSource` (random
access, local or gs://), so the training pipeline's global shuffle, per-process
share and checkpointable iterator are those of the folder source, and the same
seed gives the same batches from either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import cv2
import grain
import msgpack
import numpy as np
from array_record.python import array_record_module  # grain's own dependency; grain has no writer

from cgrseg_jax import errors, storage
from cgrseg_jax.data import sources
from cgrseg_jax.data.datasets import DatasetInfo

MANIFEST = 'manifest.json'
FORMAT = 'cgrseg-jax/segmentation-shards/1'
# One record per chunk: random access reads one record, not a group of them (grain's advice).
WRITER_OPTIONS = 'group_size:1'


def shard_name(split: str, k: int, n: int) -> str:
  return f'{split}-{k:05d}-of-{n:05d}.array_record'


def _png(array: np.ndarray, what: str) -> bytes:
  ok, data = cv2.imencode('.png', array)
  if not ok:
    raise errors.DataError(f'{what}: cannot encode as PNG')
  return data.tobytes()


def _record_bytes(source, index: int, ids: Optional[list[str]]) -> tuple[dict, tuple[int, int]]:
  """(record, label size) of sample `index`; the sample is decoded and checked once here."""
  record = source[index]  # raises DataError naming the file for bad input
  size = tuple(int(v) for v in record['label'].shape[:2])
  if isinstance(source, sources.SegmentationFiles):
    image = storage.read_bytes(source.image_paths[index])
    label = storage.read_bytes(source.label_paths[index])
  else:
    image = _png(record['image'], f'sample {index}')
    label = _png(record['label'], f'sample {index} label')
  sample_id = ids[index] if ids is not None else str(index)
  return {'id': sample_id, 'image': image, 'label': label}, size


def _sample_ids(source) -> Optional[list[str]]:
  """Image paths relative to their common folder, for a folder source."""
  if not isinstance(source, sources.SegmentationFiles) or not source.image_paths:
    return None
  paths = source.image_paths
  if len(paths) == 1:
    return [os.path.basename(paths[0])]
  common = os.path.commonpath(paths)
  return [p[len(common) :].lstrip('/') for p in paths]


def _sha256(local_path: str) -> str:
  h = hashlib.sha256()
  with open(local_path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def write_split(
  source,
  info: DatasetInfo,
  directory,
  split: str,
  num_shards: int,
  progress: Optional[Callable[[int], None]] = None,
) -> dict:
  """Write `source` as `num_shards` shards plus the manifest under `<directory>/<split>/`; returns the manifest.

  Shards are written to a local temporary folder (array_record writes only
  local files), hashed, then copied to `directory` (local or gs://); the
  manifest goes last, so a split without one is unfinished."""
  n = len(source)
  if not 1 <= num_shards <= max(n, 1):
    raise errors.ConfigError(f'num_shards={num_shards}: expected 1..{n} for {n} samples')
  out = storage.path(directory) / split
  out.mkdir(parents=True, exist_ok=True)
  ids = _sample_ids(source)
  shards, sizes = [], []
  with tempfile.TemporaryDirectory(prefix='cgrseg-shards-') as tmp:
    for k in range(num_shards):
      start, stop = k * n // num_shards, (k + 1) * n // num_shards
      name = shard_name(split, k, num_shards)
      local = os.path.join(tmp, name)
      writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
      try:
        for i in range(start, stop):
          record, size = _record_bytes(source, i, ids)
          writer.write(msgpack.packb(record, use_bin_type=True))
          sizes.append(size)
          if progress is not None:
            progress(1)
      finally:
        writer.close()
      shards.append({'file': name, 'count': stop - start, 'sha256': _sha256(local)})
      with open(local, 'rb') as src, (out / name).open('wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
      os.remove(local)
  manifest = {
    'format': FORMAT,
    'dataset': info.name,
    'split': split,
    'count': n,
    'num_classes': info.num_classes,
    'class_names': list(info.class_names),
    'ignore_index': info.ignore_index,
    'label_map_applied': not isinstance(source, sources.SegmentationFiles),
    'shards': shards,
    'sizes': sizes,
  }
  (out / MANIFEST).write_text(json.dumps(manifest))
  return manifest


def read_manifest(split_dir) -> dict:
  path = storage.path(split_dir) / MANIFEST
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise errors.DataError(
      f'{split_dir}: no {MANIFEST} (not a shard folder, or its writing did not finish; '
      'write it with scripts/write_shards.py)'
    ) from None
  except ValueError as e:
    raise errors.DataError(f'{path}: not valid JSON ({e})') from None
  if manifest.get('format') != FORMAT:
    raise errors.DataError(f'{path}: format {manifest.get("format")!r}; expected {FORMAT!r}')
  return manifest


class ShardSource:
  """The samples of one shard folder; a grain `RandomAccessDataSource` with the
  records of the folder source (`{"image" BGR, "label", "index"}`)."""

  def __init__(self, split_dir, info: DatasetInfo):
    self.where = os.fspath(split_dir)
    manifest = read_manifest(split_dir)
    if manifest['num_classes'] != info.num_classes or manifest['class_names'] != list(info.class_names):
      raise errors.DataError(
        f'{self.where}: shards of {manifest["dataset"]!r} with {manifest["num_classes"]} classes '
        f'({", ".join(manifest["class_names"][:4])}, ...), but the config reads {info.name!r} with '
        f'{info.num_classes} classes ({", ".join(info.class_names[:4])}, ...)'
      )
    self.num_classes, self.reduce_zero_label, self.ignore_index = (
      info.num_classes,
      info.reduce_zero_label,
      info.ignore_index,
    )
    self.label_lut = None if manifest['label_map_applied'] else info.label_lut()
    self.sizes = [tuple(s) for s in manifest['sizes']]
    files = [os.fspath(storage.path(split_dir) / s['file']) for s in manifest['shards']]
    self._records = grain.sources.ArrayRecordDataSource(files)
    if len(self._records) != manifest['count']:
      raise errors.DataError(
        f'{self.where}: the shards hold {len(self._records)} records, the manifest says {manifest["count"]} '
        '(a shard replaced or cut short?)'
      )

  def __len__(self) -> int:
    return len(self.sizes)

  def __repr__(self) -> str:
    return f'ShardSource({self.where}, {len(self)} samples)'

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    record = msgpack.unpackb(self._records[index], raw=False)
    where = f'{self.where}[{index}] ({record["id"]})'
    image = sources.decode_image(record['image'], where)
    label = sources.decode_label(record['label'], where)
    if self.label_lut is not None:
      label = self.label_lut[label]
    if label.shape != image.shape[:2]:
      raise sources.DataError(where, f'label size {label.shape} differs from image size {image.shape[:2]}')
    sources.check_label_values(label, self.num_classes, self.reduce_zero_label, where, self.ignore_index)
    return {'image': image, 'label': label, 'index': index}

  def size(self, index: int) -> tuple[int, int]:
    """(height, width) of a sample, from the manifest."""
    return self.sizes[index]
