"""Training loop: resume after SIGTERM, SIGTERM during compilation and evaluation,
half-written checkpoints, NaN stop, profiles, and the ADE20K-layout end-to-end
run of main.py (sharding: test_multihost.py)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import jax
import numpy as np
import pytest

from cgrseg_jax import preemption, train
from cgrseg_jax.data.synthetic import SyntheticSegmentation
from train_config import tiny_config, toy_config

from paths import TESTS_DIR

REPO = os.path.dirname(TESTS_DIR)


def _params(result):
  return jax.tree_util.tree_leaves(jax.device_get(result['state'].params))


def test_resume_after_sigterm_is_identical_to_a_straight_run(toy, tmp_path):
  # The toy family (test_checkpointing.py's step, which the session's cache serves): the question is the run.
  config = toy_config(total_steps=5, eval_every=-1, batch_size=2)
  straight_batches = []
  straight = train.train_and_evaluate(
    config, str(tmp_path / 'a'), on_step=lambda s, b: straight_batches.append(b['index'].tolist())
  )
  assert straight['step'] == 5 and straight['status'] == 'done'

  first = []

  def preempt_at_3(step, batch):
    first.append(batch['index'].tolist())
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # a real SIGTERM through the handler

  r1 = train.train_and_evaluate(config, str(tmp_path / 'b'), on_step=preempt_at_3)
  assert (r1['status'], r1['step']) == ('preempted', 3)
  ckpt = tmp_path / 'b' / 'checkpoints'
  assert sorted(os.listdir(ckpt)) == ['3']
  # A half-written step (orbax's temporary name) must not be resumed from.
  (ckpt / '5.orbax-checkpoint-tmp-1234').mkdir()
  (ckpt / '5.orbax-checkpoint-tmp-1234' / 'junk').write_text('partial')

  second = []
  r2 = train.train_and_evaluate(config, str(tmp_path / 'b'), on_step=lambda s, b: second.append(b['index'].tolist()))
  assert (r2['status'], r2['step']) == ('done', 5)
  assert first + second == straight_batches
  for a, b in zip(_params(straight), _params(r2)):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(l) for l in open(tmp_path / 'b' / 'metrics.jsonl')]
  assert [l['step'] for l in lines if l['split'] == 'train'] == [1, 2, 3, 4, 5]
  assert os.path.isfile(tmp_path / 'b' / 'config.json')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'b' / 'tb'))


def test_sigterm_during_compilation_stops_at_once_and_keeps_the_checkpoint(toy, tmp_path, monkeypatch):
  work = str(tmp_path)
  first = train.train_and_evaluate(tiny_config(total_steps=2, eval_every=-1, checkpoint_every=2, **toy), work)
  assert first['step'] == 2
  # The resumed run's compile takes "forever"; SIGTERM arrives 0.5 s into it.
  original = preemption.Preemption.compile
  sent = {}

  def slow_compile(self, fn, name='step'):
    def send():
      sent['at'] = time.time()
      os.kill(os.getpid(), signal.SIGTERM)

    threading.Timer(0.5, send).start()
    return original(self, threading.Event().wait, name)  # never returns

  monkeypatch.setattr(preemption.Preemption, 'compile', slow_compile)
  result = train.train_and_evaluate(tiny_config(total_steps=4, eval_every=-1, checkpoint_every=2, **toy), work)
  assert time.time() - sent['at'] < 5
  assert (result['status'], result['step']) == ('preempted', 2)
  assert os.listdir(tmp_path / 'checkpoints') == ['2']  # nothing new: nothing saved, nothing lost


def test_sigterm_during_evaluation_stops_it_and_saves_the_step(toy, tmp_path, monkeypatch):
  checks = []
  original = preemption.Preemption.check
  monkeypatch.setattr(preemption.Preemption, 'check', lambda self: (checks.append(self.boundary), original(self)))

  def sigterm_at_2(step, batch):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # right before the evaluation of step 2

  # 8 val images in batches of 2: the evaluation has 4 batches, it stops after the first.
  config = tiny_config(total_steps=4, eval_every=2, eval_batch_size=2, **toy)
  result = train.train_and_evaluate(config, str(tmp_path), on_step=sigterm_at_2)
  assert (result['status'], result['step'], result['val']) == ('preempted', 2, None)
  # step 1's boundary, then the first batch of step 2's evaluation (step 2's own boundary follows it)
  assert checks == [0, 1]
  assert os.listdir(tmp_path / 'checkpoints') == ['2']
  assert [r['split'] for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))] == ['train', 'train']


def test_profile_steps_write_a_trace_with_step_annotations(toy, tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=3, eval_every=-1, profile_steps=(1, 1), **toy), str(tmp_path))
  traces = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / 'profile') for f in fs if f.endswith('.xplane.pb')]
  assert len(traces) == 1
  data = open(traces[0], 'rb').read()
  assert b'step_num' in data and b'train' in data  # StepTraceAnnotation('train', step_num=...)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toy, tmp_path):
  # lr 1e38: the first update overflows the parameters, the second loss is not finite.
  config = toy_config(total_steps=4, eval_every=-1, batch_size=2, checkpoint_every=1, **{'optimizer.lr': 1e38})
  with pytest.raises(FloatingPointError, match='at step 2'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']


def test_ade20k_layout_end_to_end(tmp_path):
  """main.py with configs/ade20k_t.py on synthetic data written as ADEChallengeData2016."""
  root = tmp_path / 'ADEChallengeData2016'
  for split, n in (('train', 4), ('val', 2)):
    SyntheticSegmentation(num_samples=n, num_classes=6, image_size=(64, 96), split=split).write_ade20k_layout(str(root))
  work = tmp_path / 'work'
  flags = [
    f'--config.data.root={root}',
    '--config.model.name=cgrseg_tiny',
    '--config.batch_size=2',
    '--config.total_steps=2',
    '--config.data.crop_size=(64,64)',
    '--config.data.img_scale=(96,64)',
    '--config.data.workers=0',
    '--config.eval_batch_size=2',
    '--config.log_every=1',
    '--config.eval_every=0',
    '--config.checkpoint_every=0',
    '--config.schedule.warmup_steps=1',
  ]
  env = dict(os.environ, PYTHONPATH=REPO)
  run = subprocess.run(
    [sys.executable, 'main.py', '--config=configs/ade20k_t.py', f'--workdir={work}', *flags],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-4000:]
  records = [json.loads(l) for l in open(work / 'metrics.jsonl')]
  val = [r for r in records if r['split'] == 'val']
  assert len(val) == 1 and val[0]['step'] == 2
  assert len(val[0]['per_class']) == 150 and 'wall' in val[0]['per_class']
  assert 0.0 <= val[0]['aAcc'] <= 1.0
  assert os.path.isdir(work / 'checkpoints' / '2')
  assert 'Summary: aAcc' in run.stderr and 'Most confused with' in run.stderr
  # The evaluation's report: the 150-class confusion matrix of every valid val pixel, the 2 worst images.
  report = work / 'eval' / '2'
  confusion = json.load(open(report / 'confusion.json'))
  counts = np.asarray(confusion['counts'])
  assert counts.shape == (150, 150) and confusion['class_names'][0] == 'wall'
  labels = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((root / 'annotations' / 'validation').iterdir())]
  assert counts.sum() == sum(int((l > 0).sum()) for l in labels)  # reduce_zero_label: 0 is ignored
  np.testing.assert_allclose(np.asarray(confusion['rates']).sum(1)[counts.sum(1) > 0], 1.0, atol=1e-5)
  worst = json.load(open(report / 'worst.json'))
  assert [w['rank'] for w in worst] == [1, 2] and worst[0]['mIoU'] <= worst[1]['mIoU']
  assert {w['id'] for w in worst} == {p.name for p in (root / 'images' / 'validation').iterdir()}
  for w in worst:
    png = cv2.imread(str(report / f'worst_{w["rank"]:02d}_{w["index"]}.png'))
    assert png.shape[0] == 256 + 2 * 22 and png.shape[1] == 4 * round(96 * 256 / 64)
  assert cv2.imread(str(report / 'confusion.png')) is not None

  # A typo in a config override is an error (locked config).
  bad = subprocess.run(
    [sys.executable, 'main.py', '--config=configs/ade20k_t.py', f'--workdir={work}', '--config.optimizer.lrr=1'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and 'lrr' in bad.stderr
