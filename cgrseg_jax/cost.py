"""What a program costs and what the hardware can do.

- `count_macs` / `model_macs`: multiply-adds of a traced program (a registered
  model's eval forward), by mmcv / fvcore's convention; `torch_macs` counts a
  PyTorch module's by hooks, the independent count they are checked against;
  `xla_flops`: XLA's cost analysis of a compiled program.
- `peak_gflops`: a device's float32 / bfloat16 peak, from the accelerator
  table `ACCELERATOR_PEAK_TFLOPS` or, on CPU, from /proc/cpuinfo
  (`cpu_peak_gflops`) and a measured matmul rate passed in;
  `add_fraction_of_peak`: achieved over peak for a benchmark's result.

`scripts/benchmark.py` measures; this module only counts and looks up.
"""

from __future__ import annotations

import math
import os
import platform
import re
from typing import NamedTuple

import jax
from jax.extend import core

from cgrseg_jax.models import registry

# ----------------------------------------------------------------- counting


def count_macs(closed_jaxpr) -> int:
  """Multiply-adds of the convolutions and matmuls (dot_general) of a traced
  program, nested sub-jaxprs (jit, custom_jvp, ...) included.

  The convention of mmcv's get_flops / fvcore (both count multiply-adds): a conv
  is out_h*out_w*out_c * in_c/groups*kh*kw, a matmul its output size times the
  contracted size; elementwise work, pooling, bilinear resizing, grid sampling
  and PixelShuffle count nothing. Two differences from a plain sum over equations:
  - a matmul with a trace-time constant operand is resampling written as a
    matmul (`resize.adaptive_avg_pool`'s averaging matrices: CSFCN's pyramid
    pooling, CGRSeg's pyramid context), i.e. pooling: not counted;
  - a scan body counts `length` times, a cond its costliest branch (a while body once).
  Attention matmuls (activation x activation) are counted, as fvcore does and
  mmcv (hooks on conv / linear modules only) does not: CGRSeg-T at 512x512 is
  4.53 G here, 3.95 G of convs and 0.58 G of attention; the paper's 4.0 is
  mmcv's count (the convs, plus the small per-element terms mmcv adds for norms
  and activations). CSFCN at 720x960 is 50.35 G, 19.1 G of it the deep stem's
  two full-width 3x3 convs at stride 2 (a 7x7-stem ResNet-18 would be ~25 G).
  """
  jaxpr = closed_jaxpr.jaxpr
  return _macs(jaxpr, [False] * len(jaxpr.invars))


def _macs(jaxpr, const_in) -> int:
  """`count_macs` of one jaxpr, given which of its inputs are trace-time constants."""
  const = set(jaxpr.constvars) | {v for v, c in zip(jaxpr.invars, const_in) if c}
  total = 0
  for eqn in jaxpr.eqns:
    in_const = [isinstance(v, core.Literal) or v in const for v in eqn.invars]
    if all(in_const):  # computed from constants only (a table built at trace time): XLA folds it
      const.update(eqn.outvars)
      continue
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out feat, in feat per group, spatial...)
      total += math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    elif name == 'dot_general' and not any(in_const[:2]):
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == 'cond':  # operand 0 picks the branch, the rest are the branches' inputs
      total += max(_macs(b.jaxpr, in_const[1:]) for b in eqn.params['branches'])
      continue
    for sub in _sub_jaxprs(eqn):
      # jit / custom_jvp / remat pass their operands through in order; loops carry state.
      wired = name not in ('scan', 'while') and len(sub.invars) == len(eqn.invars)
      times = eqn.params['length'] if name == 'scan' else 1
      total += times * _macs(sub, in_const if wired else [False] * len(sub.invars))
  return total


def _sub_jaxprs(eqn):
  """The jaxprs nested in an equation's parameters (jit bodies, custom_jvp functions, loop bodies, ...)."""
  for value in eqn.params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(sub, core.ClosedJaxpr):
        yield sub.jaxpr
      elif isinstance(sub, core.Jaxpr):
        yield sub


def model_macs(name: str, num_classes: int, variables, x) -> int:
  """`count_macs` of the registered model's eval forward on `x` (its whole batch).
  Shapes are enough: `variables` and `x` may be `jax.ShapeDtypeStruct`s."""
  # Depthwise convs may run as shifted sums; trace them as convolutions to count their multiply-adds.
  xla = {'depthwise': 'xla'} if 'depthwise' in registry.family_of(name).build_options else {}
  model = registry.build_model(name, num_classes, **xla)
  return count_macs(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))


