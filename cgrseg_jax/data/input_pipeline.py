"""Config -> input pipelines: what training and evaluation call (maxtext's
input-pipeline interface). The dataset entry from the registry (custom and
synthetic take their settings from the config), the transform list
data.train_pipeline, the test-time resize and padding (data.img_scale,
data.size_divisor, data.eval_max_buckets), the evaluation subset
(data.eval_max_images), and reading several process shards in one process.

  train_it = input_pipeline.train_iterator(config)   # this process's share of each global batch
  ev = input_pipeline.eval_data(config)              # this process's share of the validation set

`data.emulate_process_count = n` makes each of the `jax.process_count()` real
processes read `n / process_count` consecutive shards of an n-process run and
concatenate their batches, so a run on 1 host sees exactly the global batches
(same samples, same augmentation draws, same row order) as a run on n hosts.
The 2-process test compares against such a run; it is also how a pod run can
be replayed on one machine. The iterator state of all shards is checkpointed
together (grain's orbax handler calls `get_state`/`set_state` on it).
"""

from __future__ import annotations

import copy
import json

import grain
import jax
import numpy as np

from cgrseg_jax import errors, storage
from cgrseg_jax.data import datasets, shards
from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.data.datasets import DatasetInfo


def shard_layout(config) -> tuple[list[int], int]:
  """(shard indices this process reads, total shard count)."""
  n_proc, p = jax.process_count(), jax.process_index()
  n = config.data.get('emulate_process_count') or n_proc
  if n % n_proc:
    raise errors.ConfigError(f'config.data.emulate_process_count={n} must be a multiple of the {n_proc} processes')
  k = n // n_proc
  return list(range(p * k, (p + 1) * k)), n


def source_kwargs(config, split: str) -> dict:
  """What the dataset's source builder takes from the config (custom
  directories and classes, synthetic scene settings); {} for the others."""
  d = config.data
  if d.dataset == 'synthetic':
    s = d.synthetic
    return dict(
      num_classes=s.num_classes,
      image_size=tuple(s.image_size),
      seed=config.seed,
      num_samples=s.num_train if split == 'train' else s.num_val,
    )
  if d.dataset == 'custom':
    c = d.custom
    if not c.img_dir or not c.ann_dir:
      raise errors.ConfigError(
        'data.dataset=custom needs config.data.custom.img_dir and .ann_dir (relative to data.root, '
        "'{split}' is replaced by the split name); see README, 'Your own data'"
      )
    return dict(
      img_dir=c.img_dir,
      ann_dir=c.ann_dir,
      img_suffix=c.img_suffix,
      seg_map_suffix=c.seg_map_suffix,
      split_file=c.split_file,
      class_names=tuple(c.class_names) if c.class_names else None,
      num_classes=c.num_classes,
      palette=tuple(tuple(p) for p in c.palette) if c.palette else None,
      reduce_zero_label=c.reduce_zero_label,
    )
  return {}


def dataset_info(config) -> DatasetInfo:
  """The registry entry of config.data.dataset (custom: from data.custom)."""
  d = config.data
  if d.dataset == 'custom':
    kw = source_kwargs(config, 'train')
    return datasets.custom_info(
      num_classes=kw['num_classes'],
      class_names=kw['class_names'],
      palette=kw['palette'],
      reduce_zero_label=kw['reduce_zero_label'],
    )
  if d.dataset == 'synthetic':
    return datasets.synthetic_info(d.synthetic.num_classes)
  return datasets.get(d.dataset)


def sharded_source(config, split: str):
  """(source, info) of `split` from config.data.shards, or (None, None) when that is unset."""
  if not config.data.get('shards'):
    return None, None
  info = dataset_info(config)
  return shards.ShardSource(storage.path(config.data.shards) / split, info), info


def write_shards(config, output, num_shards: int, kinds=('train', 'val'), progress=None) -> dict:
  """Write the config's train / val samples (those `data.root` gives) as ArrayRecord
  shards under `output` (scripts/write_shards.py); returns {split: manifest}.
  `progress(split, total, n)` is called as samples are written."""
  config = with_dataset_defaults(config)
  d = config.data
  written = {}
  for kind in kinds:
    if kind not in ('train', 'val'):
      raise errors.ConfigError(f'shard splits: {kind!r}; expected train and/or val')
    split = d.train_split if kind == 'train' else d.val_split
    kwargs = source_kwargs(config, kind)
    source, info = dp.resolve_source(d.dataset, d.root, split, source_kwargs=kwargs or None)
    report = (lambda n, split=split, total=len(source): progress(split, total, n)) if progress else None
    written[split] = shards.write_split(source, info, output, split, min(num_shards, len(source)), report)
  return written


