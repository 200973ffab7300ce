"""Export the eval forward of a trained or converted model: StableHLO, ONNX or TFLite, verified.

  python scripts/export.py --checkpoint=cgrseg_t.pth --output=export/cgrseg_t
  python scripts/export.py --checkpoint=runs/t:ema --output=export/t --format=onnx --verify
  python scripts/export.py --checkpoint=csfcn.pth --dataset=cityscapes --output=export/csfcn \\
      --format=tflite --batch=1 --height=1024 --width=2048 --verify --verify-input=frames/*.png
  python scripts/export.py --check=export/cgrseg_t   # reload a StableHLO export in this process and run it

The file maps a normalised RGB NHWC float32 batch (mmseg's Normalize output,
padded to a multiple of 32) to logits (N, H, W, K) float32 at the input size,
i.e. `model.apply(variables, x, train=False)` with the weights baked in.
Height and width are fixed (the models' resampling tables are built for one
size). The batch of a StableHLO file is symbolic (`--batch=dynamic`, its
default) or fixed (`--batch=N`); ONNX and TFLite files have a fixed batch
(default 1): jax2onnx 0.17 cannot carry a symbolic batch through these models'
reshapes, and LiteRT files are fixed-shape.
Routes and why: cgrseg_jax/exporter.py. ONNX and TFLite need the `export` extra.

`--verify` runs the written file in its own runtime (jax.export,
onnxruntime, the LiteRT interpreter) on `--verify-input` (images, resized and
normalised as the test pipeline does, or .npy / .npz arrays of normalised
inputs, NHWC or NCHW; default: 2 seeded random batches) and prints the max
abs and relative error and the argmax agreement against the JAX forward, and
both latencies; it fails (exit 1) beyond `--rtol` or under `--min-agreement`.

`<output>/meta.json` records the input spec, classes, normalisation, the files
and the verification.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import exporter
from cgrseg_jax.data.transforms import MEAN_RGB, STD_RGB, normalize_table
from cgrseg_jax.inference import InferenceError, Segmenter

META_FILE = 'meta.json'
EXPORT_FILE = exporter.FILES['stablehlo']


def load(directory: str):
  """(Exported, meta) of a StableHLO export directory."""
  path = os.path.join(directory, EXPORT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no exported forward here (run scripts/export.py --output={directory})')
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with open(os.path.join(directory, META_FILE)) as f:
    meta = json.load(f)
  return exported, meta


def check(directory: str, inputs: str | None, outputs: str | None) -> int:
  """Reload and run a StableHLO export (meant for a fresh process). `inputs`: comma-separated
  .npy batches (several batch sizes through one batch-polymorphic file), `outputs` as many
  .npy paths for their logits; without inputs, one random batch."""
  exported, meta = load(directory)
  h, w = meta['input_hw']
  paths = inputs.split(',') if inputs else []
  targets = outputs.split(',') if outputs else []
  if targets and len(targets) != max(len(paths), 1):
    raise SystemExit(f'--check-output: {len(targets)} path(s) for {max(len(paths), 1)} input batch(es)')
  batches = [np.load(p) for p in paths] or [
    np.random.default_rng(0).standard_normal((meta['batch'] or 2, h, w, 3)).astype(np.float32)
  ]
  for i, x in enumerate(batches):
    t = time.perf_counter()
    y = np.asarray(exported.call(x))
    print(f'{directory}: ran the exported forward on {x.shape} -> {y.shape} in {time.perf_counter() - t:.2f}s')
    if targets:
      np.save(targets[i], y)
  return 0


def _as_nhwc(array: np.ndarray, path: str, hw) -> np.ndarray:
  x = np.asarray(array, np.float32)
  if x.ndim == 3:
    x = x[None]
  if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
    x = x.transpose(0, 2, 3, 1)
  if x.ndim != 4 or tuple(x.shape[1:]) != (*hw, 3):
    raise SystemExit(f'{path}: an input of shape {np.shape(array)}; expected (N, {hw[0]}, {hw[1]}, 3) or NCHW')
  return x


def verify_inputs(spec: str | None, hw, batch: int) -> list[np.ndarray]:
  """Batches of normalised NHWC inputs at the export size (see the module docstring)."""
  if not spec:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, *hw, 3)).astype(np.float32) for _ in range(2)]
  paths = sorted(p for part in spec.split(',') for p in (glob.glob(part) or [part]))
  arrays, images = [], []
  table = normalize_table()
  for path in paths:
    if not os.path.exists(path):
      raise SystemExit(f'--verify-input: {path} does not exist')
    if path.endswith('.npz'):
      with np.load(path) as data:
        if 'x' not in data:
          raise SystemExit(f'{path}: no array "x" (the normalised input) in this .npz; it has {sorted(data)}')
        arrays.append(_as_nhwc(data['x'], path, hw))
    elif path.endswith('.npy'):
      arrays.append(_as_nhwc(np.load(path), path, hw))
    else:
      bgr = cv2.imread(path, cv2.IMREAD_COLOR)
      if bgr is None:
        raise SystemExit(f'--verify-input: {path} is not an image OpenCV reads, nor .npy/.npz')
      rgb = cv2.resize(bgr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)[..., ::-1]
      images.append(table[rgb, np.arange(3)])
  # Whole batches of the export's batch size (a fixed-batch file takes nothing else).
  rows = np.concatenate(arrays + ([np.stack(images)] if images else []), axis=0)
  full = [rows[i : i + batch] for i in range(0, len(rows) - batch + 1, batch)]
  if not full:
    raise SystemExit(f'--verify-input: {len(rows)} input(s), fewer than one batch of {batch}')
  return full


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', help='.pth, converted dir, training workdir or step dir; <run>:ema for the EMA')
  p.add_argument('--output', help='directory to write')
  p.add_argument('--format', default='stablehlo', help='stablehlo, onnx or tflite (comma list for several)')
  p.add_argument('--height', type=int, default=512)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--batch', default=None, help="'dynamic' (symbolic; stablehlo only) or a fixed batch size")
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='compute dtype')
  p.add_argument('--platforms', default=None, help='stablehlo: comma list for multi-platform lowering, e.g. cpu,cuda')
  p.add_argument('--dataset', default='ade20k', help='for the class names in meta.json')
  p.add_argument('--verify', action='store_true', help='run the written file in its runtime against JAX')
  p.add_argument('--verify-input', help='images, .npy or .npz inputs (comma list, globs) for --verify')
  p.add_argument('--rtol', type=float, default=1e-4, help='--verify: max |runtime - jax| / max |jax|')
  p.add_argument('--min-agreement', type=float, default=0.9999, help='--verify: argmax agreement at least')
  p.add_argument('--check', metavar='DIR', help='reload the StableHLO export in DIR in this process and run it')
  p.add_argument('--check-input', help='with --check: .npy input batch(es), comma-separated')
  p.add_argument('--check-output', help='with --check: write the logits here (.npy, one per input)')
  args = p.parse_args(argv)

  if args.check:
    return check(args.check, args.check_input, args.check_output)
  if not args.checkpoint or not args.output:
    p.error('--checkpoint and --output are required (or --check=DIR)')
  if args.height % 32 or args.width % 32:
    p.error(f'--height/--width must be multiples of 32 (the test pipeline pads to 32), got {args.height}x{args.width}')
  formats = args.format.split(',')
  for fmt in formats:
    if fmt not in exporter.FORMATS:
      p.error(f'--format={fmt!r}; expected one of {", ".join(exporter.FORMATS)}')
  if args.batch in (None, 'dynamic'):
    batch = None
  elif args.batch.isdigit() and int(args.batch) > 0:
    batch = int(args.batch)
  else:
    p.error(f"--batch={args.batch!r}; expected 'dynamic' or a positive integer")
  for fmt in formats:
    if args.batch == 'dynamic' and fmt in exporter.FIXED_BATCH:
      p.error(f'--format={fmt} has a fixed batch: pass --batch=N')
  if args.verify and args.verify_input:
    verify_inputs(args.verify_input, (args.height, args.width), 1)  # bad inputs fail before the export's minutes
  try:
    seg = Segmenter.from_checkpoint(
      args.checkpoint, dataset=args.dataset, dtype=jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
    )
  except InferenceError as e:
    print(f'export.py: {e}', file=sys.stderr)
    return 2
  platforms = args.platforms.split(',') if args.platforms else None
  fn = exporter.forward_fn(seg.model, seg.variables)
  hw = (args.height, args.width)
  os.makedirs(args.output, exist_ok=True)
  meta = dict(
    checkpoint=args.checkpoint,
    model=seg.info().get('model'),
    num_classes=seg.num_classes,
    class_names=list(seg.class_names),
    input_hw=list(hw),
    batch=batch,
    layout='NHWC',
    input='RGB float32, (x - mean) / std, zero-padded right/bottom to the multiple of 32',
    mean=list(MEAN_RGB),
    std=list(STD_RGB),
    output='logits float32 (N, H, W, K) at the input size',
    dtype=args.dtype,
    jax_version=jax.__version__,
    files={},
  )
  failed = False
  for fmt in formats:
    fmt_batch = 1 if fmt in exporter.FIXED_BATCH and batch is None else batch
    path = os.path.join(args.output, exporter.FILES[fmt])
    try:
      info = exporter.write(fmt, fn, path, *hw, fmt_batch, platforms if fmt == 'stablehlo' else None)
    except exporter.ExportError as e:
      print(f'export.py: {e}', file=sys.stderr)
      return 2
    print(f'wrote {path} ({info["bytes"] / 2**20:.1f} MiB, batch {fmt_batch or "dynamic"}) in {info["seconds"]:.1f}s')
    if args.verify:
      inputs = verify_inputs(args.verify_input, hw, fmt_batch or 2)
      result = exporter.compare(exporter.runner(fmt, path), fn, inputs)
      good = result.ok(args.rtol, args.min_agreement)
      failed |= not good
      print(
        f'verify {fmt}: max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g} (of max |logit|), argmax '
        f'agreement {result.argmax_agreement:.6f} over {result.pixels} pixels; {result.runtime_ms:.1f} ms per batch '
        f'against JAX {result.jax_ms:.1f} ms: {"ok" if good else "FAILED"} (rtol {args.rtol:g}, '
        f'min agreement {args.min_agreement:g})'
      )
      info['verify'] = dict(vars(result), ok=good, rtol=args.rtol, min_agreement=args.min_agreement)
    info['file'] = os.path.basename(path)
    meta['files'][fmt] = info
  with open(os.path.join(args.output, META_FILE), 'w') as f:
    json.dump(meta, f, indent=2)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
