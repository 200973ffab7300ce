"""Compile a run's train and eval steps for a TPU topology without the TPU (ahead of time).

JAX describes a TPU slice from its name alone (`jax.experimental.topologies`,
with libtpu installed: the `tpu` extra); the real steps of `train.build_step`
and the bucketed evaluator, built for a `Mesh` of those abstract devices with
the run's shardings, lower and compile to the TPU executable XLA would run.
Its `memory_analysis()` is the memory per chip and its `cost_analysis()` the
FLOPs and HBM bytes per chip and step; with the chip's peak and bandwidth
(`cost.ACCELERATOR_*`) they give the roofline bounds, what a chip can do at
best when compute-bound or memory-bound.

  python scripts/aot_compile.py --config=configs/ade20k_t.py --topology=v5e:2x2 --find-max-batch
  python main.py --config=configs/ade20k_t.py --mode=compile --topology=v5e:4x4   # the same

Backend choices (depthwise form, banded loss) follow the mesh's platform, so
this compiles what a TPU run would.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from cgrseg_jax import cost, errors, train
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.evaluation import bucketed

# libtpu as a compiler only: without the first two it probes the host for a TPU it is not on
# and prints a page of warnings; the third lets several processes (test workers, a main.py
# beside a script) load it, which its lockfile forbids to guard a real TPU none of them uses.
LIBTPU_ENV = {
  'TPU_ACCELERATOR_TYPE': 'v5litepod-4',
  'TPU_WORKER_HOSTNAMES': 'localhost',
  'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
}
GENERATIONS = ('v4', 'v5e', 'v5p', 'v6e')


class AOTError(errors.UserError):
  """A topology or batch that cannot be compiled here, said in one line."""


def topology_mesh(topology: str) -> Mesh:
  """A one-axis 'data' Mesh of the abstract devices of `topology` (e.g. 'v5e:2x2', 'v5p:2x2x2')."""
  generation = topology.split(':')[0]
  if generation not in GENERATIONS or ':' not in topology:
    raise AOTError(
      f'--topology={topology!r}; expected <generation>:<shape> with generation one of {GENERATIONS}, '
      "e.g. 'v5e:2x2', 'v5e:4x4', 'v4:2x2x1', 'v5p:2x2x2', 'v6e:2x2'"
    )
  for key, value in LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform='tpu')
  except Exception as e:  # missing libtpu, unknown shape: jaxlib raises several types
    raise AOTError(
      f'--topology={topology}: no TPU topology ({type(e).__name__}: {str(e).splitlines()[0]}); '
      'install the tpu extra (pip install -e .[tpu])'
    ) from None
  return Mesh(np.asarray(desc.devices), ('data',))


@dataclasses.dataclass
class Compiled:
  """One compiled step's figures, per device (one TensorCore: a chip on v5e/v5p/v6e)."""

  batch_per_device: int
  seconds: float  # lower + compile
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # donated arguments reused for outputs
  temp_bytes: int
  code_bytes: int
  flops: float
  hbm_bytes: float  # XLA's 'bytes accessed'

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def _compile(lowered_fn: Callable[[], object], batch: int) -> Compiled:
  start = time.perf_counter()
  exe = lowered_fn().compile()
  seconds = time.perf_counter() - start
  mem = exe.memory_analysis()
  costs = exe.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  return Compiled(
    batch_per_device=batch,
    seconds=round(seconds, 1),
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    code_bytes=int(mem.generated_code_size_in_bytes),
    flops=float(costs.get('flops', 0.0)),
    hbm_bytes=float(costs.get('bytes accessed', 0.0)),
  )


def compile_train(config, mesh: Mesh, batch_per_device: int, parts=None) -> Compiled:
  """The run's train step (train.build_step; `parts` if built already) for `mesh` at a
  global batch of batch_per_device x devices."""
  parts = parts or train.build_step(config, mesh)
  batch = train.abstract_train_batch(config, mesh, batch_per_device * mesh.size)
  return _compile(lambda: parts.step_fn.lower(parts.abstract_state, batch), batch_per_device)


def compile_eval(config, mesh: Mesh, batch_per_device: int, hw, parts=None) -> Compiled:
  """The bucketed evaluator's step for `mesh` on (h, w) images (padded bucket = label size)."""
  parts = parts or train.build_step(config, mesh)
  info = input_pipeline.dataset_info(config)
  step = bucketed.cached_eval_step(parts.model, mesh, config.model.num_classes, info.ignore_index)
  batch = bucketed.abstract_batch(parts.data_sharding, batch_per_device * mesh.size, hw)
  variables = {'params': parts.abstract_state.params, 'batch_stats': parts.abstract_state.batch_stats}
  return _compile(lambda: step.lower(variables, batch), batch_per_device)


def largest_batch(compile_at: Callable[[int], Compiled], hbm_bytes: float, limit: int = 1024) -> tuple[int, list]:
  """The largest per-device batch whose step fits in `hbm_bytes`: doubling from 1,
  then bisection (every try a compile); (0, tries) when batch 1 does not fit."""
  tries = []

  def fits(b):
    c = compile_at(b)
    tries.append(c)
    return c.peak_bytes <= hbm_bytes

  if not fits(1):
    return 0, tries
  lo, hi = 1, None
  while hi is None and lo < limit:
    if fits(min(2 * lo, limit)):
      lo = min(2 * lo, limit)
    else:
      hi = min(2 * lo, limit)
  hi = hi or lo
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, tries


