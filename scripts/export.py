"""Export the eval forward of a registered model: StableHLO via `jax.export`, optionally ONNX.

  python scripts/export.py --checkpoint=cgrseg_t.pth --output=export/cgrseg_t
  python scripts/export.py --checkpoint=runs/t --output=export/t --height=512 --width=683 --onnx
  python scripts/export.py --check=export/cgrseg_t   # reload in this (fresh) process and run

The exported function maps a normalised RGB NHWC float32 batch (mmseg's
Normalize output, padded to a multiple of 32) to logits (N, H, W, K) float32 at
the input size, i.e. `model.apply(variables, x, train=False)`. The weights are
baked in as constants, so `<output>/forward.jaxexport` is self-contained:

  exp = jax.export.deserialize(open('forward.jaxexport', 'rb').read())
  logits = exp.call(x)

The batch dimension is symbolic (any batch size) unless `--batch=N`; height
and width are fixed because the model's resampling tables (bilinear taps,
resized attention biases) are built from the static spatial size.
`<output>/meta.json` records the input spec, classes and normalisation.

ONNX (`--onnx`) goes through jax2onnx, which is optional: its package pins an
orbax-checkpoint older than this project's, so install it without
dependencies next to onnx and onnxruntime (`pip install --no-deps jax2onnx
onnx onnx-ir onnxruntime`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from cgrseg_jax.data.transforms import MEAN_RGB, STD_RGB
from cgrseg_jax.inference import Segmenter

EXPORT_FILE = 'forward.jaxexport'
ONNX_FILE = 'forward.onnx'
META_FILE = 'meta.json'


def export_forward(model, variables, height: int, width: int, batch=None, platforms=None):
  """`jax.export.Exported` of the eval forward; `batch=None` -> symbolic batch."""
  fn = jax.jit(lambda x: model.apply(variables, x, train=False))
  n = export.symbolic_shape('b')[0] if batch is None else int(batch)
  spec = jax.ShapeDtypeStruct((n, height, width, 3), jnp.float32)
  return export.export(fn, platforms=platforms)(spec)


def export_onnx(model, variables, height: int, width: int, batch, path: str):
  """ONNX through jax2onnx; raises RuntimeError saying what is missing/unsupported."""
  try:
    from jax2onnx import to_onnx  # optional, installed by hand (see the docstring)
    import onnx
  except ImportError as e:
    raise RuntimeError(f"ONNX export needs jax2onnx and onnx ({e}); see this script's docstring") from None
  fn = lambda x: model.apply(variables, x, train=False)
  n = 'B' if batch is None else int(batch)
  proto = to_onnx(fn, [(n, height, width, 3)])
  onnx.save_model(proto, path)
  return path


def load(directory: str):
  """(Exported, meta) of an export directory."""
  path = os.path.join(directory, EXPORT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no exported forward here (run scripts/export.py --output={directory})')
  with open(path, 'rb') as f:
    exported = export.deserialize(bytearray(f.read()))
  with open(os.path.join(directory, META_FILE)) as f:
    meta = json.load(f)
  return exported, meta


def check(directory: str, inputs: str | None, outputs: str | None) -> int:
  """Reload and run the export (meant for a fresh process); optional npy in/out."""
  exported, meta = load(directory)
  h, w = meta['input_hw']
  if inputs:
    x = np.load(inputs)
  else:
    x = np.random.default_rng(0).standard_normal((meta['batch'] or 2, h, w, 3)).astype(np.float32)
  t = time.perf_counter()
  y = np.asarray(exported.call(x))
  print(f'{directory}: ran the exported forward on {x.shape} -> {y.shape} in {time.perf_counter() - t:.2f}s')
  if outputs:
    np.save(outputs, y)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', help='.pth, converted dir, training workdir or step dir')
  p.add_argument('--output', help='directory to write')
  p.add_argument('--height', type=int, default=512)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--batch', default='dynamic', help="'dynamic' (symbolic) or a fixed batch size")
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='compute dtype')
  p.add_argument('--platforms', default=None, help='comma list for multi-platform lowering, e.g. cpu,cuda')
  p.add_argument('--onnx', action='store_true', help='also write forward.onnx through jax2onnx')
  p.add_argument('--dataset', default='ade20k', help='for the class names in meta.json')
  p.add_argument('--check', metavar='DIR', help='reload DIR in this process and run it')
  p.add_argument('--check-input', help='with --check: .npy input batch')
  p.add_argument('--check-output', help='with --check: write the logits here (.npy)')
  args = p.parse_args(argv)

  if args.check:
    return check(args.check, args.check_input, args.check_output)
  if not args.checkpoint or not args.output:
    p.error('--checkpoint and --output are required (or --check=DIR)')
  if args.height % 32 or args.width % 32:
    p.error(f'--height/--width must be multiples of 32 (the test pipeline pads to 32), got {args.height}x{args.width}')
  seg = Segmenter.from_checkpoint(
    args.checkpoint, dataset=args.dataset, dtype=jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  )
  batch = None if args.batch == 'dynamic' else int(args.batch)
  platforms = args.platforms.split(',') if args.platforms else None
  os.makedirs(args.output, exist_ok=True)
  t = time.perf_counter()
  exported = export_forward(seg.model, seg.variables, args.height, args.width, batch, platforms)
  blob = exported.serialize()
  with open(os.path.join(args.output, EXPORT_FILE), 'wb') as f:
    f.write(blob)
  print(
    f'wrote {os.path.join(args.output, EXPORT_FILE)} ({len(blob) / 2**20:.1f} MiB, '
    f'platforms {exported.platforms}, input {exported.in_avals[0].str_short()}) in '
    f'{time.perf_counter() - t:.1f}s'
  )
  meta = dict(
    checkpoint=os.path.abspath(args.checkpoint),
    num_classes=seg.num_classes,
    class_names=list(seg.class_names),
    input_hw=[args.height, args.width],
    batch=batch,
    layout='NHWC',
    input='RGB float32, (x - mean) / std, zero-padded right/bottom to the multiple of 32',
    mean=list(MEAN_RGB),
    std=list(STD_RGB),
    output='logits float32 (N, H, W, K) at the input size',
    dtype=args.dtype,
    platforms=list(exported.platforms),
    jax_version=jax.__version__,
  )
  onnx_note = None
  if args.onnx:
    try:
      path = export_onnx(seg.model, seg.variables, args.height, args.width, batch, os.path.join(args.output, ONNX_FILE))
      print(f'wrote {path}')
      meta['onnx'] = ONNX_FILE
    except Exception as e:  # jax2onnx coverage is op by op: report, keep the StableHLO export
      onnx_note = f'ONNX export failed: {type(e).__name__}: {e}'
      print(onnx_note, file=sys.stderr)
      meta['onnx_error'] = onnx_note
  with open(os.path.join(args.output, META_FILE), 'w') as f:
    json.dump(meta, f, indent=2)
  return 1 if onnx_note else 0


if __name__ == '__main__':
  sys.exit(main())
