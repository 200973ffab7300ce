"""Segment images with a checkpoint of any registered model and write colour / overlay / label PNGs.

  python scripts/predict.py --checkpoint=cgrseg_t.pth --output=out photos/ 'more/*.jpg' one.png
  python scripts/predict.py --checkpoint=runs/t --output=out --tta-scales=0.5,0.75,1.0,1.25,1.5,1.75 --flip imgs/
  python scripts/predict.py --checkpoint=cgrseg_t.pth --output=out --mode=slide --crop=512,512 --stride=341,341 x.jpg
  python scripts/predict.py --checkpoint=cgrseg_t.pth --output=out --stream clip.mp4        # video (the `video` extra)
  python scripts/predict.py --checkpoint=cgrseg_t.pth --output=out --stream incoming/       # a growing folder
  python scripts/predict.py --checkpoint=cgrseg_t.pth --output=out --tiled --crop=512,512 --stride=341,341 big.tif

Inputs are files, folders (images directly inside; `--recursive` for
subfolders) or glob patterns, local or on gs:// (as is --output). Per image `<name>` the output folder gets

  <name>_color.png    the label map in the dataset palette
  <name>_overlay.png  the image blended with it (`--opacity`)
  <name>_legend.png   swatches and names of the classes present, largest first
  <name>_labels.png   with --raw: class ids (uint8; uint16 above 256 classes)
  <name>_confidence.png, <name>_entropy.png   with --confidence: the maximum
                      class probability (0..1) and the entropy of the class
                      probabilities (0..log K nats), in the inferno colour map
                      (bright: high), after TTA when TTA is on

and `predictions.json` lists, per image, the classes present with their pixel
share (with --confidence also each class's mean maximum probability over its
pixels, and the image's mean maximum probability and entropy).

--stream: one input, a video file (decoded with PyAV: `pip install
cgrseg-jax[video]`) or a folder that is watched for new images until none has
come for --stream-idle seconds. Every frame is resized to the first frame's
size, so the model is compiled once; a video gives `<name>_overlay.mp4` and
`<name>_frames.json` (classes per frame), a folder the per-image files above.
`stream.json` reports the frame count, frames/s after the first frame, and the
compilations.

--tiled: slide inference at each image's own resolution, band by band
(`cgrseg_jax/tiled.py`): host memory grows with the image width, not its
area; one compiled window shape for all images. An image that cannot be read is reported by name and skipped; the exit
status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import cv2
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cgrseg_jax import config_files, errors, storage
from cgrseg_jax.inference import Segmenter, confidence_maps
from cgrseg_jax.tiled import TiledSegmenter

try:  # the `video` extra
  import av
except ImportError:
  av = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')


def collect_inputs(specs, recursive: bool = False) -> tuple[list[str], list[str]]:
  """(image paths in a stable order, error messages for specs that match nothing)."""
  found, problems = [], []
  for spec in specs:
    if not storage.is_local(spec):
      paths, error = _collect_remote(spec, recursive)
      found.extend(paths)
      problems.extend([error] if error else [])
      continue
    if os.path.isdir(spec):
      pattern = os.path.join(spec, '**', '*') if recursive else os.path.join(spec, '*')
      paths = sorted(
        p for p in glob.glob(pattern, recursive=recursive) if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
      )
      if not paths:
        problems.append(f'{spec}: folder has no images ({", ".join(IMAGE_EXTENSIONS)})')
    elif os.path.isfile(spec):
      paths = [spec]  # named explicitly: tried whatever its extension
    else:
      paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
      if not paths:
        problems.append(f'{spec}: no such file, folder or matching glob')
    found.extend(paths)
  seen, unique = set(), []
  for p in found:
    key = os.path.abspath(p)
    if key not in seen:
      seen.add(key)
      unique.append(p)
  return unique, problems


def _collect_remote(spec: str, recursive: bool) -> tuple[list[str], str]:
  """collect_inputs for one gs:// (or other object store) file, folder or pattern."""
  where = storage.path(spec)
  if where.is_dir():
    items = storage.walk_files(where) if recursive else [os.fspath(p) for p in where.iterdir() if not p.is_dir()]
    paths = sorted(p for p in items if p.lower().endswith(IMAGE_EXTENSIONS))
    return paths, '' if paths else f'{spec}: folder has no images ({", ".join(IMAGE_EXTENSIONS)})'
  if where.is_file():
    return [spec], ''
  scheme, rest = spec.split('://', 1)
  parts = rest.split('/')
  wild = next((i for i, part in enumerate(parts) if any(c in part for c in '*?[')), None)
  if wild is None or wild == 0:
    return [], f'{spec}: no such file, folder or matching glob'
  base = storage.path(f'{scheme}://' + '/'.join(parts[:wild]))
  paths = sorted(os.fspath(p) for p in base.glob('/'.join(parts[wild:])) if not p.is_dir())
  return paths, '' if paths else f'{spec}: no such file, folder or matching glob'