def with_dataset_defaults(config):
  """The config with model.num_classes taken from the dataset when unset
  (None); a mismatch between the two is a ConfigError."""
  n = dataset_info(config).num_classes
  have = config.model.get('num_classes')
  if have is None:
    config = copy.deepcopy(config)
    config.model.num_classes = n
  elif int(have) != n:
    raise errors.ConfigError(
      f'config.model.num_classes={have} but dataset {config.data.dataset!r} has {n} classes '
      "(leave model.num_classes unset to take the dataset's)"
    )
  return config


def transform_defaults(config) -> dict:
  """The data-config values transforms use unless their entry sets them."""
  d = config.data
  return {
    'img_scale': tuple(d.img_scale),
    'crop_size': tuple(d.crop_size),
    'ignore_index': dataset_info(config).ignore_index,
  }


class ShardedTrainIterator:
  """Concatenates the batches of several grain train iterators (one per shard)."""

  def __init__(self, iterators: list[grain.DatasetIterator]):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  # grain's orbax CheckpointHandler: bytes in, bytes out for non-DatasetIterators.
  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state: bytes):
    states = json.loads(state.decode())
    if len(states) != len(self.iterators):
      raise ValueError(
        f'checkpointed data iterator has {len(states)} shards, this run reads '
        f'{len(self.iterators)}; keep data.emulate_process_count / the process count unchanged'
      )
    for it, s in zip(self.iterators, states):
      it.set_state(s)

  def start_prefetch(self):
    # Not dead code: grain's orbax handler calls it right after `set_state` on restore.
    for it in self.iterators:
      if hasattr(it, 'start_prefetch'):
        it.start_prefetch()


def train_iterator(config) -> ShardedTrainIterator:
  """This process's share of the global training batches."""
  shards, count = shard_layout(config)
  local_batch = config.batch_size // count
  if local_batch * count != config.batch_size:
    raise errors.ConfigError(f'config.batch_size={config.batch_size} does not divide over {count} data shards')
  d = config.data
  kwargs = source_kwargs(config, 'train')
  source, info = sharded_source(config, d.train_split)
  its = []
  for s in shards:
    its.append(
      dp.make_train_iterator(
        d.dataset,
        root=d.root,
        split=d.train_split,
        pipeline=d.train_pipeline,
        crop_size=tuple(d.crop_size),
        img_scale=tuple(d.img_scale),
        batch_size=local_batch,
        seed=config.seed,
        num_workers=d.workers,
        num_classes=config.model.num_classes,
        shard_index=s,
        shard_count=count,
        worker_buffer=d.prefetch,
        source_kwargs=kwargs or None,
        source=source,
        info=info,
      )
    )
  return ShardedTrainIterator(its)


def eval_data(config) -> dp.EvalData:
  """This process's share of the validation set (every image once overall):
  mmseg's test resize to data.img_scale and padding to data.size_divisor,
  bucketed to at most data.eval_max_buckets shapes (0: mmseg's exact padding),
  the first data.eval_max_images images when that is set. Every evaluator
  reads this, so they all evaluate the same images with the same split."""
  d = config.data
  n_proc = jax.process_count()
  if config.eval_batch_size % n_proc:
    raise errors.ConfigError(f'config.eval_batch_size={config.eval_batch_size} does not divide over {n_proc} processes')
  kwargs = source_kwargs(config, 'val')
  source, info = sharded_source(config, d.val_split)
  source, info = dp.resolve_source(
    d.dataset, d.root, d.val_split, source, info, source_kwargs=kwargs or None, num_classes=config.model.num_classes
  )
  if d.get('eval_max_images'):
    source = _Head(source, d.eval_max_images)
  return dp.make_eval_dataset(
    d.dataset,
    img_scale=tuple(d.img_scale),
    batch_size=config.eval_batch_size // n_proc,
    size_divisor=d.size_divisor,
    max_buckets=d.eval_max_buckets or None,
    num_workers=0,
    source=source,
    info=info,
  )


class _Head:
  """The first n records of a source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(int(n), len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]

  def size(self, i):
    if hasattr(self.source, 'size'):
      return self.source.size(i)
    return self.source[i]['label'].shape[:2]

  def __repr__(self):
    return f'first {self.n} of {self.source!r}'
