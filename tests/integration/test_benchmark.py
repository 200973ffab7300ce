"""scripts/benchmark.py end to end: a smoke run (tiny model, 64x64, one
repetition, JAX and PyTorch eager in their own processes) whose JSON carries
the documented fields, with the counts the PyTorch reference gives."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cgrseg_jax import cost
from cgrseg_jax.torch_reference import cgrseg as ref
from paths import REPO, SCRIPTS

SCRIPT = os.path.join(SCRIPTS, 'benchmark.py')


def test_benchmark_smoke(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
    [
      sys.executable,
      SCRIPT,
      '--config=configs/synthetic_t.py',
      '--variant=tiny',
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
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'JAX / PyTorch eager speed' in proc.stdout
  r = json.load(open(out))
  assert r['input'] == [64, 64]
  model = ref.build_torch_segmentor('tiny', 8).eval()
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
