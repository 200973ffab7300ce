"""The dataset registry (data/datasets.py): a toy dataset is one entry + one
config, every config takes its numbers from the entries, class lists and
palettes, and the missing-data message says where and how."""

import os

import cv2
import numpy as np
import pytest

from cgrseg_jax import errors
from cgrseg_jax.data import classes, datasets, input_pipeline, sources
from cgrseg_jax.data.synthetic import SyntheticSegmentation


def _first_batch(config):
  return next(input_pipeline.train_iterator(config))


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
  ev = input_pipeline.eval_data(config)
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


def test_class_lists_and_palettes():
  sizes = {'ade20k': 150, 'coco_stuff164k': 171, 'pascal_context59': 59, 'cityscapes': 19}
  for name, n in sizes.items():
    info = datasets.get(name)
    assert info.num_classes == n and len(info.class_names) == n and len(set(info.class_names)) == n
    assert info.palette.shape == (n, 3) and info.palette.dtype == np.uint8
    assert len({tuple(c) for c in info.palette.tolist()}) == n
    assert info.ignore_index == 255
  assert datasets.get('ade20k').class_names[:3] == ('wall', 'building', 'sky')
  assert datasets.get('cityscapes').class_names[-1] == 'bicycle'
  np.testing.assert_array_equal(datasets.get('cityscapes').palette[0], [128, 64, 128])  # road
  # VOC colour map: class 1 = (128, 0, 0), 2 = (0, 128, 0), 3 = (128, 128, 0)
  np.testing.assert_array_equal(classes.voc_colormap(4)[1:], [[128, 0, 0], [0, 128, 0], [128, 128, 0]])
  assert datasets.synthetic_info(4).class_names == ('background', 'shape_1', 'shape_2', 'shape_3')
  # aliases are the same entry
  assert datasets.get('pascal_context') is datasets.get('pascal_context59')
  assert datasets.get('scene_parse150') is datasets.get('tfds_ade20k')


def test_for_model_keeps_the_entry_or_generates_names_for_another_class_count():
  assert datasets.for_model('cityscapes', 19) is datasets.get('cityscapes')
  other = datasets.for_model('ade20k', 19)
  assert other.class_names == tuple(f'class_{i}' for i in range(19)) and other.palette.shape == (19, 3)
  assert (other.img_scale, other.ignore_index) == (datasets.get('ade20k').img_scale, 255)
  assert datasets.for_model('synthetic', 3).class_names == ('background', 'shape_1', 'shape_2')
  assert datasets.for_model('synthetic', 3).palette.shape == (3, 3)
  assert datasets.synthetic_info(12).palette.shape == (12, 3)
  with pytest.raises(errors.ConfigError, match="unknown dataset 'nope'"):
    datasets.for_model('nope', 3)
  # every registered source kind has a reader
  assert {info.source for info in datasets.DATASETS.values()} <= set(sources.SOURCES)
