"""Gradient accumulation and EMA in train.py: 4 micro-batches of 4 make the
update of one batch of 16; the EMA equals its closed form; a run stopped (SIGTERM)
or killed (SIGKILL) inside an accumulation resumes bit-identically, EMA included;
evaluations report the raw and the EMA weights, and `<run>:ema` loads the latter."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cgrseg_jax import evaluation, loader, losses, optim, train
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.models import registry
from train_config import toy_config

from paths import TESTS_DIR

pytestmark = pytest.mark.usefixtures('toy')

# 3 optimizer steps of 2 batches of 2, EMA on, evaluated at the end.
RUN = {'total_steps': 3, 'grad_accum_steps': 2, 'ema_decay': 0.8, 'batch_size': 2, 'eval_every': 0}


def _leaves(tree):
  return [np.asarray(v) for v in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _assert_same(a, b):
  a, b = _leaves(a), _leaves(b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def _stepper(config):
  """(jitted train.train_step of `config`, a fresh TrainState, batches of its iterator)."""
  config = input_pipeline.with_dataset_defaults(config)
  model = registry.build_from_config(config)
  variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32)))
  tx = optim.build_optimizer_from_config(variables['params'], config)

  loss = losses.build_loss('cross_entropy', config, 255)
  step = jax.jit(
    lambda s, b: train.train_step(
      s, b, model=model, tx=tx, dtype=np.float32, method='logits', loss=loss, ema_decay=config.ema_decay
    )
  )
  f32 = lambda t: jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), t)
  state = train.TrainState(
    step=np.zeros([], np.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
    rng=jax.random.PRNGKey(1),
    ema=f32(variables) if config.ema_decay else None,
  )
  return step, state, input_pipeline.train_iterator(config)


def _device_batch(local, rows=slice(None)):
  return {k: np.asarray(local[k])[rows] for k in ('image', 'label', 'valid_hw')}


def test_four_micro_batches_of_four_make_the_update_of_one_batch_of_sixteen():
  # BatchNorm on running statistics (toy_frozen_bn): then the batch-16 gradient is the mean of the four.
  common = {'model.name': 'toy_frozen_bn', 'total_steps': 10, 'schedule.warmup_steps': 4, 'optimizer.lr': 1e-2}
  full_step, full, it = _stepper(toy_config(**common, batch_size=16))
  micro_step, micro, _ = _stepper(toy_config(**common, batch_size=4, grad_accum_steps=4))
  for _ in range(2):  # two optimizer steps: the second one reads a schedule that counted one
    batch = _device_batch(next(it))
    full, _ = full_step(full, batch)
    for i in range(4):
      before = micro.params
      micro, _ = micro_step(micro, _device_batch(batch, slice(4 * i, 4 * i + 4)))
      if i < 3:  # no update until the fourth micro-batch
        _assert_same(micro.params, before)
    for a, b in zip(_leaves(micro.params), _leaves(full.params)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert int(micro.step) == 8 and int(full.step) == 2
  # The inner optimizer (its lr schedule's count) stepped twice, not eight times.
  assert int(micro.opt_state.gradient_step) == 2
  assert int(micro.opt_state.inner_opt_state[-1].count) == int(full.opt_state[-1].count) == 2


def test_ema_equals_its_closed_form_and_moves_only_at_optimizer_steps():
  d = 0.7
  step, state, it = _stepper(toy_config(batch_size=2, grad_accum_steps=2, ema_decay=d))
  initial = {'params': state.params, 'batch_stats': state.batch_stats}
  after = []  # the weights after each optimizer step
  for i in range(6):
    ema_before = state.ema
    state, _ = step(state, _device_batch(next(it)))
    if i % 2 == 0:
      _assert_same(state.ema, ema_before)
    else:
      after.append(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
  n = len(after)
  # ema_n = d^n w_0 + (1 - d) sum_i d^(n - i) w_i, in float64.
  flat0 = _leaves(initial)
  flat = [_leaves(w) for w in after]
  for j, got in enumerate(_leaves(state.ema)):
    want = d**n * flat0[j].astype(np.float64)
    want = want + sum((1 - d) * d ** (n - i) * flat[i - 1][j].astype(np.float64) for i in range(1, n + 1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Batch statistics are averaged too, and they did move.
  assert not np.allclose(_leaves(after[-1]['batch_stats'])[0], _leaves(initial['batch_stats'])[0])


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  work = tmp_path_factory.mktemp('straight')
  result = train.train_and_evaluate(toy_config(**RUN), str(work))
  return work, result


def test_sigterm_inside_an_accumulation_saves_it_and_resumes_bit_identically(straight, tmp_path):
  _, want = straight

  def term_at_3(step, batch):
    if step == 3:  # one of the two batches of optimizer step 2 done
      os.kill(os.getpid(), signal.SIGTERM)

  first = train.train_and_evaluate(toy_config(**RUN), str(tmp_path), on_step=term_at_3)
  assert (first['status'], first['batches'], first['step']) == ('preempted', 3, 1)
  assert os.listdir(tmp_path / 'checkpoints') == ['3']  # directories count batches
  second = train.train_and_evaluate(toy_config(**RUN), str(tmp_path))
  assert (second['status'], second['batches'], second['step']) == ('done', 6, 3)
  for field in ('params', 'batch_stats', 'opt_state', 'ema'):
    _assert_same(getattr(second['state'], field), getattr(want['state'], field))
  lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in lines if r['split'] == 'train'] == [1, 2, 3]  # logged per optimizer step


def test_sigkill_inside_an_accumulation_resumes_bit_identically(straight, tmp_path):
  _, want = straight
  overrides = {**RUN, 'model.name': 'toy_small', 'model.backbone_bn': None, 'checkpoint_every': 1}
  work, out = str(tmp_path / 'run'), tmp_path / 'out.npz'
  cmd = [sys.executable, os.path.join(TESTS_DIR, 'train_worker.py'), str(out), work, json.dumps(overrides)]
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([os.path.dirname(TESTS_DIR), TESTS_DIR])}
  # Killed after batch 5, inside optimizer step 3, once the checkpoint of batch 4 is committed.
  killed = subprocess.run(cmd, env={**env, 'SIGKILL_AT': '5:4'}, capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  got = dict(np.load(out))
  assert str(got['__status__']) == 'done:3'
  names = jax.tree_util.tree_leaves(registry.param_names(jax.device_get(want['state'].params), 'toy_small'))
  for name, value in zip(names, _leaves(want['state'].params)):
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  ema = jax.tree_util.tree_leaves_with_path(jax.device_get(want['state'].ema))
  for path, value in ema:
    np.testing.assert_array_equal(got[f'__ema__{jax.tree_util.keystr(path)}'], np.asarray(value))


def test_evaluation_reports_raw_and_ema_weights_and_run_ema_loads_them(straight):
  work, result = straight
  lines = [json.loads(line) for line in open(work / 'metrics.jsonl')]
  splits = {r['split']: r for r in lines if r['split'] in ('val', 'val_ema')}
  assert splits['val']['step'] == splits['val_ema']['step'] == 3
  assert splits['val_ema']['mIoU'] == pytest.approx(result['val_ema']['mIoU'])
  assert (work / 'eval' / '3' / 'confusion.json').is_file()
  assert (work / 'eval' / '3' / 'val_ema' / 'confusion.json').is_file()

  loaded = loader.load(f'{work}:ema')
  assert loaded.ema and 'EMA' in loaded.describe()
  _assert_same(loaded.variables, result['state'].ema)
  _assert_same(loader.load(f'{work}/checkpoints/6:ema').variables, result['state'].ema)
  # --mode=eval of <run>:ema gives the training-time EMA evaluation.
  again = evaluation.run(toy_config(**{**RUN, 'init': f'{work}:ema'}), str(work / 'eval_run'))
  assert again['mIoU'] == pytest.approx(result['val_ema']['mIoU'], abs=1e-6)


def test_ema_of_a_run_without_one_is_a_clear_error(tmp_path):
  train.train_and_evaluate(toy_config(total_steps=1, eval_every=-1), str(tmp_path))
  with pytest.raises(loader.LoadError, match='no EMA weights.*ema_decay=0'):
    loader.load(f'{tmp_path}:ema')
  with pytest.raises(loader.LoadError, match='training runs only'):
    loader.load(f'{tmp_path}/config.json:ema')
