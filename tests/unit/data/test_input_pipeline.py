"""Config -> input pipelines (data/input_pipeline.py): transform lists from the
command line / a config file, a new augmentation as one class and one entry,
the evaluation fields, custom data from config.data.custom, missing-data
messages."""

import dataclasses
import os
import sys

import cv2
import grain
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from cgrseg_jax import errors
from cgrseg_jax.data import input_pipeline, sources
from cgrseg_jax.data import transforms as T
from cgrseg_jax.data.synthetic import SyntheticSegmentation
from png_files import write_png
from train_config import tiny_config, with_values

from paths import REPO


# ------------------------------------------------------------- transforms


@T.register
@dataclasses.dataclass(frozen=True)
class InvertForTest(grain.transforms.Map):
  """A new augmentation: one class (+ one config entry below)."""

  def map(self, element):
    return dict(element, image=255 - element['image'])


def _first_batch(config):
  it = input_pipeline.train_iterator(config)
  return next(it)


def test_new_augmentation_is_one_class_and_one_config_entry():
  base = tiny_config(batch_size=2)
  default = _first_batch(base)
  pipeline = list(base.data.train_pipeline)
  pipeline.insert(-1, ('InvertForTest', {}))  # before Pad, so padding stays 0
  inverted = _first_batch(tiny_config(batch_size=2, **{'data.train_pipeline': tuple(pipeline)}))
  np.testing.assert_array_equal(inverted['label'], default['label'])
  for img_a, img_b, (h, w) in zip(default['image'], inverted['image'], default['valid_hw']):
    np.testing.assert_array_equal(img_b[:h, :w], 255 - img_a[:h, :w])


def _parse(argv, monkeypatch):
  """main.py's flag handling: a locked config file plus --config.* overrides
  (config_flags reads the overrides from sys.argv)."""
  fv = flags.FlagValues()
  monkeypatch.setattr(sys, 'argv', ['main.py', *argv])
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True)
  fv(sys.argv)
  return fv.config


def test_pipeline_from_command_line_and_from_config_file(tmp_path, monkeypatch):
  config = _parse(
    [
      f'--config={REPO}/configs/synthetic_t.py',
      "--config.data.train_pipeline=(('RandomFlip', {'prob': 1.0}), ('Pad', {'size': (200, 200)}))",
      '--config.data.workers=0',
    ],
    monkeypatch,
  )
  assert config.data.train_pipeline == (('RandomFlip', {'prob': 1.0}), ('Pad', {'size': (200, 200)}))
  config.batch_size = 2
  batch = _first_batch(config)
  # No resize or crop: the whole 128x160 scene, flipped, padded to 200x200.
  src = SyntheticSegmentation(num_samples=4000, num_classes=5, image_size=(128, 160), split='train')
  i = int(batch['index'][0])
  assert batch['image'].shape == (2, 200, 200, 3)
  np.testing.assert_array_equal(batch['label'][0, :128, :160], src[i]['label'][:, ::-1])
  assert (batch['label'][0, 128:] == 255).all()

  cfg_file = tmp_path / 'my_config.py'
  cfg_file.write_text(
    'from configs import synthetic_t\n\n\n'
    'def get_config():\n'
    '  c = synthetic_t.get_config()\n'
    "  c.data.train_pipeline = (('RandomCrop', {'crop_size': (48, 40), 'cat_max_ratio': 1.0}), 'Pad')\n"
    '  return c\n'
  )
  config = _parse([f'--config={cfg_file}', '--config.data.crop_size=(64,64)'], monkeypatch)
  ops = T.build_pipeline(config.data.train_pipeline, input_pipeline.transform_defaults(config))
  assert ops == [T.RandomCrop((48, 40), 1.0, 255), T.Pad((64, 64), 0, 255)]
  # A misspelt field stays an error in the locked config.
  with pytest.raises((AttributeError, KeyError, flags.Error), match='train_pipelin'):
    _parse([f'--config={cfg_file}', '--config.data.train_pipelin=()'], monkeypatch)


# ------------------------------------------------------------ custom data


def test_evaluation_resize_and_padding_are_the_data_fields():
  config = tiny_config()
  ev = input_pipeline.eval_data(config)
  assert {shape[0] for shape in ev.shapes} == {(64, 96)}  # 64x80 scenes at img_scale (80, 64), padded to 32s
  config = with_values(config, **{'data.img_scale': (40, 32), 'data.size_divisor': 16})
  ev = input_pipeline.eval_data(config)
  assert {shape[0] for shape in ev.shapes} == {(32, 48)}  # resized to 32x40, padded to 16s
  (batch,) = list(ev)
  assert (batch['valid_hw'] == [32, 40]).all() and (batch['orig_hw'] == [64, 80]).all()


def test_eval_max_images_is_a_prefix_split_over_processes():
  config = tiny_config(**{'data.eval_max_images': 5, 'eval_batch_size': 2})
  ev = input_pipeline.eval_data(config)
  assert ev.num_samples == 5 and sorted(ev.indices) == [0, 1, 2, 3, 4]
  assert [int(i) for b in ev for i in b['index'] if i >= 0] == ev.indices


def test_custom_split_files_count_palette_and_reduce_zero_label_from_config(tmp_path):
  root = tmp_path / 'd'
  (root / 'img').mkdir(parents=True)
  (root / 'lbl').mkdir()
  (root / 'lists').mkdir()
  for stem in ('a', 'b', 'c'):
    cv2.imwrite(str(root / 'img' / f'{stem}.png'), np.zeros((4, 5, 3), np.uint8))
    write_png(str(root / 'lbl' / f'{stem}_seg.png'), np.full((4, 5), 2), palette=[[9, 9, 9]] * 4)
  (root / 'lists' / 'train.txt').write_text('c\na\n')
  from configs import custom_t

  c = custom_t.get_config()
  c.data.root = str(root)
  for key, value in dict(
    img_dir='img', ann_dir='lbl', img_suffix='.png', seg_map_suffix='_seg.png', split_file='lists/{split}.txt'
  ).items():
    c.data.custom[key] = value
  c.data.custom.num_classes = 2
  c.data.custom.palette = ((1, 2, 3), (4, 5, 6))
  c.data.custom.reduce_zero_label = True
  src, info = sources.make_source('custom', c.data.root, 'train', **input_pipeline.source_kwargs(c, 'train'))
  assert [os.path.basename(p) for p in src.image_paths] == ['c.png', 'a.png']
  assert info.reduce_zero_label and info.class_names == ('class_0', 'class_1')
  np.testing.assert_array_equal(info.palette, [[1, 2, 3], [4, 5, 6]])
  assert input_pipeline.with_dataset_defaults(c).model.num_classes == 2
  np.testing.assert_array_equal(src[0]['label'], 2)  # raw id 2 = class 1 after reduce_zero_label
  c.data.custom.palette = ((1, 2, 3),)
  with pytest.raises(errors.ConfigError, match=r'palette must have shape \(2, 3\)'):
    input_pipeline.dataset_info(c)