def read_rgb(path: str) -> np.ndarray:
  """RGB uint8 (H, W, 3); raises ValueError naming the file if unreadable."""
  try:
    data = np.frombuffer(storage.read_bytes(path), np.uint8)
  except OSError:
    data = None
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
  if image is None:
    raise ValueError(f'{path}: cannot read the image (missing, empty, corrupt or unsupported format)')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_png(path: str, image: np.ndarray):
  """A PNG of `image` (BGR or single-channel) at `path`, local or gs://."""
  ok, data = cv2.imencode('.png', image)
  if not ok:
    raise OSError(f'{path}: could not encode the PNG')
  storage.path(path).write_bytes(data.tobytes())


def write_rgb(path: str, rgb: np.ndarray):
  write_png(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def classes_present(labels: np.ndarray, names) -> list[dict]:
  counts = np.bincount(labels.ravel(), minlength=len(names))
  order = np.argsort(-counts, kind='stable')
  total = labels.size
  return [dict(id=int(i), name=names[i], fraction=round(float(counts[i]) / total, 6)) for i in order if counts[i] > 0]


def heatmap(values: np.ndarray, top: float) -> np.ndarray:
  """BGR inferno colour map of `values` in [0, top]."""
  scaled = np.clip(np.asarray(values, np.float64) / top * 255 + 0.5, 0, 255).astype(np.uint8)
  return cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)


def confidence_summary(labels: np.ndarray, max_prob: np.ndarray, entropy: np.ndarray, present: list[dict]) -> dict:
  """Mean maximum probability per class present (over its predicted pixels) and over the image."""
  per_class = {c['name']: round(float(max_prob[labels == c['id']].mean()), 6) for c in present}
  return dict(
    mean_max_prob=round(float(max_prob.mean()), 6), mean_entropy=round(float(entropy.mean()), 6), per_class=per_class
  )


def legend_image(present: list[dict], palette: np.ndarray, row: int = 22, width: int = 320) -> np.ndarray:
  """RGB panel: one swatch + 'name (share %)' per class present."""
  panel = np.full((max(len(present), 1) * row + 8, width, 3), 255, np.uint8)
  for k, c in enumerate(present):
    y = 4 + k * row
    panel[y + 2 : y + row - 2, 6 : 6 + row] = palette[c['id']]
    cv2.putText(
      panel,
      f'{c["name"]} ({100 * c["fraction"]:.1f}%)',
      (row + 14, y + row - 7),
      cv2.FONT_HERSHEY_SIMPLEX,
      0.45,
      (0, 0, 0),
      1,
      cv2.LINE_AA,
    )
  return panel


def output_names(paths: list[str]) -> list[str]:
  """Output stems: the file stem, made unique with the parent folder or a counter."""
  stems, used = [], set()
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    if stem in used:
      stem = f'{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{stem}'
    base, k = stem, 1
    while stem in used:
      stem, k = f'{base}_{k}', k + 1
    used.add(stem)
    stems.append(stem)
  return stems


