"""scripts/benchmark.py: the multiply-add count against counts made here (a
formula from CSFCN's layer shapes, hooks on the PyTorch references' modules),
and a smoke run (tiny model, 64x64, one repetition) whose JSON carries the
documented fields."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgrseg_jax.models import registry
from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.torch_reference import csfcn as csfcn_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')


def _torch_macs(model, x) -> int:
  """Convs and linears by hooks, plus the matmuls (bmm / matmul) by a torch
  function mode: every multiply-add of the reference forward."""
  total = [0]

  def conv_hook(mod, inp, out):
    total[0] += out.numel() * mod.weight[0].numel()  # weight (out, in/groups, *kernel)

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
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
      handles.append(m.register_forward_hook(conv_hook))
    elif isinstance(m, torch.nn.Linear):
      handles.append(m.register_forward_hook(linear_hook))
  with torch.no_grad(), MatmulCounter():
    model(x)
  for h in handles:
    h.remove()
  return total[0]


@pytest.fixture(scope='module')
def benchmark():
  spec = importlib.util.spec_from_file_location('benchmark_script', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _traced_macs(benchmark, name: str, num_classes: int, hw) -> int:
  """The script's count of the registered model's eval forward (shapes only: nothing runs)."""
  model = registry.build_model(name, num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  return benchmark.model_macs(name, num_classes, variables, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))


def csfcn_hand_macs(h: int, w: int, k: int, tiny: bool) -> int:
  """Conv + matmul multiply-adds of CSFCN / CSFCN-Tiny, from the layer list of
  SPEC-CSFCN.md §2: out_h*out_w*out_c*in_c*kh*kw per conv, plus the attention
  matmuls; pooling, resizing, grid sampling and PixelShuffle count nothing."""
  hs, ws = [h], [w]
  for _ in range(5):  # every stride-2 op (3x3 pad 1, the max pool, 1x1) gives ceil(n / 2)
    hs.append((hs[-1] + 1) // 2)
    ws.append((ws[-1] + 1) // 2)
  px = [a * b for a, b in zip(hs, ws)]  # pixels at stride 2**i

  def conv(p, cin, cout, kk=1):
    return p * cin * cout * kk * kk

  n = conv(px[1], 3, 64, 3) + conv(px[1], 64, 64, 3) + conv(px[1], 64, 128, 3)  # deep stem at stride 2
  n += conv(px[2], 128, 64, 3) + conv(px[2], 64, 64, 3) + conv(px[2], 128, 64) + 2 * conv(px[2], 64, 64, 3)
  for s, c in ((3, 128), (4, 256), (5, 512)):  # layer2..4 (layer3 feeds layer4, so it counts)
    n += conv(px[s], c // 2, c, 3) + conv(px[s], c, c, 3) + conv(px[s], c // 2, c) + 2 * conv(px[s], c, c, 3)
  p32, p8 = px[5], px[3]
  bins = sum(g * max(1, round(g * ws[5] / hs[5])) for g in (6, 3, 2, 1))
  local = 32 if tiny else 64
  n += conv(p32, 512, 256, 3) + conv(p32, 256, 32)  # cfc: reduce_channel, query
  n += bins * 256 * (32 + 256) + p32 * bins * (32 + 256)  # key / value Conv1d, query.key and attn.value
  n += conv(p32, 256, local) + conv(p32, local, 256, 3)  # local attention
  n += conv(p32, 256, 128, 3) + conv(p8, 128, 128, 3)  # sfc: conv_32, conv_8
  n += conv(p8, 256, 64) if tiny else 2 * conv(p8, 128, 32) + conv(p8, 64, 64)  # offset branch input
  n += conv(p8, 64, 10, 3)
  return n + conv(p8, 128, 128, 3) + conv(p8, 128, k if tiny else 64 * k)  # head


@pytest.mark.parametrize('name,hw', [('csfcn', (64, 128)), ('csfcn_tiny', (75, 100))])
def test_count_macs_csfcn_matches_hand_count(benchmark, name, hw):
  want = csfcn_hand_macs(*hw, 3, tiny=name == 'csfcn_tiny')
  # The formula describes the reference: its modules' count (the pyramid pooling not counted) agrees.
  assert _torch_macs(csfcn_ref.build_torch_csfcn(name, 3).eval(), torch.zeros(1, 3, *hw)) == want
  assert _traced_macs(benchmark, name, 3, hw) == want


def test_count_macs_csfcn_at_camvid_size(benchmark):
  """50.3 G at 720x960, 38% of it the deep stem's two 3x3 convs at stride 2 (a
  7x7-stem ResNet-18 would be about 25 G): the count the fraction of peak uses."""
  want = csfcn_hand_macs(720, 960, 11, tiny=False)
  assert want == pytest.approx(50.35e9, rel=1e-3)
  assert _traced_macs(benchmark, 'csfcn', 11, (720, 960)) == want


def test_count_macs_cgrseg_tiny_matches_reference_modules(benchmark):
  # Exact: the port's pooling matmuls (averaging matrices) are not counted, as pooling is not in the reference.
  want = _torch_macs(ref.build_torch_segmentor('tiny', 8).eval(), torch.zeros(1, 3, 64, 64))
  assert _traced_macs(benchmark, 'cgrseg_tiny', 8, (64, 64)) == want


def test_count_macs_rules(benchmark):
  """Matmuls against trace-time tables are pooling (not counted); scan bodies count per
  iteration; a cond counts its costliest branch; jit-nested work counts once."""
  table = np.ones((5, 7), np.float32)
  a = jax.ShapeDtypeStruct((7, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 4), jnp.float32)

  def count(f, *args):
    return benchmark.count_macs(jax.make_jaxpr(f)(*args))

  assert count(lambda x, w: jnp.asarray(table) @ x @ w, a, w) == 5 * 4 * 3
  assert count(lambda x, w: jax.jit(jnp.matmul)(jnp.asarray(table), x) @ w, a, w) == 5 * 4 * 3
  assert count(lambda x, w: jax.jit(lambda x: x @ w)(x) + x @ w, a, w) == 2 * 7 * 4 * 3
  body = lambda c, _: (jnp.tanh(c @ c.T @ c), None)  # noqa: E731
  assert count(lambda x: jax.lax.scan(body, x, None, length=6)[0], a) == 6 * 2 * 7 * 7 * 3
  branches = (lambda x: x @ x.T @ x, lambda x: x @ (x.T @ x), lambda x: 2 * x)
  assert count(lambda i, x: jax.lax.switch(i, branches, x), jax.ShapeDtypeStruct((), jnp.int32), a) == 2 * 7 * 7 * 3


def _cpuinfo(vendor: str, family: int, name: str, flags: str, cores: int = 2, mhz: float = 2600.0) -> str:
  core = (
    f'vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: {name}\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n'
  )
  return '\n'.join([core] * cores)


@pytest.mark.parametrize(
  'vendor,family,name,flags,per_cycle',
  [
    ('AuthenticAMD', 26, 'AMD EPYC', 'sse fma avx2 avx512f', 64),  # Zen 5: two 512-bit FMA pipes x 16 lanes x 2
    ('AuthenticAMD', 25, 'AMD EPYC 9654', 'sse fma avx2 avx512f', 32),  # Zen 4: AVX-512 on 256-bit pipes
    ('AuthenticAMD', 23, 'AMD EPYC 7B12', 'sse fma avx2', 32),
    ('GenuineIntel', 6, 'Intel(R) Xeon(R) Platinum 8480C', 'sse fma avx2 avx512f', 64),
    ('GenuineIntel', 6, 'Intel(R) Core(TM) i7-1165G7', 'sse fma avx2 avx512f', 32),
    ('GenuineIntel', 6, 'Intel(R) Xeon(R) CPU E5-2680 0', 'sse avx', 16),  # no FMA: one add + one mul, 8 lanes
  ],
)
def test_cpu_peak(benchmark, vendor, family, name, flags, per_cycle):
  info = _cpuinfo(vendor, family, name, flags)
  assert benchmark.cpu_flops_per_cycle(info) == per_cycle
  assert benchmark.cpu_peak_gflops(info, cores=2) == pytest.approx(2 * 2.6 * per_cycle)


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
  assert r['gmacs'] == pytest.approx(_torch_macs(model, torch.zeros(1, 3, 64, 64)) / 1e9, rel=1e-12)
  assert r['gflops_xla'] > 0
  for side in ('jax', 'torch'):
    s = r[side]
    assert s['compile_s'] >= 0 and s['eval_latency_ms_bs1'] > 0
    assert set(s['eval_img_per_s']) == {'1', '2'}
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
