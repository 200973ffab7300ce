"""Sharded training against a 1-device run of the same global batches: two
processes on localhost (CPU, gloo collectives), each with 4 simulated CPU
devices (8 in all: the batch is sharded over devices within a process and
across processes), each reading its own data shard; and SIGTERM to one of
the two processes (both save the same step, the resumed run is exact)."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from paths import TESTS_DIR

REPO = os.path.dirname(TESTS_DIR)


def _run_worker(out, workdir, overrides, env_extra=None, extra_args=()):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR]))
  env.pop('XLA_FLAGS', None)
  env.pop('SIGTERM_AT', None)
  env.update(env_extra or {})
  if extra_args:
    # Several processes: no persistent compilation cache. With executables read
    # back from it (jax 0.10.2, CPU), the first gloo collective fails to connect.
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  cmd = [
    sys.executable,
    os.path.join(TESTS_DIR, 'train_worker.py'),
    str(out),
    str(workdir),
    json.dumps(overrides),
    *map(str, extra_args),
  ]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd


def _wait(procs, timeout=600):
  for p, cmd in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      pytest.fail(f'timed out: {cmd}')
    assert p.returncode == 0, f'{cmd} failed:\n{out[-4000:]}'


# Both use the data order of a 2-process run (see data/input_pipeline.py), so the same
# global batches feed the 1-device, 8-device and 2-process runs.
# Adam eps 1e-3: with the recipe's 1e-8, a parameter whose gradient is rounding
# noise (exactly 0 for a conv bias feeding a train-mode BN, ~1e-9 behind a
# 1e-6 layer scale at init) moves by +-lr depending on that noise, in any two
# runs that sum in a different order. With eps far above the noise the update
# is linear in the gradient and the comparison measures the sharded
# reductions (SyncBN statistics, gradient means), which is what is tested.
STABLE_ADAM = {'optimizer.eps': 1e-3, 'total_steps': 5}  # 5 steps: room for the SIGTERM test's stop at 3
# The toy family (convs and a BatchNorm: SyncBN statistics are still global):
# sharding and stopping do not depend on the model, and without a persistent
# compilation cache (see _run_worker) each of the 7 processes compiles its step.
STABLE_ADAM.update({'model.name': 'toy_small', 'model.backbone_bn': None})
SHARED = {'data.emulate_process_count': 2, **STABLE_ADAM}


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  d = tmp_path_factory.mktemp('one')
  _wait([_run_worker(d / 'out.npz', d / 'work', SHARED, EVAL_FIXED)])
  return dict(np.load(d / 'out.npz'))


def _compare(got, ref, atol, check_indices=True):
  assert set(got) == set(ref)
  if check_indices:
    assert json.loads(str(got['__indices__'])) == json.loads(str(ref['__indices__']))
  for k in ref:
    if not k.startswith('__'):
      np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=atol, err_msg=k)
  gv, rv = json.loads(str(got['__val__'])), json.loads(str(ref['__val__']))
  for k in rv:
    np.testing.assert_allclose(gv[k], rv[k], atol=1e-3, err_msg=k)


# 4 devices per process: 8 shards of the global batch of 8, over two processes.
FOUR_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
# The reference and the 2-process run also evaluate weights that are the same in both.
EVAL_FIXED = {'EVAL_FIXED': '1'}


def _two_processes(out, workdir, env=None):
  port = portpicker.pick_unused_port()
  env = {**FOUR_DEVICES, **(env or {})}
  procs = [_run_worker(out, workdir, STABLE_ADAM, env, extra_args=(f'localhost:{port}', 2, i)) for i in range(2)]
  _wait(procs, timeout=900)
  return [dict(np.load(f'{out}.{i}.npz')) for i in range(2)]


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  d = tmp_path_factory.mktemp('two')
  return d / 'work', _two_processes(d / 'out.npz', d / 'work', EVAL_FIXED)


def test_two_processes_of_four_devices_match_one_device(one_device_run, two_process_run):
  work, outs = two_process_run
  assert [int(o['__devices__']) for o in outs] == [8, 8] and int(one_device_run['__devices__']) == 1
  # Each process consumed its own shard; together, the reference's global batches.
  local = [json.loads(str(o['__indices__'])) for o in outs]
  assert [a + b for a, b in zip(*local)] == json.loads(str(one_device_run['__indices__']))
  assert local[0] != local[1]
  for o in outs:
    _compare(o, one_device_run, atol=1e-5, check_indices=False)
  # The final checkpoint was written by both processes: one data-iterator file each.
  data_dir = work / 'checkpoints' / '5' / 'data'
  files = set(os.listdir(data_dir))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= files, files


def test_two_process_evaluation_gives_the_one_process_confusion_matrix(one_device_run, two_process_run):
  # The same weights: the eval batches sharded over 8 devices in 2 processes count what 1 device counts.
  _, outs = two_process_run
  ref = one_device_run
  assert ref['__confusion__'].sum() > 0 and (ref['__confusion__'] - np.diag(np.diag(ref['__confusion__']))).sum() > 0
  for o in outs:
    np.testing.assert_array_equal(o['__confusion__'], ref['__confusion__'])
    np.testing.assert_allclose(o['__image_miou__'], ref['__image_miou__'], rtol=1e-6)
  # Process 0 wrote the training run's report of its final evaluation.
  report_dir = two_process_run[0] / 'eval' / '5'
  assert {'confusion.json', 'confusion.png', 'worst.json'} <= set(os.listdir(report_dir))


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(two_process_run, tmp_path):
  work = tmp_path / 'work'
  cut = _two_processes(tmp_path / 'cut.npz', work, {'SIGTERM_AT': '1:1'})  # process 1, after step 1
  # Process 1 proposes its boundary + 2 (preemption.MARGIN); both save step 3 and exit.
  assert [str(o['__status__']) for o in cut] == ['preempted:3', 'preempted:3']
  assert os.listdir(work / 'checkpoints') == ['3']
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(work / 'checkpoints' / '3' / 'data'))

  resumed = _two_processes(tmp_path / 'resumed.npz', work)
  for i, (a, b, ref) in enumerate(zip(cut, resumed, two_process_run[1])):
    assert str(b['__status__']) == 'done:5'
    indices = json.loads(str(a['__indices__'])) + json.loads(str(b['__indices__']))
    assert indices == json.loads(str(ref['__indices__'])), f'process {i}'
    for k in ref:
      if not k.startswith('__'):
        np.testing.assert_array_equal(b[k], ref[k], err_msg=f'process {i}: {k}')
