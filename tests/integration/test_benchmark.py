"""scripts/benchmark.py end to end: a smoke run (64x64, one repetition, JAX and
PyTorch eager in their own processes) whose JSON carries the documented fields,
with the counts the PyTorch reference gives. The plumbing is the question: it
runs the toy family (tests/train_config.py:toy registers it in every process)."""

import json
import os
import subprocess
import sys

import pytest
import script_modules
import torch

from cgrseg_jax import cost
from cgrseg_jax.torch_reference import cgrseg as ref
from paths import REPO, SCRIPTS, TESTS_DIR
from toy_family import ToyTorch

SCRIPT = os.path.join(SCRIPTS, 'benchmark.py')


def test_benchmark_smoke(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
    [
      sys.executable,
      SCRIPT,
      '--config=tests/train_config.py:toy',
      '--num-classes=8',
      '--size=64,64',
      '--batch-sizes=1',
      '--train-batch=2',
      '--dtypes=float32',
      '--warmup=0',
      '--reps=1',
      '--threads=1',
      '--compare-torch',
      '--no-torch-compile',
      f'--output={out}',
    ],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': os.pathsep.join([REPO, TESTS_DIR])},
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'JAX / PyTorch eager speed' in proc.stdout
  r = json.load(open(out))
  assert r['input'] == [64, 64]
  model = ToyTorch(8, 8).eval()
  assert r['params'] == ref.count_learnable_params(model)
  assert r['gmacs'] == pytest.approx(cost.torch_macs(model, torch.zeros(1, 3, 64, 64)) / 1e9, rel=1e-12)
  assert r['gflops_xla'] > 0
  for side in ('jax', 'torch'):
    s = r[side]
    assert s['compile_s'] >= 0 and s['eval_latency_ms_bs1'] > 0
    assert set(s['eval_img_per_s']) == {'1'}
    assert s['train_step_s'] > 0 and s['train_img_per_s'] == pytest.approx(2 / s['train_step_s'])
  assert set(r['ratio']) == {'eval_bs1', 'eval_bs8', 'train'}
  # Each framework measured in its own process; fraction of peak from the count and the device's peak.
  assert r['device'] and r['jax']['platform'] == 'cpu' and r['torch']['platform'] == 'cpu'
  # The CPU peak is at least what a measured float32 matmul reaches.
  assert r['matmul_gflops'] > 0 and r['peak_gflops'] >= r['matmul_gflops']
  if r['peak_gflops']:
    want = r['jax']['eval_img_per_s']['1'] * 2 * r['gmacs'] / r['peak_gflops']
    assert r['jax']['fraction_of_peak']['eval_bs1'] == pytest.approx(want)
  assert 'fraction of peak' in proc.stdout and 'PyTorch eager' in proc.stdout
  assert r['ratio']['eval_bs1'] == pytest.approx(r['jax']['eval_img_per_s']['1'] / r['torch']['eval_img_per_s']['1'])


def test_benchmark_eval_smoke(toy, tmp_path):
  # In-process, with the toy family (the question is the two steps, not the model), K=150.
  bench = script_modules.load('benchmark_eval')
  out = tmp_path / 'eval.json'
  r = bench.main(['--model=toy_small', '--num-classes=150', '--size=64,96', '--batch-size=2', '--reps=1',
                  '--warmup=1', f'--output={out}'])  # fmt: skip
  assert json.load(open(out)) == json.loads(json.dumps(r))
  assert r['counts_agree'] and r['padded_hw'] == [64, 96]
  rates = r['eval_img_per_s']
  assert rates['with_confusion'] == pytest.approx(2 / r['step_s']['with_confusion']['median'])
  assert r['confusion_cost'] == pytest.approx(1 - rates['with_confusion'] / rates['areas_only'])
  assert set(r['count_only_ms']) == {'confusion', 'areas'}


def test_benchmark_data_smoke(tmp_path):
  out = tmp_path / 'data.json'
  cmd = [sys.executable, os.path.join(SCRIPTS, 'benchmark_data.py'), '--num-images=8', '--batch-size=2',
         '--seconds=0.5', '--workers=0', '--num-shards=2', f'--output={out}']  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.load(open(out))
  assert set(r['img_per_s']) == {'folders', 'shards'} and r['num_shards'] == 2
  for name in ('folders', 'shards'):
    assert r['img_per_s'][name]['0'] > 0
  assert r['shards_over_folders']['0'] == pytest.approx(
    r['img_per_s']['shards']['0'] / r['img_per_s']['folders']['0'], abs=2e-3
  )
