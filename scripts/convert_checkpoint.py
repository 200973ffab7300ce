#!/usr/bin/env python3
"""Convert CGRSeg checkpoints between PyTorch (mmseg) and Flax (orbax).

  # upstream CGRSeg .pth -> orbax directory (variant and classes read from the shapes)
  python scripts/convert_checkpoint.py cgrseg_t.pth converted/cgrseg_t
  # orbax directory (converted or trained here) -> upstream-layout .pth for mmseg users
  python scripts/convert_checkpoint.py --to-torch converted/cgrseg_t cgrseg_t_back.pth
  # EfficientFormerV2 ImageNet checkpoint: only check it and print what is used/skipped
  python scripts/convert_checkpoint.py --backbone eformer_s1_450.pth

Training reads an ImageNet .pth directly (`--config.init=eformer_s1_450.pth`), and
a converted directory with `--config.init=converted/cgrseg_t`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('source', help='a .pth file, or with --to-torch an orbax directory')
  ap.add_argument('target', nargs='?', help='output directory (orbax) or .pth file (--to-torch)')
  ap.add_argument('--variant', default=None, help='t, b or l; an error if the checkpoint is another')
  ap.add_argument('--num-classes', type=int, default=None)
  ap.add_argument('--to-torch', action='store_true', help='orbax directory -> .pth')
  ap.add_argument('--backbone', action='store_true', help='source is an EfficientFormerV2 ImageNet checkpoint')
  args = ap.parse_args(argv)

  from cgrseg_jax import convert

  try:
    if args.to_torch:
      if not args.target:
        ap.error('--to-torch needs a target .pth path')
      variables, meta = convert.load_variables(args.source)
      convert.save_torch_checkpoint(args.target, variables, meta=dict(meta, converted_from=args.source))
      print(f'wrote {args.target} (CGRSeg-{meta["variant"].upper()}, {meta["num_classes"]} classes)')
    elif args.backbone:
      _, report = convert.load_backbone_checkpoint(args.source, args.variant, return_report=True, verbose=True)
    else:
      if not args.target:
        ap.error('a target directory is needed')
      variables, report = convert.load_torch_checkpoint(
        args.source, args.variant, args.num_classes, return_report=True, verbose=True
      )
      convert.save_variables(args.target, variables, report.variant, report.num_classes, source=args.source)
      print(f'wrote {args.target}')
  except (convert.ConversionError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
