"""Runs on gs:// against a real GCS emulator (tests/gcs_emulator.py): workdir,
checkpoints, metrics, TensorBoard and ArrayRecord shards on the bucket; a run
killed with SIGKILL resumes bit-identically; init weights, --mode=eval and
predict read and write gs://; a workdir that cannot be written is refused in
one line before anything compiles."""

import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from etils import epath

from cgrseg_jax import convert, evaluation, loader, torch_files, train
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.models import registry
import script_modules
import toy_family
from gcs_emulator import GcsEmulator
from train_config import tiny_config

from paths import REPO, TESTS_DIR

TOY = {'model.name': 'toy_small', 'model.backbone_bn': None}
RUN = {**TOY, 'total_steps': 5, 'eval_every': -1, 'checkpoint_every': 2, 'batch_size': 2}


@pytest.fixture(scope='module')
def gcs():
  emulator = GcsEmulator()
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  registry.register(toy_family.FAMILY, replace=True)
  yield emulator
  registry.unregister('toy')
  emulator.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _worker(out, workdir, overrides, env_extra=None):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR]), **(env_extra or {}))
  cmd = [sys.executable, os.path.join(TESTS_DIR, 'train_worker.py'), str(out), workdir, json.dumps(overrides)]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _params(params, name):
  names = jax.tree_util.tree_leaves(registry.param_names(params, name))
  return {n: np.asarray(v) for n, v in zip(names, jax.tree_util.tree_leaves(jax.device_get(params)))}


@pytest.fixture(scope='module')
def runs(gcs, tmp_path_factory):
  """A local run on the synthetic data, and the same run from gs:// shards into a gs://
  workdir, killed with SIGKILL after step 4 (once the checkpoint of step 2 is committed) and resumed."""
  local = tmp_path_factory.mktemp('local')
  straight = train.train_and_evaluate(tiny_config(**RUN), str(local))
  input_pipeline.write_shards(tiny_config(**RUN), gcs.root('shards'), num_shards=3)
  sharded = {**RUN, 'data.shards': gcs.root('shards')}
  killed = _worker(local / 'killed.npz', gcs.root('run'), sharded, {'SIGKILL_AT': '4:2'})
  resumed = _worker(local / 'resumed.npz', gcs.root('run'), sharded)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  return dict(local=local, straight=straight, killed=killed, resumed=dict(np.load(local / 'resumed.npz')))


def test_gs_run_from_shards_killed_and_resumed_equals_a_local_run(gcs, runs):
  assert runs['killed'].returncode == -9, runs['killed'].stderr[-3000:]
  resumed = runs['resumed']
  assert str(resumed['__status__']) == 'done:5'
  # Resumed from step 2 on the shards: the local run's (synthetic, in memory) final weights, bit for bit.
  reference = _params(runs['straight']['state'].params, 'toy_small')
  for k, v in reference.items():
    np.testing.assert_array_equal(resumed[k], v, err_msg=k)
  run = epath.Path(gcs.root('run'))
  # The same retention as the local run's (which saved steps 2, 4 and 5 too).
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == sorted(
    d for d in os.listdir(runs['local'] / 'checkpoints') if d.isdigit()
  )
  steps = [
    r['step'] for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if r['split'] == 'train'
  ]
  assert steps == [1, 2, 3, 3, 4, 5]  # the killed run logged 1-3, the resumed one 3-5
  assert json.loads((run / 'config.json').read_text())['data']['shards'] == gcs.root('shards')
  assert any(p.name.startswith('events.out.tfevents') for p in (run / 'tb').iterdir())


def test_init_weights_from_gs(gcs, runs, tmp_path):
  variables = jax.device_get(runs['straight']['state'].variables)
  state = convert.variables_to_state_dict(variables, 'toy_small')
  pth = gcs.root('weights', 'toy.pth')
  torch_files.write_mmseg_checkpoint(pth, state)
  loader.save_converted(gcs.root('weights', 'converted'), variables, 'toy_small', 5)
  for path in (pth, gcs.root('weights', 'converted'), gcs.root('run')):
    got = loader.initial_variables(path, variables, 'toy_small', 5)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(variables)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_mode_eval_and_predict_on_gs_paths(gcs, runs, tmp_path):
  config = tiny_config(**RUN)
  on_gs = evaluation.run(config, gcs.root('run'))  # the resumed run's latest step: the local run's weights
  local = evaluation.run(config, str(runs['local']))
  for k in ('mIoU', 'mAcc', 'aAcc'):
    assert on_gs[k] == local[k]
  assert 'val' in (epath.Path(gcs.root('run')) / 'metrics.jsonl').read_text()

  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    png = cv2.imencode('.png', rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))[1].tobytes()
    (images / f'im{i}.png').write_bytes(png)
    epath.Path(gcs.root('images', f'im{i}.png')).write_bytes(png)
  predict = script_modules.load('predict')
  common = ['--dataset=synthetic', '--raw', '--no-progress']
  assert (
    predict.main([gcs.root('images'), f'--checkpoint={gcs.root("run")}', f'--output={gcs.root("pred")}', *common]) == 0
  )
  assert predict.main([str(images), f'--checkpoint={runs["local"]}', f'--output={tmp_path / "pred"}', *common]) == 0
  for name in ('im0_labels.png', 'im1_color.png', 'im1_overlay.png'):
    assert epath.Path(gcs.root('pred', name)).read_bytes() == (tmp_path / 'pred' / name).read_bytes(), name
  listed = json.loads(epath.Path(gcs.root('pred', 'predictions.json')).read_text())['images']
  assert sorted(listed) == [gcs.root('images', 'im0.png'), gcs.root('images', 'im1.png')]


@pytest.mark.parametrize('where', ['gs', 'local'])
def test_unwritable_workdir_is_refused_in_one_line_before_compiling(gcs, tmp_path, where):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  workdir = 'gs://no-such-bucket/run' if where == 'gs' else str(blocker / 'run')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR]))
  run = subprocess.run(
    [sys.executable, 'main.py', '--config=tests/train_config.py', f'--workdir={workdir}'],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 2, run.stderr[-3000:]
  errors = [l for l in run.stderr.splitlines() if l.startswith('error')]
  assert errors == [errors[-1]] and errors[0].startswith(f'error (StorageError): workdir {workdir} cannot be written: ')
  assert 'Traceback' not in run.stderr and 'mesh:' not in run.stderr  # stopped before the mesh, the data, the compile
