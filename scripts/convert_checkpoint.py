#!/usr/bin/env python3
"""Convert checkpoints of any registered model between PyTorch (mmseg) and Flax (orbax).

  # upstream .pth -> converted directory (model and classes read from the shapes)
  python scripts/convert_checkpoint.py cgrseg_t.pth converted/cgrseg_t
  # any checkpoint (converted directory, training workdir, step dir) -> upstream-layout .pth
  python scripts/convert_checkpoint.py --to-torch converted/cgrseg_t cgrseg_t_back.pth
  python scripts/convert_checkpoint.py --to-torch runs/synthetic_t trained.pth
  # ImageNet backbone checkpoint: check it and print what is used/skipped
  python scripts/convert_checkpoint.py --backbone eformer_s1_450.pth --model cgrseg_t

Everything `cgrseg_jax.loader` reads is accepted as a source; training reads the
same formats directly (`--config.init=eformer_s1_450.pth`, `--config.init=converted/cgrseg_t`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('source', help='a .pth file, a converted directory, a training workdir or a step dir')
  ap.add_argument('target', nargs='?', help='output directory (orbax) or .pth file (--to-torch)')
  ap.add_argument('--model', default=None, help='a registered model name (e.g. cgrseg_t); checked against the weights')
  ap.add_argument('--variant', default=None, help='short form of --model within its family (t for cgrseg_t)')
  ap.add_argument('--num-classes', type=int, default=None)
  ap.add_argument('--to-torch', action='store_true', help='write an upstream-layout .pth')
  ap.add_argument('--backbone', action='store_true', help='source is an ImageNet backbone checkpoint')
  args = ap.parse_args(argv)

  from cgrseg_jax import convert, errors, loader

  try:
    if args.backbone:
      loaded = loader.load(args.source, model=args.model, variant=args.variant, kinds=('backbone',))
      print(f'{loaded.describe()}\n{loaded.report.summary()}')
      return 0
    if not args.target:
      ap.error('a target is needed (a directory, or a .pth file with --to-torch)')
    loaded = loader.load(args.source, model=args.model, variant=args.variant, num_classes=args.num_classes)
    if loaded.kind == 'backbone':
      raise loader.LoadError(f'{args.source} is an ImageNet backbone checkpoint; use --backbone to check it')
    if loaded.report is not None:
      print(loaded.report.summary())
    if args.to_torch:
      meta = dict(converted_from=args.source, num_classes=loaded.num_classes)
      convert.save_torch_checkpoint(args.target, loaded.variables, loaded.model, meta=meta)
    else:
      loader.save_converted(args.target, loaded.variables, loaded.model, loaded.num_classes, source=args.source)
    print(f'wrote {args.target} ({loaded.model}, {loaded.num_classes} classes, from a {loaded.kind} checkpoint)')
  except (errors.UserError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