def video_frames(path: str):
  """RGB uint8 frames of a video file, decoded with PyAV."""
  if av is None:
    raise errors.ConfigError(f'{path}: reading video needs PyAV (pip install "cgrseg-jax[video]" or pip install av)')
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    raise errors.DataError(f'{path}: cannot open the video ({e})') from None
  with container:
    stream = container.streams.video[0]
    for frame in container.decode(stream):
      yield frame.to_ndarray(format='rgb24')


def folder_frames(folder: str, idle_s: float, poll_s: float = 0.2):
  """(path, RGB image) of the images in `folder`, in name order, then of each
  new one as it appears, until none has appeared for `idle_s` seconds.
  A file is read once its size has stopped changing (a writer may be mid-copy)."""
  seen, sizes = set(), {}
  last_new = time.monotonic()
  while time.monotonic() - last_new < idle_s:
    ready = []
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if path in seen or not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
        continue
      size = os.path.getsize(path)
      if sizes.get(path) == size and size > 0:
        ready.append(path)
      sizes[path] = size
    for path in ready:
      seen.add(path)
      last_new = time.monotonic()
      try:
        yield path, read_rgb(path)
      except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
    if not ready:
      time.sleep(poll_s)


class VideoWriter:
  """Overlay frames to an MPEG-4 file with PyAV (libx264 where the build has it)."""

  def __init__(self, path: str, hw, fps: float = 25.0):
    self.container = av.open(path, mode='w')
    codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
    self.stream = self.container.add_stream(codec, rate=round(fps))
    self.stream.height, self.stream.width = (v - v % 2 for v in hw)  # yuv420p needs even sizes
    self.stream.pix_fmt = 'yuv420p'

  def write(self, rgb: np.ndarray):
    rgb = np.ascontiguousarray(rgb[: self.stream.height, : self.stream.width])
    for packet in self.stream.encode(av.VideoFrame.from_ndarray(rgb, format='rgb24')):
      self.container.mux(packet)

  def close(self):
    for packet in self.stream.encode():
      self.container.mux(packet)
    self.container.close()


def run_stream(seg: Segmenter, source: str, output, args) -> dict:
  """Segment the frames of a video or a growing folder with one compiled shape; returns stream.json's record."""
  is_video = os.path.isfile(source) and source.lower().endswith(VIDEO_EXTENSIONS)
  if not is_video and not os.path.isdir(source):
    raise errors.DataError(f'--stream {source}: expected a video file ({", ".join(VIDEO_EXTENSIONS)}) or a folder')
  stem = os.path.splitext(os.path.basename(source.rstrip('/')))[0]
  frames = ((f'{stem}[{i}]', f) for i, f in enumerate(video_frames(source))) if is_video else None
  if frames is None:
    frames = folder_frames(source, args.stream_idle)
  size, writer, per_frame = None, None, []
  n, t_first, t0 = 0, None, time.perf_counter()
  try:
    for name, rgb in frames:
      orig_hw = rgb.shape[:2]
      if size is None:
        size = orig_hw
        if is_video:
          writer = VideoWriter(os.fspath(output / f'{stem}_overlay.mp4'), size)
      frame = rgb if rgb.shape[:2] == size else cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
      lab = seg.predict(frame)
      if lab.shape != orig_hw:  # back to the frame's own size
        lab = cv2.resize(lab, (orig_hw[1], orig_hw[0]), interpolation=cv2.INTER_NEAREST)
      present = classes_present(lab, seg.class_names)
      if writer is not None:
        writer.write(seg.overlay(rgb, lab, args.opacity))
        per_frame.append(present)
      else:
        write_outputs(seg, os.fspath(output / output_names([name])[0]), rgb, lab, present, args)
        per_frame.append({'image': name, 'classes': present})
      n += 1
      if n == 1:
        t_first = time.perf_counter()
  finally:
    if writer is not None:
      writer.close()
  if n == 0:
    raise errors.DataError(f'--stream {source}: no frames')
  steady = time.perf_counter() - t_first
  compiles = sum(v for k, v in seg.traces.items())
  if is_video:
    (output / f'{stem}_frames.json').write_text(json.dumps(per_frame))
  else:
    (output / 'predictions.json').write_text(json.dumps(per_frame, indent=1))
  return dict(
    source=source,
    frames=n,
    frame_hw=list(size),
    first_frame_s=round(t_first - t0, 3),
    frames_per_s=round((n - 1) / steady, 2) if n > 1 and steady > 0 else None,
    compilations=compiles,
  )


