"""Datasets and transforms from the config: the dataset registry (a toy dataset
is one entry + one config), custom data trained and evaluated through the
training code path, transform lists from the command line / a config file,
missing-data messages, and mmcv-exact normalisation."""

import dataclasses
import json
import os
import sys

import cv2
import grain
import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from cgrseg_jax import batches, errors, train
from cgrseg_jax.data import datasets, sources
from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.data import transforms as T
from cgrseg_jax.data.synthetic import SyntheticSegmentation
from png_files import write_png
from train_config import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------- normalisation


def _mmcv_imnormalize_ops(image_bgr):
  """The OpenCV calls of mmcv 1.x ``imnormalize`` (mmseg 0.27 Normalize):
  float32 copy, BGR->RGB, cv2.subtract / cv2.multiply with float64 (1, 3)
  arrays of the mean and of 1 / std."""
  img = image_bgr.astype(np.float32)
  mean = np.asarray(T.MEAN_RGB, np.float64).reshape(1, -1)
  inv = 1.0 / np.asarray(T.STD_RGB, np.float64).reshape(1, -1)
  img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  cv2.subtract(img, mean, img)
  cv2.multiply(img, inv, img)
  return img


def _all_values_image():
  # 16x16 pixels; channel c of pixel k holds (k + 85 c) % 256: every uint8
  # value in every channel.
  k = np.arange(256).reshape(16, 16, 1)
  return ((k + 85 * np.arange(3)) % 256).astype(np.uint8)


def test_normalisation_bit_exact_with_mmcv_on_all_values():
  image = _all_values_image()
  ref = _mmcv_imnormalize_ops(image)
  # The same numbers written as a formula: float32 subtraction of the
  # float32 mean, division by std in float64, rounded to float32.
  rgb = image[..., ::-1].astype(np.float32)
  formula = ((rgb - np.float32(T.MEAN_RGB)).astype(np.float64) / np.asarray(T.STD_RGB)).astype(np.float32)
  np.testing.assert_array_equal(formula, ref)
  np.testing.assert_array_equal(T.normalize_numpy(image), ref)
  out = np.asarray(jax.jit(dp.normalize_image)(image[None], np.array([[16, 16]], np.int32)))[0]
  np.testing.assert_array_equal(out, ref)
  # The previous float32 multiply by float32(1 / std) is not this (the test can fail).
  old = (rgb - np.float32(T.MEAN_RGB)) * (1.0 / np.asarray(T.STD_RGB)).astype(np.float32)
  assert not np.array_equal(old, ref)
  # Padding stays exactly 0, the inside is unchanged.
  padded = np.asarray(dp.normalize_image(image[None], np.array([[9, 5]], np.int32)))[0]
  np.testing.assert_array_equal(padded[:9, :5], ref[:9, :5])
  assert not padded[9:].any() and not padded[:, 5:].any()
  assert np.signbit(padded[9:]).sum() == 0  # +0.0, as mmseg's zero padding


# ------------------------------------------------------------- transforms


def test_default_pipeline_resolves_to_the_mmseg_transforms():
  data = {'img_scale': (2048, 512), 'crop_size': (512, 512), 'ignore_index': 255, 'size_divisor': 32}
  ops = T.build_pipeline(T.DEFAULT_TRAIN_PIPELINE, data)
  assert ops == [
    T.RandomResize((2048, 512), (0.5, 2.0)),
    T.RandomCrop((512, 512), 0.75, 255),
    T.RandomFlip(0.5),
    T.PhotoMetricDistortion(32, (0.5, 1.5), (0.5, 1.5), 18),
    T.Pad((512, 512), 0, 255),
  ]
  assert T.build_pipeline(T.DEFAULT_TEST_PIPELINE, data) == [T.Resize((2048, 512)), T.PadToMultiple(32, 0, 255)]
  # An entry's own arguments win over the data values; lists become tuples.
  (op,) = T.build_pipeline([['RandomCrop', {'crop_size': [8, 9]}]], data)
  assert op == T.RandomCrop((8, 9), 0.75, 255)
  with pytest.raises(errors.ConfigError, match="unknown transform 'Blurr'"):
    T.build_pipeline([('Blurr', {})], data)
  with pytest.raises(errors.ConfigError, match=r"'RandomFlip' has no argument\(s\) \['p'\]"):
    T.build_pipeline([('RandomFlip', {'p': 0.2})], data)


