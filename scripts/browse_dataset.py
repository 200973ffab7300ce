"""What the configured input pipeline feeds the model (mmseg's browse_dataset.py):
the first --n samples of the training batches (after every augmentation:
resize, crop, flip, photometric distortion, padding) or of the evaluation
batches (the test resize), each with its label overlaid in the dataset palette
and the ignore pixels hatched, as one grid PNG.

    python scripts/browse_dataset.py --config=configs/ade20k_t.py --n=16 --out=browse_train.png
    python scripts/browse_dataset.py --config=configs/synthetic_t.py --split=val --out=browse_val.png
"""

import math
import os
import sys

import cv2
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cgrseg_jax import config_files, errors, inference, storage
from cgrseg_jax.data import input_pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script only, so that importing this module (tests) leaves
  the global flags to main.py."""
  config_flags.DEFINE_config_file('config', None, 'The training config whose pipeline is shown.', lock_config=True)
  flags.DEFINE_integer('n', 16, 'Samples to show.')
  flags.DEFINE_enum('split', 'train', ['train', 'val'], 'train: data.train_pipeline; val: the test pipeline.')
  flags.DEFINE_string('out', 'browse.png', 'The grid PNG (local or gs://).')
  flags.DEFINE_float('opacity', 0.5, 'Label overlay opacity.')
  flags.DEFINE_integer('tile', 256, 'Tile height in pixels.')


HATCH_RGB = (255, 0, 255)


def overlay(image_rgb: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore_index: int, opacity: float):
  """The image with its label blended in; ignore pixels darkened with magenta diagonal stripes."""
  ignore = label == ignore_index
  colours = inference.colorize(np.where(ignore, 0, label), palette).astype(np.float32)
  out = image_rgb.astype(np.float32) * (1 - opacity) + colours * opacity
  h, w = label.shape
  stripes = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 8) < 2
  out[ignore] = image_rgb[ignore] * 0.4
  out[ignore & stripes] = HATCH_RGB
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def train_samples(config, n: int):
  """(BGR image, label, sample index) of the first `n` training samples, as batched."""
  it = input_pipeline.train_iterator(config)
  while n > 0:
    batch = next(it)
    for image, label, index in zip(batch['image'], batch['label'], batch['index']):
      if n > 0:
        yield image, label, int(index)
        n -= 1


def val_samples(config, n: int):
  """(BGR image at the test scale, label resized to it (nearest), index) of the first `n` eval samples."""
  for batch in input_pipeline.eval_data(config):
    for i in range(len(batch['index'])):
      if batch['index'][i] < 0 or n <= 0:
        continue  # filler entry of a short batch
      (h, w), (oh, ow) = batch['valid_hw'][i], batch['orig_hw'][i]
      label = cv2.resize(batch['label'][i][:oh, :ow], (int(w), int(h)), interpolation=cv2.INTER_NEAREST)
      yield batch['image'][i][:h, :w], label, int(batch['index'][i])
      n -= 1
    if n <= 0:
      return


def grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
  h = max(t.shape[0] for t in tiles)
  w = max(t.shape[1] for t in tiles)
  rows = math.ceil(len(tiles) / columns)
  canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
  for k, t in enumerate(tiles):
    r, c = divmod(k, columns)
    canvas[r * h : r * h + t.shape[0], c * w : c * w + t.shape[1]] = t
  return canvas


def browse(config, n: int, split: str, opacity: float, tile_height: int) -> np.ndarray:
  config = input_pipeline.with_dataset_defaults(config)
  info = input_pipeline.dataset_info(config)
  samples = train_samples(config, n) if split == 'train' else val_samples(config, n)
  tiles = []
  for image, label, index in samples:
    rgb = overlay(np.ascontiguousarray(image[..., ::-1]), label, info.palette, info.ignore_index, opacity)
    size = (max(1, round(rgb.shape[1] * tile_height / rgb.shape[0])), tile_height)
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST)
    classes = sorted(set(np.unique(label).tolist()) - {info.ignore_index})
    names = ', '.join(info.class_names[c] if info.class_names else str(c) for c in classes[:4])
    caption = np.full((20, rgb.shape[1], 3), 255, np.uint8)
    text = f'#{index}: {names}' + (' ...' if len(classes) > 4 else '')
    cv2.putText(caption, text, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    tiles.append(np.concatenate([caption, rgb]))
  if not tiles:
    raise errors.DataError(f'the {split} split of {info.name!r} gave no samples')
  return grid(tiles, math.ceil(math.sqrt(len(tiles))))


def main(argv):
  del argv
  if FLAGS.n < 1:
    print(f'error: --n={FLAGS.n}: expected at least 1 sample', file=sys.stderr)
    sys.exit(2)
  try:
    rgb = browse(FLAGS.config, FLAGS.n, FLAGS.split, FLAGS.opacity, FLAGS.tile)
  except errors.UserError as e:
    print(f'error ({type(e).__name__}): {e}', file=sys.stderr)
    sys.exit(2)
  ok, data = cv2.imencode('.png', rgb[..., ::-1])
  storage.path(FLAGS.out).write_bytes(data.tobytes())
  print(f'{FLAGS.out}: {FLAGS.n} {FLAGS.split} samples ({rgb.shape[1]}x{rgb.shape[0]})')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  for arg in sys.argv[1:]:  # a config imports its siblings (`from configs import default`) from any cwd
    if arg.startswith('--config=') and os.path.isfile(arg.split('=', 1)[1].split(':')[0]):
      config_files.register_package(arg.split('=', 1)[1].split(':')[0])
  app.run(main)
