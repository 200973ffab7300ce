"""Throughput of the ADE20K training input pipeline.

Writes synthetic 512x683 scenes in the ADEChallengeData2016 layout (JPEG
images, PNG labels) to a temporary directory, then measures images/s of
``make_train_iterator("ade20k", ...)`` (decode, reduce_zero_label, then the
default data.train_pipeline: random resize, cat_max_ratio crop, flip,
photometric distortion, pad; batch) with 1
and 2 grain worker processes, plus a bare single-process loop of the same
steps for reference.

    python scripts/benchmark_data.py [--output=FILE.json] [--num-images=N]
    python scripts/benchmark_data.py --num-images=8 --seconds=1 --workers=0   # smoke run
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
from cgrseg_jax.data import sources, transforms
from cgrseg_jax.data.synthetic import SyntheticSegmentation


def measure_pipeline(root: str, workers: int, batch_size: int, seconds: float, warmup_batches: int) -> float:
  it = dp.make_train_iterator('ade20k', root=root, batch_size=batch_size, seed=0, num_workers=workers)
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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--output', help='write the JSON report here as well as to stdout')
  p.add_argument('--num-images', type=int, default=128)
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seconds', type=float, default=15.0, help='measuring time per configuration')
  p.add_argument('--workers', default='1,2', help='comma-separated worker counts')
  args = p.parse_args()

  with tempfile.TemporaryDirectory(prefix='cgrseg_bench_') as tmp:
    root = os.path.join(tmp, 'ADEChallengeData2016')
    syn = SyntheticSegmentation(num_samples=args.num_images, num_classes=150, image_size=(512, 683), seed=0)
    t0 = time.perf_counter()
    syn.write_ade20k_layout(root, split_dir='training', image_suffix='.jpg', jpeg_quality=90)
    write_s = time.perf_counter() - t0

    rates = {}
    for w in [int(x) for x in args.workers.split(',')]:
      rates[str(w)] = round(measure_pipeline(root, w, args.batch_size, args.seconds, warmup_batches=2 * max(w, 1)), 1)
      print(f'workers={w}: {rates[str(w)]} img/s', file=sys.stderr)
    cv2.setNumThreads(1)
    bare = round(measure_bare_loop(root, args.seconds), 1)
    print(f'bare loop, 1 process, 1 OpenCV thread: {bare} img/s', file=sys.stderr)

  report = {
    'img_per_s': rates,
    'bare_single_process_loop_img_per_s': bare,
    'image_size_hw': [512, 683],
    'crop_size': [512, 512],
    'batch_size': args.batch_size,
    'num_images': args.num_images,
    'seconds_per_config': args.seconds,
    'write_dataset_s': round(write_s, 1),
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