def roofline(c: Compiled, device_kind: str, devices: int, dtype: str) -> dict:
  """Compute- and memory-bound step times and the img/s per device and per slice they imply."""
  peak = cost.peak_gflops('tpu', device_kind, dtype)
  hbm = cost.accelerator_memory(device_kind)
  compute_s = c.flops / (peak * 1e9) if peak else None
  memory_s = c.hbm_bytes / (hbm.bandwidth_gbps * 1e9) if hbm else None
  bound = max(t for t in (compute_s, memory_s) if t is not None) if (compute_s or memory_s) else None
  per_device = c.batch_per_device / bound if bound else None
  return dict(
    compute_bound_ms=None if compute_s is None else round(1e3 * compute_s, 3),
    memory_bound_ms=None if memory_s is None else round(1e3 * memory_s, 3),
    bound_by='memory' if (memory_s or 0) >= (compute_s or 0) else 'compute',
    img_per_s_per_device=None if per_device is None else round(per_device, 1),
    img_per_s_per_slice=None if per_device is None else round(per_device * devices, 1),
    bytes_per_flop=round(c.hbm_bytes / c.flops, 4) if c.flops else None,
  )


def run(
  config,
  topology: str,
  steps=('train', 'eval'),
  batch_per_device: Optional[int] = None,
  find_max_batch: bool = False,
  eval_hw=None,
) -> dict:
  """Compile `steps` of `config` for `topology`; the report `scripts/aot_compile.py` prints."""
  config = input_pipeline.with_dataset_defaults(config)
  mesh = topology_mesh(topology)
  kind = mesh.devices.flat[0].device_kind
  hbm = cost.accelerator_memory(kind)
  coords = [tuple(d.coords) for d in mesh.devices.flat]
  per_chip = len(coords) // len(set(coords))  # v4 lists both TensorCores of a chip
  capacity = hbm.capacity_gib * 2**30 / per_chip if hbm else None
  eval_hw = tuple(eval_hw or config.data.crop_size)
  parts = train.build_step(config, mesh)  # one model and step for every compile below
  peak = cost.peak_gflops('tpu', kind, config.precision)
  report = dict(
    topology=topology,
    device_kind=kind,
    devices=mesh.size,
    hosts=len({d.process_index for d in mesh.devices.flat}),
    devices_per_chip=per_chip,
    hbm_per_device_bytes=capacity,
    hbm_source=hbm.source if hbm else None,
    peak_tflops=peak / 1e3 if peak else None,
    model=config.model.name,
    precision=config.precision,
    crop=list(config.data.crop_size),
    eval_hw=list(eval_hw),
    steps={},
  )
  for name in steps:
    if name == 'train':
      compile_at = lambda b: compile_train(config, mesh, b, parts)
    elif name == 'eval':
      compile_at = lambda b: compile_eval(config, mesh, b, eval_hw, parts)
    else:
      raise AOTError(f'step {name!r}; expected train or eval')
    entry = {}
    if find_max_batch:
      if capacity is None:
        raise AOTError(f'{kind}: no HBM size in cost.ACCELERATOR_MEMORY, so no largest batch')
      best, tries = largest_batch(compile_at, capacity)
      entry['max_batch_per_device'] = best
      entry['tries'] = [(t.batch_per_device, t.peak_bytes) for t in tries]
      fitting = [t for t in tries if t.batch_per_device == best]
      compiled = fitting[-1] if fitting else tries[0]
    else:
      b = batch_per_device or max(1, config.batch_size // mesh.size if name == 'train' else 1)
      compiled = compile_at(b)
    entry.update(dataclasses.asdict(compiled))
    entry['peak_bytes'] = compiled.peak_bytes
    entry['fits'] = None if capacity is None else compiled.peak_bytes <= capacity
    entry.update(roofline(compiled, kind, mesh.size, config.precision))
    report['steps'][name] = entry
  return report


def format_report(r: dict) -> str:
  """The report as the lines a user reads."""
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  lines = [
    f'{r["model"]} ({r["precision"]}) on {r["topology"]}: {r["devices"]} x {r["device_kind"]} over '
    f'{r["hosts"]} host(s); HBM {gib(r["hbm_per_device_bytes"]) if r["hbm_per_device_bytes"] else "?"} per device, '
    f'peak {r["peak_tflops"]} TFLOP/s'
  ]
  for name, s in r['steps'].items():
    size = f'crop {r["crop"][0]}x{r["crop"][1]}' if name == 'train' else f'{r["eval_hw"][0]}x{r["eval_hw"][1]}'
    lines.append(
      f'  {name} step, {size}, batch {s["batch_per_device"]}/device: args {gib(s["argument_bytes"])}, temp '
      f'{gib(s["temp_bytes"])}, out {gib(s["output_bytes"])} (aliased {gib(s["alias_bytes"])}), peak '
      f'{gib(s["peak_bytes"])} -> {"fits" if s["fits"] else "does NOT fit" if s["fits"] is False else "?"}; '
      f'compiled in {s["seconds"]}s'
    )
    lines.append(
      f'    {s["flops"]:.3g} FLOPs, {s["hbm_bytes"]:.3g} HBM bytes ({s["bytes_per_flop"]} B/FLOP): compute '
      f'{s["compute_bound_ms"]} ms, memory {s["memory_bound_ms"]} ms -> {s["bound_by"]}-bound, at best '
      f'{s["img_per_s_per_device"]} img/s per device, {s["img_per_s_per_slice"]} per slice'
    )
    if 'max_batch_per_device' in s:
      lines.append(f'    largest batch per device that fits: {s["max_batch_per_device"]} (tries {s["tries"]})')
  return '\n'.join(lines)