def write_outputs(seg: Segmenter, out: str, image, lab, present, args, probs=None) -> dict:
  """The per-image PNGs under the prefix `out`; returns the image's extra JSON fields."""
  write_rgb(out + '_color.png', seg.colorize(lab))
  write_rgb(out + '_overlay.png', seg.overlay(image, lab, args.opacity))
  write_rgb(out + '_legend.png', legend_image(present, seg.palette))
  if args.raw:
    write_png(out + '_labels.png', lab.astype(np.uint8 if seg.num_classes <= 256 else np.uint16))
  if probs is None:
    return {}
  max_prob, entropy = confidence_maps(probs)
  write_png(out + '_confidence.png', heatmap(max_prob, 1.0))
  write_png(out + '_entropy.png', heatmap(entropy, float(np.log(seg.num_classes))))
  return {'confidence': confidence_summary(lab, max_prob, entropy, present)}


def _pair(text: str, name: str) -> tuple[int, int]:
  try:
    a, b = (int(v) for v in text.split(','))
    return a, b
  except ValueError:
    raise argparse.ArgumentTypeError(f'{name} must be two integers "a,b", got {text!r}') from None


def _segmenter(args) -> Segmenter:
  if (args.mode == 'slide' or args.tiled) and (args.crop is None or args.stride is None):
    defaults = config_files.load(os.path.join(REPO, 'configs', 'default.py')).eval
    args.crop, args.stride = args.crop or tuple(defaults.crop_size), args.stride or tuple(defaults.stride)
  seg_kwargs = dict(mode=args.mode, crop_size=args.crop, stride=args.stride, batch_size=args.batch_size)
  if args.img_scale:
    seg_kwargs['img_scale'] = args.img_scale
  return Segmenter.from_checkpoint(
    args.checkpoint,
    model=args.model,
    variant=args.variant,
    dataset=args.dataset,
    dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
    **seg_kwargs,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
  p.add_argument('--checkpoint', required=True, help='.pth, converted dir, training workdir or step dir')
  p.add_argument('--output', required=True, help='folder for the PNGs (created)')
  p.add_argument('--dataset', default='ade20k', help='class names, palette and default test scale')
  p.add_argument('--model', default=None, help='registered model name (e.g. cgrseg_t); checked against the weights')
  p.add_argument('--variant', default=None, help='short form of --model (t for cgrseg_t)')
  p.add_argument(
    '--img-scale',
    type=lambda s: _pair(s, '--img-scale'),
    default=None,
    help="keep-ratio test scale 'long,short' (default: the dataset's, e.g. 2048,512)",
  )
  p.add_argument('--mode', choices=['whole', 'slide'], default='whole')
  p.add_argument('--crop', type=lambda s: _pair(s, '--crop'), help="slide window h,w (default: configs/default.py's)")
  p.add_argument(
    '--stride', type=lambda s: _pair(s, '--stride'), help="slide stride h,w (default: configs/default.py's)"
  )
  p.add_argument('--tta-scales', default=None, help='comma list of ratios, e.g. 0.5,0.75,1.0,1.25,1.5,1.75')
  p.add_argument('--flip', action='store_true', help='add horizontal flips (test-time augmentation)')
  p.add_argument('--opacity', type=float, default=0.5, help='overlay weight of the colours, in [0, 1]')
  p.add_argument('--raw', action='store_true', help='also write <name>_labels.png with class ids')
  p.add_argument(
    '--confidence', action='store_true', help='also write maximum-probability and entropy maps, and their means'
  )
  p.add_argument('--batch-size', type=int, default=1)
  p.add_argument('--bf16', action='store_true', help='bfloat16 compute')
  p.add_argument('--recursive', action='store_true', help='descend into subfolders of folder inputs')
  p.add_argument('--no-progress', action='store_true')
  p.add_argument('--stream', action='store_true', help='one input: a video file or a folder watched for new images')
  p.add_argument('--stream-idle', type=float, default=10.0, help='--stream on a folder: stop after this many idle s')
  p.add_argument('--tiled', action='store_true', help='band-by-band slide inference at the images own resolution')
  p.add_argument('--window-batch', type=int, default=8, help='--tiled: windows per forward')
  args = p.parse_args(argv)
  if not 0.0 <= args.opacity <= 1.0:
    p.error(f'--opacity must be in [0, 1], got {args.opacity}')
  if args.stream and len(args.inputs) != 1:
    p.error(f'--stream takes one input (a video file or a folder), got {len(args.inputs)}')
  if args.tiled and (args.stream or args.tta_scales or args.flip or args.confidence):
    p.error('--tiled works alone: not with --stream, --tta-scales, --flip or --confidence')
  if args.stream:
    output = storage.check_writable(args.output, 'output folder')
    seg = _segmenter(args)
    record = run_stream(seg, args.inputs[0], output, args)
    (output / 'stream.json').write_text(json.dumps(record, indent=2))
    print(
      f'{record["frames"]} frames of {args.inputs[0]} into {args.output}: {record["frames_per_s"]} frames/s '
      f'after the first ({record["first_frame_s"]} s, compiling), {record["compilations"]} compilations',
      file=sys.stderr,
    )
    return 0

  paths, failures = collect_inputs(args.inputs, args.recursive)
  for msg in failures:
    print(f'error: {msg}', file=sys.stderr)
  if not paths:
    print('error: no input images', file=sys.stderr)
    return 1

  output = storage.check_writable(args.output, 'output folder')
  seg = _segmenter(args)
  tiles = TiledSegmenter(seg, args.crop, args.stride, args.window_batch) if args.tiled else None
  tta = None
  if args.tta_scales or args.flip:
    scales = [float(s) for s in args.tta_scales.split(',')] if args.tta_scales else [1.0]
    tta = dict(scales=scales, flip=args.flip)

  bar = None
  if not args.no_progress:
    bar = tqdm(total=len(paths), unit='img', file=sys.stderr)
  stems = output_names(paths)
  summary, n_failed = {}, len(failures)
  t0 = time.perf_counter()
  for start in range(0, len(paths), args.batch_size):
    chunk = list(zip(paths[start : start + args.batch_size], stems[start : start + args.batch_size]))
    images = []
    for path, stem in chunk:
      try:
        images.append((path, stem, read_rgb(path)))
      except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        n_failed += 1
    if images:
      if tiles is not None:
        results = [tiles.predict(im) for _, _, im in images]
      else:
        results = seg.predict_batch([im for _, _, im in images], tta=tta, return_probs=args.confidence)
      for (path, stem, image), result in zip(images, results):
        try:
          lab, probs = result if args.confidence else (result, None)
          present = classes_present(lab, seg.class_names)
          extra = write_outputs(seg, os.fspath(output / stem), image, lab, present, args, probs)
          summary[path] = dict(output=stem, size=list(lab.shape), classes=present, **extra)
        except OSError as e:
          print(f'error: {e}', file=sys.stderr)
          n_failed += 1
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  record = dict(checkpoint=args.checkpoint, settings=seg.info(), tta=tta, images=summary)
  (output / 'predictions.json').write_text(json.dumps(record, indent=2))
  print(
    f'{len(summary)} images segmented into {args.output} in {time.perf_counter() - t0:.1f}s'
    + (f'; {n_failed} failed' if n_failed else ''),
    file=sys.stderr,
  )
  return 1 if n_failed else 0


if __name__ == '__main__':
  try:
    sys.exit(main())
  except errors.UserError as e:  # a bad checkpoint or output path: one line, not a traceback
    print(f'error ({type(e).__name__}): {e}', file=sys.stderr)
    sys.exit(2)
