"""The 'segmenter' evaluator (evaluation/segmenter.py): its metric against an
IoU computed here from the same predictions, the options it reads from
config.eval, and the evaluator table's 'auto' choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax import convert, errors, evaluation
from cgrseg_jax.evaluation import segmenter as segmenter_eval
from cgrseg_jax.inference import Segmenter
from cgrseg_jax.models import build_model
from cgrseg_jax.torch_reference import cgrseg as ref
from train_config import tiny_config

K = 5


@pytest.fixture(scope='module')
def segmenter():
  model = build_model('cgrseg_tiny', K)
  # Random weights converted from the reference: no init program to compile.
  state = ref.randomize_(ref.build_torch_segmentor('tiny', K), seed=0).state_dict()
  variables, _ = convert.state_dict_to_variables(state, 'tiny', K)
  return Segmenter(model, jax.tree_util.tree_map(jnp.asarray, variables), dataset='synthetic', img_scale=(96, 64))


def test_metrics_match_an_iou_computed_from_the_predictions(segmenter):
  rng = np.random.default_rng(70)
  records = []
  for hw in [(40, 60), (44, 64), (40, 60)]:  # one input bucket
    label = rng.integers(0, K + 1, hw).astype(np.uint8)  # 0 = 'other' before reduce_zero_label
    label[:5] = 255
    records.append({'image': rng.integers(0, 256, (*hw, 3), dtype=np.uint8), 'label': label})
  tta = dict(scales=(1.0,), flip=True)  # two views averaged
  metrics = segmenter_eval.evaluate_segmenter(
    segmenter, records, num_classes=K, reduce_zero_label=True, ignore_index=255, tta=tta, batch_size=2
  )
  inter, union = np.zeros(K), np.zeros(K)
  correct = labelled = 0
  for rec in records:
    pred = segmenter.predict(rec['image'][..., ::-1], tta=tta)
    gt = rec['label'].astype(np.int64) - 1  # reduce_zero_label: 0 -> ignored, k -> k - 1, 255 -> ignored
    ok = (gt >= 0) & (gt < K)
    correct += np.sum(pred[ok] == gt[ok])
    labelled += ok.sum()
    for c in range(K):
      p, g = (pred == c) & ok, (gt == c) & ok
      inter[c] += np.sum(p & g)
      union[c] += np.sum(p | g)
  with np.errstate(invalid='ignore', divide='ignore'):
    want_miou = np.nanmean(inter / union)
  assert metrics['aAcc'] == pytest.approx(correct / labelled)
  assert metrics['mIoU'] == pytest.approx(want_miou)
  assert metrics['eval_images'] == 3
  np.testing.assert_array_equal(np.diag(metrics['confusion']), inter)
  assert sorted(metrics['image_miou']) == [0, 1, 2]


def test_options_and_the_auto_choice_follow_config_eval():
  c = tiny_config()
  assert segmenter_eval.options(c) == dict(mode='whole', crop_size=(512, 512), stride=(341, 341), tta=None)
  assert evaluation.evaluator_name(c) == 'bucketed'
  with c.unlocked():
    c.eval.tta.scales = (0.5, 1.0)
    c.eval.tta.flip = True
  assert segmenter_eval.options(c)['tta'] == dict(scales=(0.5, 1.0), flip=True)
  assert evaluation.evaluator_name(c) == 'segmenter'
  with c.unlocked():
    c.eval.tta.scales = ()
    c.eval.tta.flip = False
    c.eval.mode = 'slide'
    c.eval.crop_size = (64, 64)
    c.eval.stride = (32, 32)
  assert segmenter_eval.options(c) == dict(mode='slide', crop_size=(64, 64), stride=(32, 32), tta=None)
  assert evaluation.evaluator_name(c) == 'segmenter'
  with c.unlocked():
    c.eval.evaluator = 'bucketed'
  assert evaluation.evaluator_name(c) == 'bucketed'  # an explicit choice stands
  with c.unlocked():
    c.eval.evaluator = 'nope'
  with pytest.raises(errors.ConfigError, match="evaluator='nope'; expected auto or one of"):
    evaluation.evaluator_name(c)


def test_both_evaluators_read_the_same_images(segmenter):
  c = tiny_config(**{'data.eval_max_images': 5, 'eval.mode': 'slide', 'eval.crop_size': (64, 64)})
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  tta = evaluation.EVALUATORS['segmenter'](c, segmenter.model, mesh)
  bucketed = evaluation.EVALUATORS['bucketed'](c, segmenter.model, mesh)
  assert sorted(tta.data.indices) == sorted(bucketed.data.indices) == [0, 1, 2, 3, 4]
