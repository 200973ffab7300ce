"""scripts/benchmark.py smoke run (tiny model, 64x64, one repetition): the JSON
carries the documented fields and the multiply-add count matches a count made
here from the PyTorch reference's modules."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')


def _torch_macs(model, x) -> int:
  """Convs and linears by hooks, plus the matmuls (bmm / matmul) by a torch
  function mode: every multiply-add of the reference forward."""
  total = [0]

  def conv_hook(mod, inp, out):
    k = mod.weight.shape  # (out, in/groups, kh, kw)
    total[0] += out.numel() * k[1] * k[2] * k[3]

  def linear_hook(mod, inp, out):
    total[0] += out.numel() * mod.weight.shape[1]

  class MatmulCounter(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
      out = func(*args, **(kwargs or {}))
      if func in (torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.__matmul__, torch.einsum):
        a = args[1] if func is torch.einsum else args[0]
        if func is not torch.einsum:
          total[0] += out.numel() * a.shape[-1]
        else:
          raise AssertionError('einsum in the reference: count it explicitly')
      return out

  handles = []
  for m in model.modules():
    if isinstance(m, torch.nn.Conv2d):
      handles.append(m.register_forward_hook(conv_hook))
    elif isinstance(m, torch.nn.Linear):
      handles.append(m.register_forward_hook(linear_hook))
  with torch.no_grad(), MatmulCounter():
    model(x)
  for h in handles:
    h.remove()
  return total[0]


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
      '--batch-sizes=1,2',
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
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'JAX / PyTorch eager speed' in proc.stdout
  r = json.load(open(out))
  assert r['input'] == [64, 64]
  model = ref.build_torch_segmentor('tiny', 8).eval()
  assert r['params'] == ref.count_learnable_params(model)
  want_macs = _torch_macs(model, torch.zeros(1, 3, 64, 64))
  # The port computes PyTorch's adaptive average pooling as small matmuls,
  # which the traced count includes (+6432 here; +3.7M = 0.08% for T at 512).
  assert r['gmacs'] == pytest.approx(want_macs / 1e9, rel=1e-3)
  assert r['gmacs'] >= want_macs / 1e9
  assert r['gflops_xla'] > 0
  for side in ('jax', 'torch'):
    s = r[side]
    assert s['compile_s'] >= 0 and s['eval_latency_ms_bs1'] > 0
    assert set(s['eval_img_per_s']) == {'1', '2'}
    assert s['train_step_s'] > 0 and s['train_img_per_s'] == pytest.approx(2 / s['train_step_s'])
  assert set(r['ratio']) == {'eval_bs1', 'eval_bs8', 'train'}
  # Each framework measured in its own process; fraction of peak from the count and the device's peak.
  assert r['device'] and r['jax']['platform'] == 'cpu' and r['torch']['platform'] == 'cpu'
  if r['peak_gflops']:
    want = r['jax']['eval_img_per_s']['1'] * 2 * r['gmacs'] / r['peak_gflops']
    assert r['jax']['fraction_of_peak']['eval_bs1'] == pytest.approx(want)
  assert 'fraction of peak' in proc.stdout and 'PyTorch eager' in proc.stdout
  assert r['ratio']['eval_bs1'] == pytest.approx(r['jax']['eval_img_per_s']['1'] / r['torch']['eval_img_per_s']['1'])
