"""grain train / eval input pipelines, global batch assembly, on-device
normalisation and iterator checkpointing.

What the training code calls::

    from cgrseg_jax.data import pipeline as dp

    train_it = dp.make_train_iterator(
        "ade20k", root=".../ADEChallengeData2016", batch_size=8, seed=0,
        num_workers=2)                # or "synthetic" with root=None
    local = next(train_it)            # numpy, this process's share
    batch = dp.make_global_batch(local, mesh)        # jax.Arrays on 'data'
    # inside the jitted step:
    x = dp.normalize_image(batch["image"], batch["valid_hw"])  # f32 RGB
    y = batch["label"].astype(jnp.int32)             # 255 = ignore

    ev = dp.make_eval_dataset("ade20k", root=..., batch_size=1)
    for local in ev: ...              # every val sample once over processes

    # the iterator is checkpointed next to the model state with
    # grain.checkpoint.CheckpointSave / CheckpointRestore (checkpointing.py)

Train batches (process-local): ``image`` uint8 ``(B, H, W, 3)`` **BGR**
(as decoded and augmented, mmseg order), ``label`` uint8 ``(B, H, W)``
(255 = ignore, includes the padding), ``valid_hw`` int32 ``(B, 2)`` (the
crop size before padding), ``index`` int32 ``(B,)`` (source index).
Images stay uint8 on the host: normalising on the device moves and
touches 4x fewer bytes. ``normalize_image`` zeroes the pixels outside
``valid_hw`` after normalising, which is exactly mmseg's normalise-then-pad
with 0.

Train order: source -> shuffle(seed, reshuffled every epoch) -> shard by
process (``[p::n]`` of each epoch's permutation, the last ``N % n`` samples of
an epoch dropped so all processes take the same number of steps) -> repeat
-> load/decode -> the dataset's reduce_zero_label and the configured transform
list (``pipeline=``, default ``transforms.DEFAULT_TRAIN_PIPELINE``; random ones
seeded by ``(seed, process)``, their position and the element position) -> batch(drop_remainder) -> multiprocess prefetch.
The result is a checkpointable grain ``DatasetIterator``: restoring its
state replays exactly the samples and random draws of an uninterrupted run.

Eval batches: ``image`` uint8 ``(B, Hb, Wb, 3)`` BGR, the test-time resized
image padded with 0 to its bucket shape; ``valid_hw`` int32 ``(B, 2)`` the
resized size; ``label`` uint8 ``(B, Hl, Wl)`` the *original-size* label
(reduce_zero_label applied) padded with 255 to its label bucket;
``orig_hw`` int32 ``(B, 2)``; ``index`` int32 ``(B,)``, -1 for the filler
entries that complete a last batch (their label is all 255, so they count
for nothing). mmseg post-processing then reads: logits resized to the padded
input shape, cropped to ``valid_hw``, resized to ``orig_hw``. Buckets: the
resized size padded to a multiple of 32 (mmseg) and then, to bound the number
of shapes the eval step compiles for, rounded up to coarser multiples until at
most ``max_buckets`` (image, label) shape pairs remain; ``max_buckets=None``
keeps mmseg's exact multiple-of-32 padding (one compile per distinct shape).
Extra zero padding is not neutral for models with global operations, so
``None`` is the choice for exact parity with upstream numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import cv2
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cgrseg_jax.platforms import target_platform

from . import buckets, datasets
from . import sources as sources_lib
from . import transforms as T

log = logging.getLogger(__name__)


# ------------------------------------------------------- source handling


class CheckedSource:
  """Wraps a source; with ``skip_bad_samples`` a ``DataError`` becomes a
  logged, counted ``None`` (dropped by grain) instead of an exception.

  ``skipped`` counts in the process that reads (with worker processes each
  worker has its own count; the log lines name every skipped file).
  """

  def __init__(self, source, skip_bad_samples: bool = False):
    self.source = source
    self.skip_bad_samples = skip_bad_samples
    self.skipped = 0

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f'CheckedSource({self.source!r}, skip_bad_samples={self.skip_bad_samples})'

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    try:
      return self.source[index]
    except sources_lib.DataError as e:
      if not self.skip_bad_samples:
        raise
      self.skipped += 1
      log.warning('skipping bad sample %d (%d skipped so far in this process): %s', index, self.skipped, e)
      return None


def resolve_source(
  dataset: str, root: str | None, split: str, source=None, info=None, source_kwargs=None, num_classes=None
):
  """``(source, info)`` from a name, or pass-through of a given source."""
  if source is None:
    kwargs = dict(source_kwargs or {})
    if dataset.lower() == 'synthetic' and num_classes is not None:
      kwargs.setdefault('num_classes', num_classes)
    source, info = sources_lib.make_source(dataset, root, split, **kwargs)
  elif info is None:
    name = dataset.lower()
    if name not in datasets.DATASETS:
      raise ValueError(f'pass info= (a DatasetInfo) with a source of unknown dataset {dataset!r}')
    info = datasets.DATASETS[name]
  if num_classes is not None and num_classes != info.num_classes:
    raise ValueError(f'num_classes={num_classes} but dataset {info.name!r} has {info.num_classes} classes')
  if len(source) == 0:
    raise ValueError(f'{source!r} is empty')
  return source, info


def _op_seed(seed: int, stream: int, op: int) -> int:
  # A 32-bit seed per (user seed, stream, transform position); negative
  # user seeds are folded into the unsigned range.
  entropy = (int(seed) % (1 << 64), int(stream), int(op))
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _process_shard(shard_index, shard_count) -> tuple[int, int]:
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  return int(shard_index), int(shard_count)


def _worker_init(worker_index: int, worker_count: int) -> None:
  # One OpenCV thread per worker process: the workers are the parallelism.
  del worker_index, worker_count
  cv2.setNumThreads(1)


def _prefetch(ds: grain.IterDataset, num_workers: int, buffer: int) -> grain.IterDataset:
  if num_workers > 0:
    # grain's worker processes read absl flags; outside an absl app they
    # are unparsed and reading them raises, so accept the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer),
      worker_init_fn=_worker_init,
    )
  return ds


@dataclasses.dataclass(frozen=True)
class _Pick(grain.transforms.Map):
  keys: tuple[str, ...]

  def map(self, element):
    out = {k: element[k] for k in self.keys}
    out['index'] = np.int32(out['index'])
    return out


# ------------------------------------------------------------------ train


def make_train_dataset(
  dataset: str = 'synthetic',
  root: str | None = None,
  split: str = 'train',
  *,
  pipeline: Sequence | None = None,
  crop_size: Sequence[int] | None = None,
  img_scale: Sequence[int] | None = None,
  batch_size: int = 8,
  seed: int = 0,
  num_workers: int = 0,
  num_classes: int | None = None,
  num_epochs: int | None = None,
  skip_bad_samples: bool = False,
  shard_index: int | None = None,
  shard_count: int | None = None,
  read_threads: int | None = None,
  worker_buffer: int = 2,
  source=None,
  info: datasets.DatasetInfo | None = None,
  source_kwargs: Mapping[str, Any] | None = None,
  **default_pipeline_options,
) -> grain.IterDataset:
  """The mmseg training pipeline as a grain ``IterDataset`` of batches.

  Args:
    dataset, root, split: see ``sources.make_source`` (``source``/``info``
      may be given instead; ``source_kwargs`` go to the builder).
    pipeline: the transforms after loading, as config entries
      ``('Name', {kwargs})`` (``transforms.build_pipeline``); default
      ``transforms.DEFAULT_TRAIN_PIPELINE`` (mmseg's ADE20K pipeline), whose
      options ``ratio_range``, ``cat_max_ratio``, ``flip_prob`` and
      ``photometric`` may be passed as keywords. The dataset's
      ``reduce_zero_label`` is prepended, as mmseg's ``LoadAnnotations`` does.
    crop_size, img_scale: what transforms use unless their entry sets it;
      default to the dataset's mmseg recipe.
    batch_size: per process.
    seed: shuffling and augmentation seed.
    num_workers: grain worker processes (0 = read in this process with
      ``read_threads`` threads).
    num_epochs: ``None`` repeats forever.
    shard_index, shard_count: default to ``jax.process_index()`` and
      ``jax.process_count()``.
  """
  source, info = resolve_source(dataset, root, split, source, info, source_kwargs, num_classes)
  if pipeline is None:
    pipeline = T.default_train_pipeline(**default_pipeline_options)
  elif default_pipeline_options:
    raise TypeError(f'{sorted(default_pipeline_options)} only adjust the default pipeline; set them in pipeline=')
  data = {
    'crop_size': tuple(crop_size or info.crop_size),
    'img_scale': tuple(img_scale or info.img_scale),
    'ignore_index': info.ignore_index,
  }
  ops = ([T.ReduceZeroLabel()] if info.reduce_zero_label else []) + T.build_pipeline(pipeline, data)
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  n = len(source)
  per_shard = n // shard_count
  if per_shard < batch_size:
    raise ValueError(
      f'{n} samples over {shard_count} processes leave {per_shard} per process, fewer than the batch size {batch_size}'
    )
  ds = grain.MapDataset.source(CheckedSource(source, skip_bad_samples))
  ds = ds.shuffle(seed=_op_seed(seed, 0, 0))  # stream 0: same permutation on every process
  ds = ds[: per_shard * shard_count][shard_index::shard_count]
  ds = ds.repeat(num_epochs)
  for k, op in enumerate(ops):
    if isinstance(op, grain.transforms.RandomMap):
      ds = ds.random_map(op, seed=_op_seed(seed, shard_index + 1, k + 1))
    else:
      ds = ds.map(op)
  ds = ds.map(_Pick(('image', 'label', 'valid_hw', 'index')))
  if read_threads is None:
    read_threads = 1 if num_workers > 0 else 4
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, read_threads))
  )
  it = it.batch(batch_size, drop_remainder=True)
  return _prefetch(it, num_workers, worker_buffer)


def make_train_iterator(*args, **kwargs) -> grain.DatasetIterator:
  """``iter(make_train_dataset(...))``: a checkpointable batch iterator."""
  return iter(make_train_dataset(*args, **kwargs))


# ------------------------------------------------------------------- eval


def _source_size(source, index: int) -> tuple[int, int]:
  if hasattr(source, 'size'):
    return tuple(int(v) for v in source.size(index))
  return tuple(int(v) for v in source[index]['label'].shape[:2])


@dataclasses.dataclass(frozen=True)
class _LoadEvalBatch(grain.transforms.Map):
  source: Any
  img_scale: tuple[int, int]
  reduce_zero_label: bool
  ignore_index: int
  skip_bad_samples: bool

  def _one(self, index: int, img_bucket, lbl_bucket) -> dict[str, np.ndarray]:
    empty = {
      'image': np.zeros((*img_bucket, 3), np.uint8),
      'valid_hw': np.zeros(2, np.int32),
      'label': np.full(lbl_bucket, self.ignore_index, np.uint8),
      'orig_hw': np.zeros(2, np.int32),
      'index': np.int32(-1),
    }
    if index < 0:
      return empty
    try:
      rec = self.source[index]
      label = rec['label']
      if self.reduce_zero_label:
        label = T.reduce_zero_label(label)
      el = {'image': T.resize_image(rec['image'], self.img_scale)}
      h, w = el['image'].shape[:2]
      oh, ow = label.shape
      if h > img_bucket[0] or w > img_bucket[1] or oh > lbl_bucket[0] or ow > lbl_bucket[1]:
        raise sources_lib.DataError(
          f'sample {index}', f'size {(oh, ow)} does not match the size planned from its header'
        )
    except sources_lib.DataError as e:
      if not self.skip_bad_samples:
        raise
      log.warning('skipping bad eval sample %d: %s', index, e)
      return empty
    el = T.pad_to_shape(el, img_bucket, pad_label=False)
    return {
      'image': el['image'],
      'valid_hw': np.array([h, w], np.int32),
      'label': cv2.copyMakeBorder(
        label, 0, lbl_bucket[0] - oh, 0, lbl_bucket[1] - ow, cv2.BORDER_CONSTANT, value=self.ignore_index
      ),
      'orig_hw': np.array([oh, ow], np.int32),
      'index': np.int32(index),
    }

  def map(self, plan):
    (img_bucket, lbl_bucket), indices = plan
    items = [self._one(int(i), img_bucket, lbl_bucket) for i in indices]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


@dataclasses.dataclass
class EvalData:
  """A finite, re-iterable eval loader for this process.

  ``dataset`` yields the batches; ``num_batches`` is the same on every
  process (they step in lockstep for global batches); ``shapes`` lists the
  (image, label) bucket shapes that occur. ``source`` and ``indices`` (this
  process's images, in batch order) serve evaluators that read the records
  themselves (TTA / slide), so that every evaluator splits the images alike.
  """

  dataset: grain.IterDataset
  num_batches: int
  shapes: list[tuple[tuple[int, int], tuple[int, int]]]
  info: datasets.DatasetInfo
  num_samples: int
  source: Any
  indices: list[int]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self.dataset)

  def __len__(self) -> int:
    return self.num_batches


def make_eval_dataset(
  dataset: str = 'synthetic',
  root: str | None = None,
  split: str = 'val',
  *,
  img_scale: Sequence[int] | None = None,
  batch_size: int = 1,
  size_divisor: int = 32,
  max_buckets: int | None = 8,
  num_workers: int = 0,
  num_classes: int | None = None,
  skip_bad_samples: bool = False,
  shard_index: int | None = None,
  shard_count: int | None = None,
  read_threads: int | None = None,
  source=None,
  info: datasets.DatasetInfo | None = None,
  source_kwargs: Mapping[str, Any] | None = None,
) -> EvalData:
  """mmseg test pipeline (keep-ratio Resize, pad) with shape buckets.

  Every sample appears exactly once over all processes; batches are grouped
  by bucket, and the last batch of a bucket is completed with filler
  entries (``index == -1``).
  """
  source, info = resolve_source(dataset, root, split, source, info, source_kwargs, num_classes)
  img_scale = tuple(img_scale or info.img_scale)
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  sizes = [_source_size(source, i) for i in range(len(source))]
  keys = buckets.plan_buckets(sizes, img_scale, size_divisor=size_divisor, max_buckets=max_buckets)
  plans = buckets.plan_eval_batches(keys, batch_size, shard_index, shard_count)
  loader = _LoadEvalBatch(source, img_scale, info.reduce_zero_label, info.ignore_index, skip_bad_samples)
  ds = grain.MapDataset.source(plans).map(loader)
  if read_threads is None:
    read_threads = 1 if num_workers > 0 else 4
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads)))
  it = _prefetch(it, num_workers, 2)
  mine = [i for _, indices in plans for i in indices if i >= 0]
  return EvalData(it, len(plans), sorted(set(keys)), info, len(source), source, mine)


# --------------------------------------------------- device-side helpers


def make_global_batch(
  local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, axis: str = 'data'
) -> dict[str, jax.Array]:
  """Assemble process-local numpy arrays into global ``jax.Array``s whose
  leading (batch) dimension is sharded over the mesh axis ``axis``."""
  if axis not in mesh.shape:
    raise ValueError(f'mesh has axes {tuple(mesh.shape)}, no {axis!r} axis to shard the batch over')
  n_proc = jax.process_count()
  n_dev = mesh.shape[axis]
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f'batch entry {key!r} is a scalar; every entry needs a leading batch dimension')
    global_shape = (value.shape[0] * n_proc,) + value.shape[1:]
    if global_shape[0] % n_dev:
      raise ValueError(
        f'global batch size {global_shape[0]} (batch entry {key!r}: {value.shape[0]} per process x '
        f'{n_proc} processes) does not divide over the {n_dev} devices of mesh axis {axis!r}; '
        f'use a per-process batch size that makes it a multiple of {n_dev}'
      )
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def normalize_image(
  image: jax.Array,
  valid_hw: jax.Array | None = None,
  *,
  mean: Sequence[float] = T.MEAN_RGB,
  std: Sequence[float] = T.STD_RGB,
  bgr_to_rgb: bool = True,
  dtype=jnp.float32,
  platform: str | None = None,
) -> jax.Array:
  """uint8 ``(B, H, W, 3)`` -> normalised RGB, bit-identical to mmcv
  ``imnormalize`` (``mean``/``std`` are RGB): a lookup in the 256-entry
  per-channel table of ``transforms.normalize_table``.

  The lookup's form follows ``platform`` (``platforms.target_platform``): a
  gather on the CPU; elsewhere a compare-and-select summed over the 256 values,
  since a TPU gather of one element per pixel moves ~1e5 bytes per pixel
  (``cost_analysis`` of the AOT step) while the sum stays in one fused loop.
  Both are exact: the sum adds one table entry to zeros.

  With ``valid_hw`` ``(B, 2)``, pixels at rows >= h or columns >= w (the
  right/bottom padding) are exactly 0, as in mmseg where padding follows
  normalisation. Pass ``bgr_to_rgb=False`` for RGB input.
  """
  if bgr_to_rgb:
    image = image[..., ::-1]
  table = T.normalize_table(mean, std)  # (256, C), built on the host at trace time
  channels = table.shape[1]
  if target_platform(platform) == 'cpu':
    flat = jnp.asarray(table.T.reshape(-1))  # channel c, value v at c * 256 + v
    index = image.astype(jnp.int32) + jnp.arange(channels, dtype=jnp.int32) * 256
    x = jnp.take(flat, index)
  else:
    hit = image.astype(jnp.int32)[..., None] == jnp.arange(256, dtype=jnp.int32)
    x = jnp.sum(jnp.where(hit, jnp.asarray(table.T), 0.0), axis=-1)
  if valid_hw is not None:
    h, w = x.shape[-3], x.shape[-2]
    vh = valid_hw[..., 0][..., None, None]
    vw = valid_hw[..., 1][..., None, None]
    inside = (jnp.arange(h)[:, None] < vh) & (jnp.arange(w)[None, :] < vw)
    x = jnp.where(inside[..., None], x, 0.0)
  return x.astype(dtype)


__all__ = [
  'CheckedSource',
  'EvalData',
  'make_train_dataset',
  'make_train_iterator',
  'make_eval_dataset',
  'make_global_batch',
  'normalize_image',
]
