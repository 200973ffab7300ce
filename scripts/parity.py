#!/usr/bin/env python3
"""Run an upstream PyTorch checkpoint of a registered model through the project's
PyTorch reference (`ModelFamily.torch_reference`) and the Flax model side by
side and print the error of every stage.

  python scripts/parity.py --checkpoint cgrseg_t.pth [--image photo.jpg] [--size 480,640]

Without --image the input is random normal noise (already "normalised"); with an
image it is resized to --size (default: short side 512 and both sides rounded to
a multiple of 32), converted to RGB and normalised with the ImageNet mean/std.
The PyTorch references live in cgrseg_jax/torch_reference/ (pure PyTorch,
upstream key layout), so this needs the `torch` extra (`pip install -e .[torch]`).
"""

from __future__ import annotations

import argparse
import json
import sys

import cv2
import jax
import numpy as np
import torch

from cgrseg_jax import loader, torch_files
from cgrseg_jax.data.transforms import MEAN_RGB, STD_RGB
from cgrseg_jax.models import build_model, family_of


def parse_size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'--size expects H,W (e.g. 480,640), got {text!r}') from None
  if h % 32 or w % 32:
    raise argparse.ArgumentTypeError(f'--size {h},{w}: both sides must be multiples of 32')
  return h, w


def load_input(args) -> np.ndarray:
  """(1, H, W, 3) float32 NHWC."""
  if args.image is None:
    h, w = args.size or (512, 512)
    return np.random.default_rng(args.seed).standard_normal((1, h, w, 3)).astype(np.float32)
  img = cv2.imread(args.image, cv2.IMREAD_COLOR)
  if img is None:
    sys.exit(f'error: cannot read image {args.image!r}')
  if args.size:
    h, w = args.size
  else:
    f = 512 / min(img.shape[:2])
    h, w = (max(32, int(round(s * f / 32)) * 32) for s in img.shape[:2])
  img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)[..., ::-1].astype(np.float32)
  return ((img - np.float32(MEAN_RGB)) / np.float32(STD_RGB))[None]


def errors(name, ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    return dict(name=name, error=f'shape {ours.shape} != reference {ref.shape}')
  diff = np.abs(ours - ref)
  return dict(
    name=name,
    max_abs=float(diff.max()),
    max_rel=float(diff.max() / max(np.abs(ref).max(), 1e-12)),
    mean_abs=float(diff.mean()),
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--checkpoint', required=True, help='upstream .pth of a registered model (mmseg layout)')
  ap.add_argument('--model', default=None, help='registered model name (default: read from the checkpoint)')
  ap.add_argument('--variant', default=None, help='short form of --model (t for cgrseg_t)')
  ap.add_argument('--num-classes', type=int, default=None)
  ap.add_argument('--image', default=None, help='an image file (default: random input)')
  ap.add_argument('--size', type=parse_size, default=None, help='input H,W, multiples of 32')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--json', default=None, help='also write the results to this JSON file')
  args = ap.parse_args(argv)

  loaded = loader.load(
    args.checkpoint, model=args.model, variant=args.variant, num_classes=args.num_classes, kinds=('torch',)
  )
  print(f'{loaded.describe()}; {loaded.report.summary()}')
  family = family_of(loaded.model)
  if family.torch_reference is None:
    print(f'error: model family {family.name!r} declares no PyTorch reference', file=sys.stderr)
    return 2
  model = build_model(loaded.model, loaded.num_classes)
  variables = loaded.variables
  ref_model = family.torch_reference(loaded.model, loaded.num_classes)
  ref_model.load_state_dict({k: torch.as_tensor(v) for k, v in torch_files.read_state_dict(args.checkpoint).items()})
  ref_model.eval()

  x = load_input(args)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  apply = jax.jit(model.apply, static_argnames=('train', 'method'))
  rows = []
  # Intermediate outputs the two models share by method name, then the logits.
  if hasattr(ref_model, 'extract_features') and hasattr(model, 'extract_features'):
    with torch.no_grad():
      ref_feats = [nhwc(f) for f in ref_model.extract_features(xt)]
    feats = apply(variables, x, train=False, method='extract_features')
    rows += [errors(f'backbone stage {i + 1}', f, r) for i, (f, r) in enumerate(zip(feats, ref_feats))]
  if family.loss_method != '__call__' and hasattr(ref_model, family.loss_method):
    with torch.no_grad():
      ref_head = nhwc(getattr(ref_model, family.loss_method)(xt))
    head = apply(variables, x, train=False, method=family.loss_method)
    rows.append(errors(f'{family.loss_method} (stride {family.loss_stride})', head, ref_head))
  with torch.no_grad():
    ref_logits = nhwc(ref_model(xt))
  logits = np.asarray(apply(variables, x, train=False))
  rows.append(errors('logits (input size)', logits, ref_logits))
  agree = float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))
  print(f'input {x.shape[1]}x{x.shape[2]}')
  print(f'{"stage":34s} {"max abs":>10s} {"max rel":>10s} {"mean abs":>10s}')
  for r in rows:
    if 'error' in r:
      print(f'{r["name"]:34s} {r["error"]}')
    else:
      print(f'{r["name"]:34s} {r["max_abs"]:10.3e} {r["max_rel"]:10.3e} {r["mean_abs"]:10.3e}')
  print(f'{"argmax agreement":34s} {agree:.6f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        dict(
          checkpoint=args.checkpoint,
          model=loaded.model,
          input=list(x.shape[1:3]),
          stages=rows,
          argmax_agreement=agree,
        ),
        f,
        indent=2,
      )
  return 0 if all('error' not in r for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
