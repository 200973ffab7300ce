"""cgrseg_jax.cost: the multiply-add count against counts made independently (a
formula from CSFCN's layer shapes, hooks on the PyTorch references' modules),
the counting rules, and the peak-throughput look-ups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgrseg_jax import cost
from cgrseg_jax.models import registry
from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.torch_reference import csfcn as csfcn_ref


def _traced_macs(name: str, num_classes: int, hw) -> int:
  """The count of the registered model's eval forward (shapes only: nothing runs)."""
  model = registry.build_model(name, num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  return cost.model_macs(name, num_classes, variables, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))


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
def test_count_macs_csfcn_matches_hand_count(name, hw):
  want = csfcn_hand_macs(*hw, 3, tiny=name == 'csfcn_tiny')
  # The formula describes the reference: its modules' count (the pyramid pooling not counted) agrees.
  assert cost.torch_macs(csfcn_ref.build_torch_csfcn(name, 3).eval(), torch.zeros(1, 3, *hw)) == want
  assert _traced_macs(name, 3, hw) == want


def test_count_macs_csfcn_at_camvid_size():
  """50.3 G at 720x960, 38% of it the deep stem's two 3x3 convs at stride 2 (a
  7x7-stem ResNet-18 would be about 25 G): the count the fraction of peak uses."""
  want = csfcn_hand_macs(720, 960, 11, tiny=False)
  assert want == pytest.approx(50.35e9, rel=1e-3)
  assert _traced_macs('csfcn', 11, (720, 960)) == want


def test_count_macs_cgrseg_tiny_matches_reference_modules():
  # Exact: the port's pooling matmuls (averaging matrices) are not counted, as pooling is not in the reference.
  want = cost.torch_macs(ref.build_torch_segmentor('tiny', 8).eval(), torch.zeros(1, 3, 64, 64))
  assert _traced_macs('cgrseg_tiny', 8, (64, 64)) == want


def test_count_macs_rules():
  """Matmuls against trace-time tables are pooling (not counted); scan bodies count per
  iteration; a cond counts its costliest branch; jit-nested work counts once."""
  table = np.ones((5, 7), np.float32)
  a = jax.ShapeDtypeStruct((7, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 4), jnp.float32)

  def count(f, *args):
    return cost.count_macs(jax.make_jaxpr(f)(*args))

  assert count(lambda x, w: jnp.asarray(table) @ x @ w, a, w) == 5 * 4 * 3
  assert count(lambda x, w: jax.jit(jnp.matmul)(jnp.asarray(table), x) @ w, a, w) == 5 * 4 * 3
  assert count(lambda x, w: jax.jit(lambda x: x @ w)(x) + x @ w, a, w) == 2 * 7 * 4 * 3
  body = lambda c, _: (jnp.tanh(c @ c.T @ c), None)  # noqa: E731
  assert count(lambda x: jax.lax.scan(body, x, None, length=6)[0], a) == 6 * 2 * 7 * 7 * 3
  branches = (lambda x: x @ x.T @ x, lambda x: x @ (x.T @ x), lambda x: 2 * x)
  assert count(lambda i, x: jax.lax.switch(i, branches, x), jax.ShapeDtypeStruct((), jnp.int32), a) == 2 * 7 * 7 * 3


def test_torch_macs_counts_convs_linears_and_matmuls():
  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, groups=1)
      self.dw = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
      self.fc = torch.nn.Linear(4, 6)

    def forward(self, x):
      y = self.dw(self.conv(x)).flatten(2).transpose(1, 2)  # (1, 25, 4)
      y = self.fc(y)  # (1, 25, 6)
      return torch.nn.functional.avg_pool1d(y @ y.transpose(1, 2), 5)  # (1, 25, 25); pooling free

  want = 25 * 4 * 3 * 9 + 25 * 4 * 9 + 25 * 6 * 4 + 25 * 25 * 6
  assert cost.torch_macs(Net(), torch.zeros(1, 3, 5, 5)) == want


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
def test_cpu_peak(vendor, family, name, flags, per_cycle):
  info = _cpuinfo(vendor, family, name, flags)
  assert cost.cpu_flops_per_cycle(info) == per_cycle
  assert cost.cpu_peak_gflops(info, cores=2) == pytest.approx(2 * 2.6 * per_cycle)


def test_cpu_peak_without_cpuinfo_fields():
  assert cost.cpu_flops_per_cycle('model name\t: x\n') is None
  assert cost.cpu_peak_gflops('flags\t\t: fma avx2\n', cores=2) is None  # no clock


@pytest.mark.parametrize(
  'device,fp32,bf16',
  [
    ('NVIDIA H200', 67.0, 989.0),
    ('NVIDIA H100 PCIe', 51.0, 756.0),  # before the generic H100 row
    ('NVIDIA H100 80GB HBM3', 67.0, 989.0),
    ('NVIDIA A100-SXM4-40GB', 19.5, 312.0),
    ('NVIDIA L40S', 91.6, 362.0),  # not the L4 row
    ('NVIDIA L4', 30.3, 121.0),
    ('TPU v6 lite', 918.0, 918.0),
    ('TPU v5 lite', 197.0, 197.0),  # v5e
    ('TPU v5', 459.0, 459.0),  # v5p's device_kind
    ('TPU v4', 275.0, 275.0),
  ],
)
def test_accelerator_peak(device, fp32, bf16):
  assert cost.peak_gflops('gpu', device) == pytest.approx(1e3 * fp32)
  assert cost.peak_gflops('gpu', device, 'bfloat16') == pytest.approx(1e3 * bf16)


def test_peak_unknown_accelerator_and_cpu_floor():
  assert cost.peak_gflops('gpu', 'Some Future Accelerator') is None
  # On CPU the peak is never below a measured matmul rate.
  assert cost.peak_gflops('cpu', 'any', matmul=1e9) == 1e9
  assert cost.peak_gflops('cpu', 'any', 'bfloat16', matmul=1e9) == 1e9
  ours = cost.cpu_peak_gflops()
  if ours:
    assert cost.peak_gflops('cpu', 'any', matmul=1.0) == ours


def test_fraction_of_peak():
  res = {'eval_img_per_s': {'1': 10.0, '8': 20.0}, 'train_img_per_s': 2.0}
  cost.add_fraction_of_peak(res, gmacs=4.0, peak=1000.0)
  assert res['fraction_of_peak'] == pytest.approx({'eval_bs1': 0.08, 'eval_bs8': 0.16, 'train': 0.048})
  untouched = {'eval_img_per_s': {'1': 10.0}}
  cost.add_fraction_of_peak(untouched, gmacs=4.0, peak=None)
  assert 'fraction_of_peak' not in untouched


def test_device_name():
  assert cost.device_name('gpu', 'NVIDIA H200') == 'NVIDIA H200'
  assert cost.device_name('cpu', '').endswith('cores)')
