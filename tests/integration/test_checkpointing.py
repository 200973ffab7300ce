"""Run checkpoints that go wrong: damaged after their commit, a kill while
old ones are deleted, a full disk; and main.py's short error messages. The
toy family trains: the question is the run's checkpoints, not the model.

One uninterrupted run (checkpoints at every step) is the reference; each test
copies its workdir, breaks it, resumes, and compares the final weights with it.
"""

import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cgrseg_jax import checkpointing, errors, train
from train_config import toy_config

from paths import REPO, TESTS_DIR

TOTAL = 5
RUN = dict(total_steps=TOTAL, eval_every=-1, batch_size=2, checkpoint_every=1, keep_checkpoints=TOTAL)


pytestmark = pytest.mark.usefixtures('toy')  # toy_config's family, unregistered after the module


@pytest.fixture(scope='module')
def cache_dir():
  """The session's compilation cache (conftest.py): one compile of the step for every run here."""
  return os.environ['JAX_COMPILATION_CACHE_DIR']


@pytest.fixture(scope='module')
def straight(cache_dir, tmp_path_factory):
  """Uninterrupted run to step 5 keeping every checkpoint: (workdir, final params, state bytes)."""
  work = tmp_path_factory.mktemp('straight') / 'work'
  result = train.train_and_evaluate(toy_config(**RUN), str(work))
  assert result['step'] == TOTAL
  assert sorted(os.listdir(work / 'checkpoints')) == [str(s) for s in range(1, TOTAL + 1)]
  return work, _leaves(result['state'].params), checkpointing.state_nbytes(result['state'])


def _leaves(params):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(params))]


def _copy_until(straight_work, dst, last_step):
  """The straight run's workdir as if it had stopped after saving `last_step`."""
  shutil.copytree(straight_work, dst)
  for s in range(last_step + 1, TOTAL + 1):
    shutil.rmtree(dst / 'checkpoints' / str(s))
  return dst