@T.register
@dataclasses.dataclass(frozen=True)
class InvertForTest(grain.transforms.Map):
  """A new augmentation: one class (+ one config entry below)."""

  def map(self, element):
    return dict(element, image=255 - element['image'])


def _first_batch(config):
  it = batches.train_iterator(config)
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
  ops = T.build_pipeline(config.data.train_pipeline, batches.transform_defaults(config))
  assert ops == [T.RandomCrop((48, 40), 1.0, 255), T.Pad((64, 64), 0, 255)]
  # A misspelt field stays an error in the locked config.
  with pytest.raises((AttributeError, KeyError, flags.Error), match='train_pipelin'):
    _parse([f'--config={cfg_file}', '--config.data.train_pipelin=()'], monkeypatch)


# --------------------------------------------------------------- datasets

# A toy dataset: the registry entry and the config below are all it takes.
TOY_ENTRY = """
datasets.register(datasets.DatasetInfo(
  'toy', 3, True, img_scale=(80, 64), crop_size=(48, 48), class_names=('sky', 'grass', 'cow'),
  layout=datasets.Layout('pics/{split}', 'masks/{split}', '.png', '_mask.png', splits={'train': 'tr', 'val': 'va'}),
  default_root=ROOT), replace=True)
"""
TOY_CONFIG = """
def get_config():
  return default.get_config('toy')
"""


@pytest.fixture
def toy_dataset(tmp_path):
  root = tmp_path / 'toy'
  for split, n in (('tr', 6), ('va', 3)):
    syn = SyntheticSegmentation(num_samples=n, num_classes=3, image_size=(64, 80), seed=len(split) + n, split='train')
    (root / 'pics' / split).mkdir(parents=True)
    (root / 'masks' / split).mkdir(parents=True)
    for i in range(n):
      rec = syn[i]
      cv2.imwrite(str(root / 'pics' / split / f'{i:03d}.png'), rec['image'])
      cv2.imwrite(str(root / 'masks' / split / f'{i:03d}_mask.png'), rec['label'] + 1)  # 0 = 'other'
  namespace = {'datasets': datasets, 'ROOT': str(root)}
  exec(TOY_ENTRY, namespace)  # noqa: S102  (the entry exactly as a user writes it)
  from configs import default

  config_ns = {'default': default}
  exec(TOY_CONFIG, config_ns)  # noqa: S102
  yield root, config_ns['get_config']
  datasets.DATASETS.pop('toy')


def test_toy_dataset_is_one_registry_entry_and_one_config(toy_dataset):
  root, get_config = toy_dataset
  config = get_config()
  assert (config.data.root, config.model.num_classes, config.data.crop_size) == (str(root), 3, (48, 48))
  config.data.workers = 0
  config.batch_size = 2
  config.eval_batch_size = 3
  batch = _first_batch(config)
  assert batch['image'].shape == (2, 48, 48, 3)
  assert set(np.unique(batch['label'])) <= {0, 1, 2, 255}
  ev = batches.eval_data(config)
  assert ev.info.class_names == ('sky', 'grass', 'cow') and ev.num_samples == 3
  (b,) = list(ev)
  assert (b['valid_hw'] == [64, 80]).all()  # test scale (80, 64) from the registry
  lines = [l for l in (TOY_ENTRY + TOY_CONFIG).strip().splitlines() if l.strip()]
  assert len(lines) == 6


