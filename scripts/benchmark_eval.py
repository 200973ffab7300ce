"""Cost of the evaluation's confusion matrix: eval img/s with it and with the areas alone.

The bucketed evaluator's step (`cgrseg_jax.evaluation.bucketed`) counts a
(K+1, K+1) confusion matrix and a per-image mIoU for each image
(`metric.confusion_counts`). Before that it counted only the (4, K) areas of
the batch (`metric.area_counts`, mmseg's `intersect_and_union`). This script
times the same jitted step both ways, model forward included, at ADE20K's
shape (K=150, 512x683 images padded to 512x704), with random weights and inputs.
It also times the two counts alone, on fixed predictions.

    python scripts/benchmark_eval.py [--model=cgrseg_t] [--batch-size=4] [--reps=10] [--output=FILE.json]
    python scripts/benchmark_eval.py --model=cgrseg_tiny --size=64,96 --reps=2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.data.transforms import size_to_multiple
from cgrseg_jax.evaluation import bucketed, metric
from cgrseg_jax.models import build_model


def median_seconds(fn, args, warmup: int, reps: int) -> tuple[float, list[float]]:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return (statistics.median(times) if times else None), times


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='cgrseg_t')
  p.add_argument('--num-classes', type=int, default=150)
  p.add_argument('--size', default='512,683', help='image height,width')
  p.add_argument('--batch-size', type=int, default=4)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--output', help='write the JSON report here as well as to stdout')
  args = p.parse_args(argv)
  h, w = (int(v) for v in args.size.split(','))
  k, b, ignore = args.num_classes, args.batch_size, 255
  hp, wp = size_to_multiple((h, w), 32)

  model = build_model(args.model, k)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, hp, wp, 3)))
  rng = np.random.default_rng(0)
  label = rng.integers(0, k, (b, h, w)).astype(np.int32)
  label[:, :, : w // 10] = ignore
  batch = {
    'image': jnp.asarray(rng.integers(0, 256, (b, hp, wp, 3), dtype=np.uint8)),
    'valid_hw': jnp.asarray(np.tile([h, w], (b, 1)).astype(np.int32)),
    'orig_hw': jnp.asarray(np.tile([h, w], (b, 1)).astype(np.int32)),
    'label': jnp.asarray(label),
    'index': jnp.arange(b, dtype=jnp.int32),
  }
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  normalize = lambda img, hw: dp.normalize_image(img, hw)

  with_confusion = bucketed.make_eval_step(model, mesh, k, ignore, normalize)

  @jax.jit
  def areas_only(variables, batch):  # the step as it was: the batch's summed areas
    pred = bucketed.predict_batch(model, variables, batch, normalize)
    return metric.area_counts(pred, batch['label'], k, ignore)

  pred = jnp.asarray(rng.integers(0, k, (b, h, w)).astype(np.int32))
  counts = {
    'confusion': jax.jit(
      lambda p, l: (lambda c: (c.sum(0), metric.image_miou(metric.areas_from_confusion(c))))(
        metric.confusion_counts(p, l, k, ignore)
      )
    ),
    'areas': jax.jit(lambda p, l: metric.area_counts(p, l, k, ignore)),
  }
  report = {
    'model': args.model,
    'num_classes': k,
    'image_hw': [h, w],
    'padded_hw': [hp, wp],
    'batch_size': b,
    'device': jax.devices()[0].device_kind,
    'platform': platform.platform(),
    'step_s': {},
    'eval_img_per_s': {},
    'count_only_ms': {},
  }
  steps = {'areas_only': areas_only, 'with_confusion': with_confusion}
  times = {name: [] for name in steps}
  for name, fn in steps.items():
    median_seconds(fn, (variables, batch), args.warmup, 0)
  for _ in range(args.reps):  # alternated, so that a drift of the machine's speed hits both alike
    for name, fn in steps.items():
      times[name] += median_seconds(fn, (variables, batch), 0, 1)[1]
  for name, t in times.items():
    med = statistics.median(t)
    report['step_s'][name] = {'median': med, 'min': min(t), 'max': max(t)}
    report['eval_img_per_s'][name] = b / med
  for name, fn in counts.items():
    med, _ = median_seconds(fn, (pred, batch['label']), args.warmup, max(args.reps, 5))
    report['count_only_ms'][name] = 1e3 * med
  # Both steps count the same pixels: the matrix's areas are the areas.
  got = metric.areas_from_confusion(np.asarray(with_confusion(variables, batch)['confusion']))
  report['counts_agree'] = bool(np.array_equal(got, np.asarray(areas_only(variables, batch))))
  rates = report['eval_img_per_s']
  report['confusion_cost'] = 1 - rates['with_confusion'] / rates['areas_only']
  print(json.dumps(report, indent=2))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  main()
