"""ArrayRecord shards (data/shards.py, scripts/write_shards.py): the records are the
original files, the manifest's hashes are those of the shard files, and the same
config trains and evaluates on identical batches from folders or from shards."""

import hashlib
import json

import grain
import msgpack
import numpy as np
import pytest

from cgrseg_jax import errors
from cgrseg_jax.data import input_pipeline, shards, sources
from cgrseg_jax.data.synthetic import SyntheticSegmentation
from train_config import tiny_config, with_values


@pytest.fixture(scope='module')
def folder_config(tmp_path_factory):
  """A custom dataset on disk: JPEG images, ADE-style labels (id + 1, 0 = other)."""
  root = tmp_path_factory.mktemp('folders')
  for split, n in (('train', 40), ('val', 6)):
    SyntheticSegmentation(num_samples=n, num_classes=5, image_size=(48, 64), split=split, seed=3).write_ade20k_layout(
      str(root), split_dir=split
    )
  return tiny_config(**{
    'data.dataset': 'custom', 'data.root': str(root), 'data.custom.img_dir': 'images/{split}',
    'data.custom.ann_dir': 'annotations/{split}', 'data.custom.num_classes': 5,
    'data.custom.reduce_zero_label': True, 'model.num_classes': 5, 'data.workers': 0,
    'data.img_scale': (64, 48), 'data.crop_size': (32, 32), 'batch_size': 4, 'eval_batch_size': 2,
  })  # fmt: skip


@pytest.fixture(scope='module')
def shard_dir(folder_config, tmp_path_factory):
  out = tmp_path_factory.mktemp('shards')
  input_pipeline.write_shards(folder_config, str(out), num_shards=3)
  return out


def test_manifest_counts_hashes_and_original_bytes(folder_config, shard_dir):
  m = json.loads((shard_dir / 'train' / 'manifest.json').read_text())
  assert m['count'] == 40 and [s['count'] for s in m['shards']] == [13, 13, 14]
  assert m['num_classes'] == 5 and len(m['sizes']) == 40
  for s in m['shards']:
    assert s['sha256'] == hashlib.sha256((shard_dir / 'train' / s['file']).read_bytes()).hexdigest()
  # Record 20 read with grain and msgpack directly: the image and label files' own bytes.
  files = [str(shard_dir / 'train' / s['file']) for s in m['shards']]
  record = msgpack.unpackb(grain.sources.ArrayRecordDataSource(files)[20], raw=False)
  root = folder_config.data.root
  stem = 'synthetic_train_00000020'
  assert record['id'] == f'{stem}.jpg'
  assert record['image'] == open(f'{root}/images/train/{stem}.jpg', 'rb').read()
  assert record['label'] == open(f'{root}/annotations/train/{stem}.png', 'rb').read()


@pytest.mark.parametrize('processes', [1, 2])
def test_train_batches_identical_from_folders_and_shards(folder_config, shard_dir, processes):
  folders = with_values(folder_config, **{'data.emulate_process_count': processes})
  sharded = with_values(folders, **{'data.shards': str(shard_dir)})
  a, b = input_pipeline.train_iterator(folders), input_pipeline.train_iterator(sharded)
  for _ in range(12):  # past one epoch (40 samples / batch 4 = 10 steps): the reshuffle too
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_eval_batches_identical_from_folders_and_shards(folder_config, shard_dir):
  a = list(input_pipeline.eval_data(folder_config).dataset)
  b = list(input_pipeline.eval_data(with_values(folder_config, **{'data.shards': str(shard_dir)})).dataset)
  assert len(a) == len(b) == 3
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_array_sources_round_trip_losslessly(tmp_path):
  config = tiny_config(**{'data.synthetic.num_train': 6, 'data.synthetic.num_val': 2})
  input_pipeline.write_shards(config, str(tmp_path), num_shards=2, kinds=('val',))
  source, info = input_pipeline.sharded_source(with_values(config, **{'data.shards': str(tmp_path)}), 'val')
  reference, _ = sources.make_source('synthetic', None, 'val', **input_pipeline.source_kwargs(config, 'val'))
  for i in range(2):
    np.testing.assert_array_equal(source[i]['image'], reference[i]['image'])
    np.testing.assert_array_equal(source[i]['label'], reference[i]['label'])
  assert info.num_classes == config.data.synthetic.num_classes


def test_bad_shard_folders_are_named(folder_config, shard_dir, tmp_path):
  with pytest.raises(errors.DataError, match=r'no manifest\.json'):
    input_pipeline.train_iterator(with_values(folder_config, **{'data.shards': str(tmp_path)}))
  other = with_values(
    folder_config, **{'data.custom.num_classes': 6, 'model.num_classes': 6, 'data.shards': str(shard_dir)}
  )
  with pytest.raises(errors.DataError, match='with 5 classes .* with 6 classes'):
    input_pipeline.train_iterator(other)
  m = json.loads((shard_dir / 'val' / 'manifest.json').read_text())
  bad = tmp_path / 'cut'
  (bad / 'val').mkdir(parents=True)
  (bad / 'val' / 'manifest.json').write_text(json.dumps(dict(m, count=m['count'] + 1)))
  for s in m['shards']:
    (bad / 'val' / s['file']).write_bytes((shard_dir / 'val' / s['file']).read_bytes())
  with pytest.raises(errors.DataError, match='the manifest says 7'):
    shards.ShardSource(bad / 'val', input_pipeline.dataset_info(folder_config))