def test_missing_dataset_says_where_and_how(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(errors.DataError) as e:
    sources.make_source('cityscapes')  # the default root: data/cityscapes
  text = str(e.value)
  assert text.startswith('data/cityscapes/leftImg8bit/train: image directory does not exist')
  assert str(tmp_path / 'data' / 'cityscapes') in text
  assert '<root>/leftImg8bit/{split}/*_leftImg8bit.png' in text and '_gtFine_labelTrainIds.png' in text
  assert 'cityscapes-dataset.com' in text and 'python scripts/convert_dataset.py cityscapes' in text
  assert '`make demo`' in text and 'needs no download' in text
  # An incomplete dataset (a label missing) gets the same hint.
  root = tmp_path / 'ade'
  SyntheticSegmentation(num_samples=2, num_classes=4, image_size=(16, 16)).write_ade20k_layout(str(root))
  os.remove(root / 'annotations' / 'training' / 'synthetic_train_00000001.png')
  with pytest.raises(errors.DataError, match=r'(?s)00000001.png: label file .* is missing.*ADEChallengeData2016.zip'):
    sources.make_source('ade20k', str(root))


def test_every_config_takes_its_numbers_from_the_registry():
  from configs import cityscapes_t, coco_stuff10k_t, pascal_context59_t

  for module, name in (
    (cityscapes_t, 'cityscapes'),
    (coco_stuff10k_t, 'coco_stuff10k'),
    (pascal_context59_t, 'pascal_context59'),
  ):
    c, info = module.get_config(), datasets.get(name)
    assert (c.data.dataset, c.model.num_classes, c.data.img_scale, c.data.crop_size, c.data.root) == (
      name,
      info.num_classes,
      info.img_scale,
      info.crop_size,
      info.default_root,
    )
  assert datasets.get('pascal_context59').default_root == 'data/VOCdevkit/VOC2010'
  assert datasets.get('ade20k').default_root == 'data/ade/ADEChallengeData2016'


# ------------------------------------------------------------ custom data


def _write_custom_tree(root, classes=3):
  """images/{train,val}/*.jpg and palette-mode annotations/{train,val}/*.png."""
  palette = np.array([[0, 0, 0], [220, 20, 60], [0, 128, 0], [70, 70, 70]], np.uint8)
  written = {}
  for split, n in (('train', 4), ('val', 2)):
    syn = SyntheticSegmentation(num_samples=n, num_classes=classes, image_size=(64, 80), split=split)
    (root / 'images' / split).mkdir(parents=True)
    (root / 'annotations' / split).mkdir(parents=True)
    for i in range(n):
      rec = syn[i]
      cv2.imwrite(str(root / 'images' / split / f'img{i}.jpg'), rec['image'])
      write_png(str(root / 'annotations' / split / f'img{i}.png'), rec['label'], palette=palette)
      written[(split, i)] = rec['label']
  return written


def test_custom_dataset_trains_and_evaluates_through_the_main_code_path(tmp_path):
  root = tmp_path / 'my_data'
  written = _write_custom_tree(root)
  from configs import custom_t

  c = custom_t.get_config()
  c.data.root = str(root)
  c.data.custom.img_dir = 'images/{split}'
  c.data.custom.ann_dir = 'annotations/{split}'
  c.data.custom.class_names = ('background', 'disc', 'box')
  c.data.img_scale = (80, 64)
  c.data.crop_size = (64, 64)
  c.data.workers = 0
  tiny = tiny_config().model  # the test-sized model, whatever the model fields are called
  for key in tiny:
    if key != 'num_classes':
      c.model[key] = tiny[key]
  c.batch_size = 2
  c.eval_batch_size = 2
  c.total_steps = 2
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 0
  c.progress_bar = False
  c.schedule.warmup_steps = 0
  c.lock()
  assert c.model.num_classes is None  # taken from the class names
  # The palette labels are read as their indices.
  src, info = sources.make_source('custom', c.data.root, 'val', **batches.source_kwargs(c, 'val'))
  np.testing.assert_array_equal(src[1]['label'], written[('val', 1)])
  assert info.class_names == ('background', 'disc', 'box')

  work = tmp_path / 'work'
  result = train.train_and_evaluate(c, str(work))
  assert result['step'] == 2 and result['status'] == 'done'
  records = [json.loads(l) for l in open(work / 'metrics.jsonl')]
  (val,) = [r for r in records if r['split'] == 'val']
  assert sorted(val['per_class']) == ['background', 'box', 'disc']
  assert 0.0 <= val['aAcc'] <= 1.0
  saved = json.load(open(work / 'config.json'))
  assert saved['model']['num_classes'] == 3

  # A model class count that disagrees with the class names is an error, and
  # custom without directories says what to set.
  with pytest.raises(errors.ConfigError, match=r"model.num_classes=5 but dataset 'custom' has 3 classes"):
    batches.with_dataset_defaults(_with(c, **{'model.num_classes': 5}))
  with pytest.raises(errors.ConfigError, match='needs config.data.custom.img_dir'):
    batches.source_kwargs(_with(tiny_config(), **{'data.dataset': 'custom'}), 'train')


def _with(config, **values):
  config = config.copy_and_resolve_references()
  for key, value in values.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def test_test_pipeline_sets_the_evaluation_resize_and_padding():
  config = tiny_config()
  assert batches.eval_resize_and_padding(config) == ((80, 64), 32)
  config = _with(
    config, **{'data.test_pipeline': (('Resize', {'img_scale': (40, 32)}), ('PadToMultiple', {'size_divisor': 16}))}
  )
  assert batches.eval_resize_and_padding(config) == ((40, 32), 16)
  ev = batches.eval_data(config)
  assert {shape[0] for shape in ev.shapes} == {(32, 48)}  # 64x80 scenes resized to 32x40, padded to 16s
  config = _with(config, **{'data.test_pipeline': (('Resize', {}), ('RandomFlip', {}))})
  with pytest.raises(errors.ConfigError, match='supports Resize and PadToMultiple, not RandomFlip'):
    batches.eval_data(config)


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
  src, info = sources.make_source('custom', c.data.root, 'train', **batches.source_kwargs(c, 'train'))
  assert [os.path.basename(p) for p in src.image_paths] == ['c.png', 'a.png']
  assert info.reduce_zero_label and info.class_names == ('class_0', 'class_1')
  np.testing.assert_array_equal(info.palette, [[1, 2, 3], [4, 5, 6]])
  assert batches.with_dataset_defaults(c).model.num_classes == 2
  np.testing.assert_array_equal(src[0]['label'], 2)  # raw id 2 = class 1 after reduce_zero_label
  c.data.custom.palette = ((1, 2, 3),)
  with pytest.raises(errors.ConfigError, match=r'palette must have shape \(2, 3\)'):
    batches.dataset_info(c)


def test_csfcn_transforms_are_registered_by_name():
  from cgrseg_jax.data import torchvision_transforms as TV

  camvid = (
    ('RandomSideScale', {'size_range': (480, 1920), 'side': 'long', 'round_half_up': True}),
    ('RandomPadCrop', {'crop_size': (720, 960)}),
    ('RandomFlip', {}),
    ('ColorJitter', {'brightness': 0.3, 'contrast': 0.3, 'saturation': 0.3, 'hue': 0.1}),
  )
  ops = T.build_pipeline(camvid)
  assert ops[0] == TV.RandomSideScale((480, 1920), 'long', True)
  assert isinstance(ops[1], TV.RandomPadCrop) and ops[1].crop_size == (720, 960)
  assert ops[3] == TV.ColorJitter(0.3, 0.3, 0.3, 0.1)
  assert 'RandomGaussianBlur' in T.TRANSFORMS