def torch_macs(model, x) -> int:
  """Multiply-adds of a PyTorch module's forward on `x`, counted independently
  of the traced program: convs and linears by forward hooks, plus the matmuls
  (matmul / bmm / @) by a torch function mode. Pooling, resizing and
  elementwise work count nothing, as in `count_macs`."""
  import torch  # the optional torch extra

  total = [0]

  def conv_hook(mod, inp, out):
    total[0] += out.numel() * mod.weight[0].numel()  # weight (out, in/groups, *kernel)

  def linear_hook(mod, inp, out):
    total[0] += out.numel() * mod.weight.shape[1]

  class MatmulCounter(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
      out = func(*args, **(kwargs or {}))
      if func is torch.einsum:
        raise NotImplementedError('einsum in the model: count it explicitly')
      if func in (torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.__matmul__):
        total[0] += out.numel() * args[0].shape[-1]
      return out

  handles = []
  for m in model.modules():
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
      handles.append(m.register_forward_hook(conv_hook))
    elif isinstance(m, torch.nn.Linear):
      handles.append(m.register_forward_hook(linear_hook))
  try:
    with torch.no_grad(), MatmulCounter():
      model(x)
  finally:
    for h in handles:
      h.remove()
  return total[0]


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled program by XLA's cost analysis (None where the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


# --------------------------------------------------------------------- peaks


# Dense peak throughput in TFLOP/s (float32, bfloat16) of known accelerators,
# from the vendors' data sheets (no sparsity: the sheets' "with sparsity"
# tensor-core figures halved; float32 without TF32 on NVIDIA). The first
# matching substring of the device name (`jax.Device.device_kind`,
# `torch.cuda.get_device_name`) wins, so list specific names first.
ACCELERATOR_PEAK_TFLOPS = (
  ('H200', 67.0, 989.0),  # NVIDIA H200 Tensor Core GPU data sheet, H200 SXM
  ('H100 PCIe', 51.0, 756.0),  # NVIDIA H100 Tensor Core GPU data sheet, H100 PCIe
  ('H100', 67.0, 989.0),  # NVIDIA H100 Tensor Core GPU data sheet, H100 SXM
  ('A100', 19.5, 312.0),  # NVIDIA A100 Tensor Core GPU data sheet
  ('L40S', 91.6, 362.0),  # NVIDIA L40S GPU data sheet
  ('L4', 30.3, 121.0),  # NVIDIA L4 Tensor Core GPU data sheet
  ('A10', 31.2, 125.0),  # NVIDIA A10 Tensor Core GPU data sheet
  # V100 and T4 have no bfloat16 tensor cores: their FP16 tensor-core peak, an upper bound.
  ('V100', 15.7, 125.0),  # NVIDIA V100 Tensor Core GPU data sheet, V100 SXM2
  ('T4', 8.1, 65.0),  # NVIDIA T4 Tensor Core GPU data sheet
  # TPU float32 matmuls run as bf16 passes: the bf16 peak bounds both. Google Cloud TPU
  # documentation, system architecture page of each version (peak bf16 compute per chip).
  # device_kind: v6e 'TPU v6 lite', v5e 'TPU v5 lite', v5p 'TPU v5', v4 'TPU v4'.
  ('TPU v6', 918.0, 918.0),  # TPU v6e (Trillium)
  ('TPU v5 lite', 197.0, 197.0),  # TPU v5e
  ('TPU v5', 459.0, 459.0),  # TPU v5p
  ('TPU v4', 275.0, 275.0),  # TPU v4
)


class Memory(NamedTuple):
  capacity_gib: float  # HBM per chip
  bandwidth_gbps: float  # HBM bandwidth per chip, GB/s (1e9 bytes)
  source: str


# HBM per chip of the TPUs `aot.py` compiles for, from the same Google Cloud TPU
# pages as the peaks above (system architecture of each version); matched on
# `device_kind` like ACCELERATOR_PEAK_TFLOPS, specific names first.
ACCELERATOR_MEMORY = (
  ('TPU v6', Memory(32.0, 1640.0, 'cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 1640 GB/s')),
  ('TPU v5 lite', Memory(16.0, 819.0, 'cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 819 GB/s')),
  ('TPU v5', Memory(95.0, 2765.0, 'cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 2765 GB/s')),
  ('TPU v4', Memory(32.0, 1228.0, 'cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1228 GB/s')),
)


def accelerator_memory(device_kind: str) -> Memory | None:
  """HBM size and bandwidth of `device_kind`, or None when not in ACCELERATOR_MEMORY."""
  for name, memory in ACCELERATOR_MEMORY:
    if name.lower() in device_kind.lower():
      return memory
  return None


def device_name(platform_name: str, kind: str) -> str:
  """The accelerator's name, or the CPU model with its core count."""
  if platform_name == 'cpu':
    model = platform.processor() or platform.machine()
    try:
      with open('/proc/cpuinfo') as f:
        model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), model)
    except OSError:
      pass
    return f'{model} ({os.cpu_count()} cores)'
  return kind


