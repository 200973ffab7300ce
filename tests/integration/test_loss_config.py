"""A training run whose config.loss is a list of weighted entries, with 'auto' class weights."""

import json

import numpy as np

from cgrseg_jax import train
from cgrseg_jax.data import class_stats
from train_config import toy_config


def test_training_with_a_list_loss_spec_and_auto_class_weights(toy, tmp_path):
  spec = [
    ('cross_entropy', 1.0, {'class_weight': 'auto', 'class_weight_method': 'enet'}),
    ('dice', 0.5),
    ('lovasz', 0.5),
  ]
  config = toy_config(loss=spec, total_steps=2, eval_every=-1, batch_size=2)
  result = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert (result['status'], result['step']) == ('done', 2)
  records = [json.loads(line) for line in open(tmp_path / 'work' / 'metrics.jsonl')]
  values = [r['loss'] for r in records if 'loss' in r]
  assert len(values) == 2 and np.all(np.isfinite(values))
  cached = json.loads((tmp_path / 'work' / class_stats.HISTOGRAM_FILE).read_text())
  assert cached['source']['dataset'] == 'synthetic' and cached['source']['images'] == 64
