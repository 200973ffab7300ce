"""Per-class pixel counts of the training labels, and class weights from them.

`train_histogram(config, workdir)` counts the pixels of each class over the
training split as the training pipeline reads it (folders, ArrayRecord shards
from `data.shards`, the synthetic scenes, TFDS), after the dataset's label
mapping (its `label_map`, then `reduce_zero_label`), the ignore index left
out; no augmentation. The counts are cached in `<workdir>/class_histogram.json`
with a description of the source they came from (dataset, root or shard
folder, split, number of images, a digest of the label files or shards) and
reused while that description matches; any change of it counts again.

`class_weights(counts, method)` turns them into loss weights:

  median_frequency  w_c = median(f) / f_c, f_c = pixels of class c / labelled
                    pixels (the global frequency; Eigen & Fergus divide by the
                    pixels of the images containing c instead). Classes with
                    no pixel get weight 0 and stay out of the median (numpy's:
                    the mean of the two middle values for an even count).
  enet              w_c = 1 / ln(1.02 + p_c), p_c = pixels of class c / labelled
                    pixels (Paszke et al., ENet); an absent class gets the
                    largest weight, 1 / ln 1.02, as the formula gives.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np

from cgrseg_jax import errors, storage
from cgrseg_jax.data import input_pipeline, shards, sources, transforms
from cgrseg_jax.data import pipeline as dp

log = logging.getLogger(__name__)

HISTOGRAM_FILE = 'class_histogram.json'
FORMAT = 'cgrseg-jax/class-histogram/1'
WEIGHT_METHODS = ('median_frequency', 'enet')
ENET_C = 1.02


@dataclasses.dataclass(frozen=True)
class ClassHistogram:
  counts: np.ndarray  # (K,) int64 labelled pixels per class
  source: dict  # what was counted (the cache key)
  origin: str  # where the counts came from, for the log


def train_source(config):
  """(source, info) of the training split, as `input_pipeline.train_iterator` reads it."""
  d = config.data
  kwargs = input_pipeline.source_kwargs(config, 'train')
  source, info = input_pipeline.sharded_source(config, d.train_split)
  return dp.resolve_source(
    d.dataset, d.root, d.train_split, source, info, source_kwargs=kwargs or None, num_classes=config.model.num_classes
  )


def _digest(lines) -> str:
  return hashlib.sha256('\n'.join(map(str, lines)).encode()).hexdigest()


def describe_source(config, source, info) -> dict:
  """The cache key: what identifies the counted labels (JSON values only)."""
  d = config.data
  desc: dict[str, Any] = {
    'dataset': info.name,
    'split': d.train_split,
    'images': len(source),
    'num_classes': info.num_classes,
    'reduce_zero_label': bool(info.reduce_zero_label),
    'ignore_index': int(info.ignore_index),
  }
  if d.get('shards'):
    split_dir = storage.path(d.shards) / d.train_split
    desc['shards'] = os.fspath(split_dir)
    # The shards' hashes change with any rewritten record; the manifest is one small read.
    desc['shards_sha256'] = _digest(s['sha256'] for s in shards.read_manifest(split_dir)['shards'])
  else:
    desc['root'] = os.fspath(storage.path(d.root)) if d.root else None
    desc['source_kwargs'] = input_pipeline.source_kwargs(config, 'train')
  if isinstance(source, sources.SegmentationFiles):
    # File names only (one listing, already made): a label rewritten in place under the same name goes unnoticed.
    desc['labels_sha256'] = _digest(source.label_paths)
  return json.loads(json.dumps(desc))  # tuples -> lists, as they read back from the file


def _label_reader(source):
  """index -> raw label (the dataset's label map applied, as the source gives it)."""
  if isinstance(source, sources.SegmentationFiles):

    def read(i):  # the label file alone: decoding the image would only cost time
      path = source.label_paths[i]
      label = sources.read_label(path)
      if source.label_lut is not None:
        label = source.label_lut[label]
      sources.check_label_values(label, source.num_classes, source.reduce_zero_label, path, source.ignore_index)
      return label

    return read
  return lambda i: source[i]['label']


def count_pixels(source, info, threads: int = 8) -> np.ndarray:
  """(K,) int64: labelled pixels per class over every sample of `source`, after
  `reduce_zero_label` when the dataset has it; ignored pixels are not counted."""
  read = _label_reader(source)
  k, ignore = info.num_classes, int(info.ignore_index)

  def one(i):
    label = read(i)
    if info.reduce_zero_label:
      label = transforms.reduce_zero_label(label)
    counts = np.bincount(label.ravel(), minlength=256).astype(np.int64)
    counts[ignore] = 0
    return counts

  total = np.zeros(256, np.int64)
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:  # decoding releases the GIL
    for counts in pool.map(one, range(len(source))):
      total += counts
  if total[k:].any():
    raise errors.DataError(f'{source!r}: label ids {np.flatnonzero(total[k:])[:8] + k} are not below {k} classes')
  return total[:k]


def _read_cache(path, source: dict) -> Optional[np.ndarray]:
  try:
    cached = json.loads(path.read_text())
  except (OSError, ValueError):  # absent, or half written by another process: count again
    return None
  if not isinstance(cached, dict) or cached.get('format') != FORMAT or cached.get('source') != source:
    return None
  counts = np.asarray(cached.get('counts', ()), np.int64)
  return counts if counts.shape == (source['num_classes'],) else None


def train_histogram(config, workdir=None, threads: int = 8) -> ClassHistogram:
  """The training split's class pixel counts: from `<workdir>/class_histogram.json`
  when it describes the same source, otherwise counted (and saved there by
  process 0; every process counts for itself, so none waits on another)."""
  config = input_pipeline.with_dataset_defaults(config)
  source, info = train_source(config)
  desc = describe_source(config, source, info)
  path = storage.path(workdir) / HISTOGRAM_FILE if workdir is not None else None
  if path is not None:
    counts = _read_cache(path, desc)
    if counts is not None:
      return ClassHistogram(counts, desc, f'{path} (cached counts of {desc["images"]} {desc["split"]} labels)')
  log.info('counting class pixels over %d %s labels of %s', len(source), desc['split'], source)
  counts = count_pixels(source, info, threads)
  origin = f'{len(source)} {desc["split"]} labels of {source!r}'
  if path is not None and jax.process_index() == 0:
    record = {'format': FORMAT, 'source': desc, 'class_names': list(info.class_names), 'counts': counts.tolist()}
    tmp = path.parent / f'{HISTOGRAM_FILE}.tmp{os.getpid()}'
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # readers see the old file or the whole new one
    origin += f', saved to {path}'
  return ClassHistogram(counts, desc, origin)


def class_weights(counts, method: str = 'median_frequency') -> np.ndarray:
  """(K,) float32 class weights from per-class pixel counts (see the module docstring)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    raise errors.DataError('the training labels have no labelled pixel: no class weights can be derived')
  freq = counts / total
  if method == 'median_frequency':
    present = counts > 0
    weights = np.zeros_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
  elif method == 'enet':
    weights = 1.0 / np.log(ENET_C + freq)
  else:
    raise errors.ConfigError(f'class weight method {method!r}; expected one of {list(WEIGHT_METHODS)}')
  return weights.astype(np.float32)