def cpu_flops_per_cycle(info: str) -> int | None:
  """float32 FLOPs per cycle and core from /proc/cpuinfo text: two FMA pipes x
  lanes x 2. 64 with two 512-bit pipes: AVX-512 on AMD Zen 5 (family 26; its
  mobile parts split 512-bit ops, so this bounds them from above) and on Intel
  Xeon (most server cores have two AVX-512 FMA units). 32 with two 256-bit pipes:
  AVX2 cores, Zen 4 (AVX-512 on 256-bit pipes), Intel client AVX-512. 16 without FMA."""
  flags = re.search(r'^flags\s*:(.*)$', info, re.M)
  if not flags:
    return None
  flags = set(flags.group(1).split())
  if 'fma' not in flags:
    return 16
  family = re.search(r'^cpu family\s*:\s*(\d+)', info, re.M)
  zen5 = 'AuthenticAMD' in info and family is not None and int(family.group(1)) >= 26
  xeon = 'GenuineIntel' in info and 'Xeon' in info
  return 64 if 'avx512f' in flags and (zen5 or xeon) else 32


def cpu_peak_gflops(info: str | None = None, cores: int | None = None) -> float | None:
  """float32 peak of this CPU: cores x clock x `cpu_flops_per_cycle`. The clock is
  /proc/cpuinfo's, which in a VM is the nominal one: cores boosting above it go
  faster (`peak_gflops` also takes a measured matmul rate)."""
  if info is None:
    try:
      with open('/proc/cpuinfo') as f:
        info = f.read()
    except OSError:
      return None
  mhz = [float(m) for m in re.findall(r'^cpu MHz\s*:\s*([\d.]+)', info, re.M)]
  per_cycle = cpu_flops_per_cycle(info)
  if not mhz or not per_cycle:
    return None
  return (cores or os.cpu_count() or 1) * max(mhz) / 1e3 * per_cycle


def peak_gflops(platform_name: str, device: str, dtype: str = 'float32', matmul: float | None = None) -> float | None:
  """The device's peak in GFLOP/s; on CPU, the larger of `cpu_peak_gflops` and the rate
  of a measured matmul (`matmul`): the peak can be no lower than what a matmul achieves,
  and a VM's cpuinfo clock is the nominal one while the cores may boost above it.
  None for an accelerator not in `ACCELERATOR_PEAK_TFLOPS`."""
  if platform_name == 'cpu':
    # bf16 on CPU: the float32 peak (XLA CPU computes bf16 in f32, see README).
    return max((p for p in (cpu_peak_gflops(), matmul) if p), default=None)
  for name, fp32, bf16 in ACCELERATOR_PEAK_TFLOPS:
    if name.lower() in device.lower():
      return 1e3 * (bf16 if dtype == 'bfloat16' else fp32)
  return None


def add_fraction_of_peak(res: dict, gmacs: float | None, peak: float | None):
  """Achieved FLOP/s over the peak, in `res['fraction_of_peak']`: 2 FLOPs per
  multiply-add of the counted forward (`res['eval_img_per_s']` by batch size);
  a training step (`res['train_img_per_s']`) counted as 3 forwards (forward +
  twice the work for the backward), the usual estimate. Nothing without both numbers."""
  if not gmacs or not peak:
    return
  frac = {f'eval_bs{bs}': ips * 2 * gmacs / peak for bs, ips in res.get('eval_img_per_s', {}).items()}
  if res.get('train_img_per_s'):
    frac['train'] = res['train_img_per_s'] * 3 * 2 * gmacs / peak
  res['fraction_of_peak'] = frac
