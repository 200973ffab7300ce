"""Compile a config's train and eval steps for a TPU topology from this machine (no TPU needed).

  python scripts/aot_compile.py --config=configs/ade20k_t.py --topology=v5e:2x2
  python scripts/aot_compile.py --config=configs/ade20k_t.py --topology=v5e:4x4 --find-max-batch \\
      --precision=bfloat16 --output=aot_t.json
  python main.py --config=configs/ade20k_t.py --mode=compile --topology=v5e:2x2   # the training command, compiled

Prints per device (a chip, or a TensorCore on v4): argument, temp and output
memory against the HBM and whether the step fits, FLOPs and HBM bytes per step,
the roofline bounds and the img/s they imply per device and per slice, the
compile time; with --find-max-batch, the largest batch per device that fits
(one compile per try). Needs the `tpu` extra (libtpu). How it works: cgrseg_jax/aot.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the host runs nothing; the TPU is only compiled for

from cgrseg_jax import aot, config_files, errors  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='config file (file.py or file.py:arg)')
  p.add_argument(
    '--topology', required=True, help='TPU slice as JAX names it: v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:4x4'
  )
  p.add_argument('--mode', default='both', choices=['train', 'eval', 'both'], help='which steps to compile')
  p.add_argument(
    '--per-chip-batch',
    type=int,
    default=None,
    help='batch per device (default: config.batch_size / devices for train, 1 for eval)',
  )
  p.add_argument('--find-max-batch', action='store_true', help='search the largest batch per device that fits')
  p.add_argument('--precision', default=None, choices=['float32', 'bfloat16'], help='overrides config.precision')
  p.add_argument('--model', default=None, help='overrides config.model.name (e.g. cgrseg_b)')
  p.add_argument('--eval-hw', default=None, help='H,W of the eval step (default: the crop size)')
  p.add_argument('--output', default=None, help='write the report as JSON here')
  args = p.parse_args(argv)
  try:
    config = config_files.load(args.config)
    if args.precision:
      config.precision = args.precision
    if args.model:
      config.model.name = args.model
    eval_hw = tuple(int(v) for v in args.eval_hw.split(',')) if args.eval_hw else None
    steps = ('train', 'eval') if args.mode == 'both' else (args.mode,)
    report = aot.run(config, args.topology, steps, args.per_chip_batch, args.find_max_batch, eval_hw)
  except errors.UserError as e:
    print(f'aot_compile.py: {e}', file=sys.stderr)
    return 2
  print(aot.format_report(report))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