def _assert_same(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def _checkpoint_params(step_dir):
  return _leaves(ocp.StandardCheckpointer().restore(os.path.join(step_dir, 'state'))['params'])


def _data_files(step_dir):
  """The OCDBT data files of a step, smallest first: the process's and the merged database's."""
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*'))
  return sorted(files + glob.glob(os.path.join(step_dir, 'state', 'd', '*')), key=os.path.getsize)


def test_damaged_checkpoints_fall_back_to_the_newest_good_one(straight, tmp_path, caplog):
  work = _copy_until(straight[0], tmp_path / 'work', TOTAL)
  ckpt = work / 'checkpoints'
  for name in _data_files(ckpt / '5'):  # a copy stopped half-way
    with open(name, 'r+b') as f:
      f.truncate(os.path.getsize(name) // 2)
  for name in _data_files(ckpt / '4'):  # lost files
    os.remove(name)
  (ckpt / '3' / 'state' / '_METADATA').write_text('{"tree_metadata": {"params"')  # cut JSON

  with caplog.at_level(logging.WARNING, logger='cgrseg_jax.checkpointing'):
    result = train.train_and_evaluate(toy_config(**RUN), str(work))
  assert (result['status'], result['step']) == ('done', TOTAL)
  _assert_same(_leaves(result['state'].params), straight[1])

  warnings = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(warnings) == 3, warnings
  for w, step, why in zip(warnings, (5, 4, 3), ('OUT_OF_RANGE', 'NOT_FOUND', 'state/_METADATA')):
    assert f'{ckpt}/{step} cannot be restored' in w and why in w, w
  # Kept for inspection under names orbax does not list; the good ones and the new ones are steps again.
  names = sorted(os.listdir(ckpt))
  assert {'5.damaged-unreadable-data', '4.damaged-missing-file', '3.damaged-bad-metadata'} <= set(names), names
  assert 'OUT_OF_RANGE' in (ckpt / '5.damaged-unreadable-data' / 'DAMAGED.txt').read_text()
  assert {'1', '2', '3', '4', '5'} <= set(names)


def test_nothing_restorable_is_an_error_not_a_fresh_start(straight, tmp_path):
  work = _copy_until(straight[0], tmp_path / 'work', 1)
  os.remove(work / 'checkpoints' / '1' / 'data' / 'process_0-of-1.json')
  config = toy_config(**RUN)
  with pytest.raises(errors.CheckpointError, match=r'no checkpoint in .*checkpoints can be restored \(tried 1: step 1'):
    train.train_and_evaluate(config, str(work))
  assert os.listdir(work / 'checkpoints') == ['1']  # nothing renamed: the cause may be the config
  # The same with a config that does not match the checkpoints (another model).
  other = toy_config(**{**RUN, 'model.num_classes': 3, 'data.synthetic.num_classes': 3})
  work2 = _copy_until(straight[0], tmp_path / 'work2', 2)
  with pytest.raises(errors.CheckpointError, match='tried 2: step 2: .*; step 1: '):
    train.train_and_evaluate(other, str(work2))
  assert sorted(os.listdir(work2 / 'checkpoints')) == ['1', '2']


def test_kill_while_deleting_old_checkpoints_leaves_a_restorable_workdir(straight, tmp_path, monkeypatch):
  work = _copy_until(straight[0], tmp_path / 'work', 2)
  config = toy_config(**{**RUN, 'keep_checkpoints': 2})
  real_rmtree = shutil.rmtree

  def killed_half_way(path, ignore_errors=False):
    files = sorted(glob.glob(os.path.join(path, '**', '*'), recursive=True), key=os.path.isdir)
    for f in files[: len(files) // 2]:
      if os.path.isfile(f):
        os.remove(f)
    raise KeyboardInterrupt(f'killed while deleting {path}')

  monkeypatch.setattr(checkpointing.shutil, 'rmtree', killed_half_way)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(work))
  monkeypatch.setattr(checkpointing.shutil, 'rmtree', real_rmtree)
  ckpt = work / 'checkpoints'
  trash = os.listdir(ckpt / checkpointing.TRASH)
  assert trash, 'the kill was meant to hit a deletion'
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert len(steps) == 2 and steps[0] >= 2, os.listdir(ckpt)  # only whole steps count toward keep_checkpoints

  result = train.train_and_evaluate(config, str(work))
  assert result['step'] == TOTAL
  _assert_same(_leaves(result['state'].params), straight[1])
  assert os.listdir(ckpt / checkpointing.TRASH) == []
  assert sorted(d for d in os.listdir(ckpt) if d.isdigit()) == ['4', '5']


# A full disk: the grain data item's writer fails like write(2) on a full file system.
FULL_DISK_MAIN = """
import errno, runpy, sys
from grain._src.python.checkpoint import handler
def full_disk(self, directory, item=None, args=None):
  raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
handler.CheckpointHandler.save = full_disk
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
"""


def _main(cache_dir, args, wrapper=None):
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR]),
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  cmd = [sys.executable, *(['-c', wrapper] if wrapper else ['main.py']), '--config=tests/train_config.py:toy', *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _run_flags(work):
  return [f'--workdir={work}', *(f'--config.{k}={v}' for k, v in RUN.items())]


def test_full_disk_stops_with_a_message_and_a_rerun_resumes(straight, cache_dir, tmp_path):
  work = _copy_until(straight[0], tmp_path / 'work', 3)
  full = _main(cache_dir, _run_flags(work), wrapper=FULL_DISK_MAIN)
  assert full.returncode == 2, full.stderr[-3000:]
  assert 'Traceback' not in full.stderr, full.stderr[-3000:]
  message = [l for l in full.stderr.splitlines() if l.startswith('error (CheckpointError)')]
  assert len(message) == 1, full.stderr[-3000:]
  m = message[0]
  for part in (
    f'step 4 to {work}/checkpoints failed: No space left on device',
    f'about {straight[2] / 2**10:.0f} KiB',  # the toy model's state is small
    'step 3 is intact',
  ):
    assert part in m, m
  assert sorted(d for d in os.listdir(work / 'checkpoints') if d.isdigit()) == ['1', '2', '3']

  rerun = _main(cache_dir, _run_flags(work))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'resumed from' in rerun.stderr and f'{work}/checkpoints/3' in rerun.stderr
  _assert_same(_checkpoint_params(work / 'checkpoints' / '5'), straight[1])


def test_damaged_fallback_prints_its_warning_and_nothing_else(straight, cache_dir, tmp_path):
  """The fallback in a real run (main.py): a data file of the newest step cut to
  100 bytes. stderr holds the lines of any resumed run, the warning and the
  rename: no asyncio or TensorStore tracebacks (100,000 lines before the fix)."""
  damaged = _copy_until(straight[0], tmp_path / 'damaged', TOTAL)
  for name in _data_files(damaged / 'checkpoints' / str(TOTAL)):
    with open(name, 'r+b') as f:
      f.truncate(100)
  run = _main(cache_dir, _run_flags(damaged))
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stderr.strip().splitlines()
  fallback = [l for l in lines if 'cannot be restored' in l or 'moved damaged checkpoint' in l]
  assert len(fallback) == 2, run.stderr[-3000:]
  rest = '\n'.join(l for l in lines if l not in fallback)
  for noise in ('Traceback', 'Event loop is closed', 'Exception ignored', 'never retrieved', 'TensorStore'):
    assert noise not in rest, rest[-3000:]
  # a resumed run's own lines (workdir, mesh, resumed, steps, finished) and these two
  assert len(lines) <= 12, '\n'.join(lines)
  assert os.path.isdir(damaged / 'checkpoints' / f'{TOTAL}.damaged-unreadable-data')
  _assert_same(_checkpoint_params(damaged / 'checkpoints' / str(TOTAL)), straight[1])


def test_main_prints_user_errors_in_one_line_and_tracebacks_with_verbose(straight, cache_dir, tmp_path):
  work = tmp_path / 'work'
  shutil.copytree(straight[0] / 'checkpoints' / '1', work / 'checkpoints' / '1.damaged-truncated')
  short = _main(cache_dir, _run_flags(work))
  assert short.returncode == 2
  assert 'Traceback' not in short.stderr
  assert short.stderr.strip().splitlines()[-1] == (
    f'error (CheckpointError): {work}/checkpoints holds only damaged checkpoints (1.damaged-truncated); '
    'move them away to start from scratch, or restore a good copy'
  )
  verbose = _main(cache_dir, [*_run_flags(work), '--verbose'])
  assert verbose.returncode not in (0, 2)
  assert 'Traceback' in verbose.stderr and 'CheckpointError' in verbose.stderr
