"""Convert an official dataset release to the layout training reads
(cgrseg_jax/data/datasets.py), as mmseg's tools/convert_datasets do; prints
a summary (images, labels, label-id histogram).

  python scripts/convert_dataset.py coco_stuff10k data/coco_stuff10k
  python scripts/convert_dataset.py coco_stuff164k data/coco_stuff164k
  python scripts/convert_dataset.py pascal_context59 data/VOCdevkit data/VOCdevkit/trainval_merged.json
  python scripts/convert_dataset.py cityscapes data/cityscapes

ADE20K (ADEChallengeData2016) and CamVid (SegNet layout) need no conversion.
"""

import argparse
import sys

from cgrseg_jax import errors
from cgrseg_jax.data import converters


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='dataset', required=True)
  c = sub.add_parser('coco_stuff10k', help='cocostuff-10k-v1.1 .mat annotations -> *_labelTrainIds.png (182 -> 171)')
  c.add_argument('src', help='the unzipped cocostuff-10k-v1.1 (imageLists/, images/, annotations/)')
  c.add_argument('-o', '--out', help='output root (default: src)')
  c.add_argument('--move', action='store_true', help='move the images instead of copying them')
  c = sub.add_parser('coco_stuff164k', help='stuffthingmaps PNGs -> *_labelTrainIds.png')
  c.add_argument('root', help='root with images/{train2017,val2017} and annotations/{train2017,val2017}')
  c = sub.add_parser('pascal_context59', help='trainval_merged.json (or the .mat release) -> 59-class PNGs + splits')
  c.add_argument('devkit', help='the VOCdevkit directory (holding VOC2010/)')
  c.add_argument('annotations', help='trainval_merged.json, or the directory of the .mat release (trainval/)')
  c.add_argument('-o', '--out', help='output root (default: devkit/VOC2010)')
  c = sub.add_parser('cityscapes', help='gtFine *_polygons.json -> *_gtFine_labelTrainIds.png')
  c.add_argument('root', help='root with leftImg8bit/ and gtFine/')
  args = p.parse_args(argv)
  try:
    if args.dataset == 'coco_stuff10k':
      summary = converters.convert_coco_stuff10k(args.src, args.out, move=args.move)
    elif args.dataset == 'coco_stuff164k':
      summary = converters.convert_coco_stuff164k(args.root)
    elif args.dataset == 'pascal_context59':
      summary = converters.convert_pascal_context59(args.devkit, args.annotations, args.out)
    else:
      summary = converters.convert_cityscapes(args.root)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
