"""Your own data (README "Your own data") trained and evaluated through the
training code path: palette label PNGs, class names from the config."""

import json

import cv2
import numpy as np
import pytest

from cgrseg_jax import errors, train
from cgrseg_jax.data import input_pipeline, sources
from cgrseg_jax.data.synthetic import SyntheticSegmentation
from png_files import write_png
from train_config import tiny_config, toy_config, with_values


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


def test_custom_dataset_trains_and_evaluates_through_the_main_code_path(toy, tmp_path):
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
  tiny = toy_config().model  # the toy model: the question is the data path; whatever the model fields are called
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
  src, info = sources.make_source('custom', c.data.root, 'val', **input_pipeline.source_kwargs(c, 'val'))
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
    input_pipeline.with_dataset_defaults(with_values(c, **{'model.num_classes': 5}))
  with pytest.raises(errors.ConfigError, match='needs config.data.custom.img_dir'):
    input_pipeline.source_kwargs(with_values(tiny_config(), **{'data.dataset': 'custom'}), 'train')
