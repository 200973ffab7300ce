"""Throughput of the ADE20K training input pipeline, from folders and from ArrayRecord shards.

Writes synthetic 512x683 scenes in the ADEChallengeData2016 layout (JPEG
images, PNG labels) to a temporary directory, writes the same split as
ArrayRecord shards (what scripts/write_shards.py writes; the records hold the
same JPEG and PNG bytes), then measures images/s of
``make_train_iterator("ade20k", ...)`` (decode, reduce_zero_label, then the
default data.train_pipeline: random resize, cat_max_ratio crop, flip,
photometric distortion, pad; batch) on each input with 1 and 2 grain worker
processes, plus a bare single-process loop of the same steps on the folders
for reference.

    python scripts/benchmark_data.py [--output=FILE.json] [--num-images=N]
    python scripts/benchmark_data.py --num-images=8 --seconds=1 --workers=0 --inputs=shards   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import cv2
import numpy as np

from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.data import datasets, shards, sources, transforms
from cgrseg_jax.data.synthetic import SyntheticSegmentation


def measure_pipeline(
  root: str, workers: int, batch_size: int, seconds: float, warmup_batches: int, source=None
) -> float:
  """img/s of the training iterator on the folders under `root`, or on `source` (shards) when given."""
  info = datasets.get('ade20k') if source is not None else None
  it = dp.make_train_iterator(
    'ade20k', root=root, batch_size=batch_size, seed=0, num_workers=workers, source=source, info=info
  )
  for _ in range(warmup_batches):  # worker start-up and first reads
    next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    n += batch['image'].shape[0]
  rate = n / (time.perf_counter() - start)
  del it
  return rate


def measure_bare_loop(root: str, seconds: float) -> float:
  """The same steps in a plain loop: no grain, one process."""
  src, info = sources.make_source('ade20k', root, 'train')
  data = {'img_scale': info.img_scale, 'crop_size': info.crop_size, 'ignore_index': info.ignore_index}
  ops = [transforms.ReduceZeroLabel()] + transforms.build_pipeline(transforms.DEFAULT_TRAIN_PIPELINE, data)
  rng = np.random.default_rng(0)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    el = src[n % len(src)]
    for op in ops:
      el = op.random_map(el, rng) if hasattr(op, 'random_map') else op.map(el)
    n += 1
  return n / (time.perf_counter() - start)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--output', help='write the JSON report here as well as to stdout')
  p.add_argument('--num-images', type=int, default=128)
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seconds', type=float, default=15.0, help='measuring time per configuration')
  p.add_argument('--workers', default='1,2', help='comma-separated worker counts')
  p.add_argument('--inputs', default='folders,shards', help='comma-separated: folders, shards')
  p.add_argument('--num-shards', type=int, default=4)
  args = p.parse_args(argv)
  inputs = args.inputs.split(',')
  if set(inputs) - {'folders', 'shards'}:
    p.error(f'--inputs={args.inputs}: expected a comma-separated list of folders, shards')

  with tempfile.TemporaryDirectory(prefix='cgrseg_bench_') as tmp:
    root = os.path.join(tmp, 'ADEChallengeData2016')
    syn = SyntheticSegmentation(num_samples=args.num_images, num_classes=150, image_size=(512, 683), seed=0)
    t0 = time.perf_counter()
    syn.write_ade20k_layout(root, split_dir='training', image_suffix='.jpg', jpeg_quality=90)
    write_s = time.perf_counter() - t0

    shard_source, shard_write_s = None, None
    if 'shards' in inputs:
      info = datasets.get('ade20k')
      folder_source, _ = sources.make_source('ade20k', root, 'train')
      t0 = time.perf_counter()
      shards.write_split(folder_source, info, os.path.join(tmp, 'shards'), 'train', args.num_shards)
      shard_write_s = time.perf_counter() - t0
      shard_source = shards.ShardSource(os.path.join(tmp, 'shards', 'train'), info)

    rates = {name: {} for name in inputs}
    for name in inputs:
      for w in [int(x) for x in args.workers.split(',')]:
        src = shard_source if name == 'shards' else None
        rate = measure_pipeline(root, w, args.batch_size, args.seconds, warmup_batches=2 * max(w, 1), source=src)
        rates[name][str(w)] = round(rate, 1)
        print(f'{name}, workers={w}: {rates[name][str(w)]} img/s', file=sys.stderr)
    cv2.setNumThreads(1)
    bare = round(measure_bare_loop(root, args.seconds), 1)
    print(f'bare loop, 1 process, 1 OpenCV thread: {bare} img/s', file=sys.stderr)

  ratio = None
  if len(inputs) == 2:
    ratio = {w: round(rates['shards'][w] / rates['folders'][w], 3) for w in rates['folders']}
  report = {
    'img_per_s': rates,
    'shards_over_folders': ratio,
    'bare_single_process_loop_img_per_s': bare,
    'image_size_hw': [512, 683],
    'crop_size': [512, 512],
    'batch_size': args.batch_size,
    'num_images': args.num_images,
    'seconds_per_config': args.seconds,
    'write_dataset_s': round(write_s, 1),
    'num_shards': args.num_shards if 'shards' in inputs else None,
    'write_shards_s': None if shard_write_s is None else round(shard_write_s, 1),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'opencv': cv2.__version__,
  }
  text = json.dumps(report, indent=2)
  print(text)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
