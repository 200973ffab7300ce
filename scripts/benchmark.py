"""Speed, size and cost of a registered model (CGRSeg, CSFCN) in JAX, optionally against its PyTorch reference.

  python scripts/benchmark.py --config=configs/ade20k_t.py --compare-torch --output=bench_t.json
  python scripts/benchmark.py --config=configs/ade20k_t.py --profile          # where the time goes
  python scripts/benchmark.py --config=configs/synthetic_t.py --variant=tiny --size=128,128 \\
      --batch-sizes=1,2 --train-batch=2 --reps=3 --compare-torch          # smoke run
  # CSFCN (SPEC-CSFCN speed protocol: batch 1 at 1024x2048 and 720x960; train at the crop)
  python scripts/benchmark.py --config=configs/cityscapes_csfcn.py --size=1024,2048 --batch-sizes=1 --skip-train --compare-torch
  python scripts/benchmark.py --config=configs/camvid_csfcn.py --size=720,960 --batch-sizes=1 --skip-train --compare-torch
  python scripts/benchmark.py --config=configs/cityscapes_csfcn.py --batch-sizes=1 --train-batch=12 --compare-torch  # recipe batch; 4 fits 24 GB

Measured at the config's crop size (`--size` overrides), random weights:

* parameters; multiply-adds of every conv and matmul (attention included,
  pooling written as a matmul not; `cgrseg_jax.cost.count_macs`), counted on
  the traced program, and XLA's cost-analysis FLOPs;
* JAX: compile time, eval latency (batch 1) and throughput (each batch size)
  of the jitted eval forward (`model.apply(..., train=False)`, normalised
  input, logits at the input size) in float32 and bfloat16; the training step
  (`cgrseg_jax.train.train_step`: forward, the family's loss and optimizer) at
  `--train-batch`; peak device memory where the backend reports it;
* `--compare-torch`: the same for the family's PyTorch reference (`cgrseg_jax/torch_reference/`) on the same
  inputs in the same run (eager; `--torch-compile` adds `torch.compile`), its
  training step the same recipe from the same config fields
  (`cgrseg_jax/torch_reference/training.py`: optimizer with its parameter
  groups and lr schedule, loss, ignore index), and the ratios JAX speed / PyTorch speed.

Each framework runs in its own subprocess (`--worker`), one after the other,
with explicit thread settings (`--threads`, default: all cores, for PyTorch's
intra-op pool and OpenMP; XLA sizes its pool to the cores itself): in one
process, PyTorch's OpenMP workers spin while XLA's pool runs and the two fight
over the cores (the old single-process run spent a third of its CPU time in the
kernel). Every timing runs `--warmup` untimed calls, then `--reps` timed ones,
each ending in `block_until_ready` (JAX) or a synchronised result (PyTorch);
the JAX worker runs with glibc's huge-page tunable, as `main.py` does
(`cgrseg_jax/host_memory.py`), PyTorch with the caller's environment (the JSON's
`glibc_tunables` says which);
the median is reported with min/max and the relative spread (max-min)/median.
`--compare-torch` also runs `torch.compile` (`--no-torch-compile` skips it; a
failure is reported, not fatal). The JSON (`--output`) has `params`, `gmacs`,
`input`, `device`, `peak_gflops` (`cgrseg_jax.cost.peak_gflops`; on CPU at
least `matmul_gflops`, a measured float32 matmul), `jax` / `torch` / `torch_compile` sections
(`compile_s`, `eval_latency_ms_bs1`, `eval_img_per_s` by batch size,
`train_step_s`, `train_img_per_s`, `peak_memory_bytes`, `fraction_of_peak`)
and `ratio` (`eval_bs1`, `eval_bs8`, `train`: JAX speed / PyTorch eager speed).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cgrseg_jax import config_files, cost, host_memory, losses, optim, train
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data.transforms import MEAN_RGB, STD_RGB
from cgrseg_jax.models import registry

PAPER = {
  't': dict(gflops=4.0, params_m=9.4, img_per_s=138.4),
  'b': dict(gflops=7.6, params_m=18.1, img_per_s=98.4),
  'l': dict(gflops=14.9, params_m=35.7, img_per_s=73.0),
}


# ------------------------------------------------------------------ timing


def measure(fn, warmup: int, reps: int) -> dict:
  """Median/min/max seconds of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  samples = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - t)
  med = statistics.median(samples)
  return dict(
    median_s=med, min_s=min(samples), max_s=max(samples), spread=(max(samples) - min(samples)) / med, reps=reps
  )


def report_train(out: dict, timing: dict, bs: int, label: str, log, **extra):
  """Store a training-step timing in a framework's result (`train_step_s`,
  `train_img_per_s`, `train_batch`, `train` and `extra`, e.g. the compile time) and log it."""
  out.update(
    train_step_s=timing['median_s'], train_img_per_s=bs / timing['median_s'], train_batch=bs, train=timing, **extra
  )
  text = f'{label}: {timing["median_s"]:.3f} s/step ({bs / timing["median_s"]:.2f} img/s)'
  for k, v in extra.items():
    text += f', {k.removeprefix("train_").removesuffix("_s").replace("_", " ")} {v:.1f}s'
  log(text)


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  """Best float32 GFLOP/s of a jitted n x n x n matmul on JAX's default device
  (the CPU's achievable rate, `cost.peak_gflops`'s floor)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  mm = jax.jit(jnp.dot).lower(a, a).compile()
  return 2 * n**3 / measure(lambda: mm(a, a).block_until_ready(), 1, reps)['min_s'] / 1e9


def peak_memory():
  """Peak device memory of this process where the backend reports it, else None."""
  stats = jax.devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def peak_rss() -> int:
  """Peak resident memory of this process (the worker: one framework only)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------- JAX


def bench_jax(args, name, num_classes, hw, config, data, log) -> dict:
  out: dict = {}
  build = functools.partial(registry.build_model, name, num_classes)
  model32 = build()
  variables = jax.jit(lambda k: model32.init(k, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(0))
  out['params'] = int(sum(x.size for x in jax.tree_util.tree_leaves(variables['params'])))

  for dtype_name in args.dtypes:
    dtype = dict(float32=jnp.float32, bfloat16=jnp.bfloat16)[dtype_name]
    model = build(dtype=dtype)
    fwd = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    res: dict = {'eval': {}}
    for bs in args.batch_sizes:
      x = jnp.asarray(data['x'][:bs])
      t = time.perf_counter()
      lowered = fwd.lower(variables, x)
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t
      if bs == args.batch_sizes[0] and dtype_name == 'float32':
        out['compile_s'] = compile_s
        out['gmacs'] = cost.model_macs(name, num_classes, variables, x) / bs / 1e9
        flops = cost.xla_flops(compiled)
        out['gflops_xla'] = flops / bs / 1e9 if flops else None
      timing = measure(lambda: compiled(variables, x).block_until_ready(), args.warmup, args.reps)
      timing.update(compile_s=compile_s, img_per_s=bs / timing['median_s'])
      res['eval'][str(bs)] = timing
      log(
        f'jax {dtype_name} eval bs{bs}: {1e3 * timing["median_s"]:.1f} ms/batch '
        f'({timing["img_per_s"]:.2f} img/s), compile {compile_s:.1f}s'
      )
    res['eval_latency_ms_bs1'] = 1e3 * res['eval']['1']['median_s'] if '1' in res['eval'] else None
    res['eval_img_per_s'] = {k: v['img_per_s'] for k, v in res['eval'].items()}
    if dtype_name == 'float32':
      out.update(res)
    else:
      out[dtype_name] = res

  if not args.skip_train:
    bs = args.train_batch
    model = registry.build_from_config(config)
    tx = optim.build_optimizer_from_config(variables['params'], config)
    # Copies: the step donates its state, the eval variables must survive it.
    own = jax.tree_util.tree_map(jnp.copy, variables)
    state = train.TrainState(
      step=jnp.zeros([], jnp.int32),
      params=own['params'],
      batch_stats=own['batch_stats'],
      opt_state=tx.init(own['params']),
      rng=jax.random.PRNGKey(1),
    )
    step = jax.jit(
      functools.partial(
        train.train_step,
        model=model,
        tx=tx,
        dtype=model.dtype,
        method=registry.family_of(config.model.name).loss_method,
        loss=losses.build_loss(
          registry.recipe_value(config, 'loss'), config, input_pipeline.dataset_info(config).ignore_index
        ),
      ),
      donate_argnums=(0,),
    )
    batch = {
      'image': jnp.asarray(data['image'][:bs]),
      'label': jnp.asarray(data['label'][:bs]),
      'valid_hw': jnp.asarray(np.tile(np.asarray(hw, np.int32), (bs, 1))),
    }
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    train_compile = time.perf_counter() - t
    box = [state]

    def one():
      box[0], metrics = compiled(box[0], batch)
      metrics['loss'].block_until_ready()

    report_train(
      out,
      measure(one, args.warmup, args.reps),
      bs,
      f'jax train bs{bs} ({config.precision})',
      log,
      train_compile_s=train_compile,
    )
  out['peak_memory_bytes'] = peak_memory() or peak_rss()
  out['device'] = cost.device_name(jax.devices()[0].platform, str(jax.devices()[0].device_kind))
  out['platform'] = jax.devices()[0].platform
  out['host'] = f'{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {out["platform"]}'
  if out['platform'] == 'cpu':
    out['matmul_gflops'] = matmul_gflops()
    log(f'jax float32 matmul 2048^3: {out["matmul_gflops"]:.0f} GFLOP/s')
  if args.profile:
    out['profile'] = profile_jax(model32, variables, jnp.asarray(data['x'][:1]), args.profile_top, log)
  return out


def profile_jax(model, variables, x, top: int, log) -> dict:
  """Per-XLA-op device time of the eval forward (jax.profiler), grouped by the
  model module each op comes from (its op_name metadata)."""
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compiled = fwd.lower(variables, x).compile()
  origin = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{[^}]*op_name="([^"]+)"', line)
    if m:
      origin[m.group(1)] = m.group(2)
  for _ in range(2):
    compiled(variables, x).block_until_ready()
  reps = 5
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(reps):
        compiled(variables, x).block_until_ready()
    files = sorted(glob.glob(os.path.join(d, '**', '*.trace.json.gz'), recursive=True))
    events = json.load(gzip.open(files[-1]))['traceEvents'] if files else []
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in origin:
      per_op[e['name']] += e.get('dur', 0) / 1e3 / reps  # ms per forward

  def parts(op):
    # 'jit(f)/CGRSegModel/CGRSegModel.decode/.../backbone/network_0/0/mlp/mid/conv_general_dilated'
    # -> ['backbone', 'network_0', '0', 'mlp', 'mid', 'conv_general_dilated']
    return [q for q in origin[op].split('/') if not q.startswith('jit(') and '.' not in q and q != 'CGRSegModel']

  by_module, by_layer, kinds = collections.Counter(), collections.Counter(), collections.Counter()
  for op, ms in per_op.items():
    path = parts(op)
    by_module['/'.join(path[:2]) or '(top)'] += ms
    # The layer kind across blocks: the last named scopes, indices dropped.
    named = [q for q in path[2:] if not q.isdigit()]
    by_layer[f'{path[0] if path else ""}: {"/".join(named[-3:])}'] += ms
    kinds[re.sub(r'[.\d]+$', '', op)] += ms
  total = sum(per_op.values())
  result = dict(
    total_op_ms=total,
    by_module={k: round(v, 3) for k, v in by_module.most_common()},
    by_layer_kind={k: round(v, 3) for k, v in by_layer.most_common(top)},
    by_op_kind={k: round(v, 3) for k, v in kinds.most_common(top)},
    top_ops=[dict(op=k, ms=round(v, 3), origin=origin[k]) for k, v in per_op.most_common(top)],
  )
  log(f'jax profile (bs1 float32, {total:.1f} ms of XLA ops per forward):')
  for title, counter in (('stage / head part', by_module), ('layer kind', by_layer)):
    log(f' by {title}:')
    for k, v in counter.most_common(top):
      log(f'  {v:8.2f} ms  {100 * v / max(total, 1e-9):5.1f}%  {k}')
  return result


# ----------------------------------------------------------------- PyTorch


def bench_torch(args, name, num_classes, hw, config, data, log, compile_mode: bool) -> dict:
  import torch  # the optional torch extra

  from cgrseg_jax.torch_reference import training  # needs torch

  family = registry.family_of(name)
  torch.set_num_threads(args.threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  tm = family.torch_reference(name, num_classes)
  tm = importlib.import_module(type(tm).__module__).randomize_(tm, seed=0).to(device)
  out: dict = dict(threads=args.threads, device=device, eval={})
  tm.eval()
  runner = tm
  if compile_mode:
    runner = torch.compile(tm)
  for bs in args.batch_sizes:
    x = torch.from_numpy(data['x'][:bs]).permute(0, 3, 1, 2).contiguous().to(device)

    def run():
      with torch.inference_mode():
        runner(x)
      sync()

    t = time.perf_counter()
    run()  # first call: torch.compile compiles here; eager warms its allocator
    first = time.perf_counter() - t
    timing = measure(run, max(args.warmup - 1, 0), args.reps)
    timing.update(first_call_s=first, img_per_s=bs / timing['median_s'])
    out['eval'][str(bs)] = timing
    log(
      f'torch{" compiled" if compile_mode else ""} eval bs{bs}: {1e3 * timing["median_s"]:.1f} ms/batch '
      f'({timing["img_per_s"]:.2f} img/s)'
    )
  first_bs = str(args.batch_sizes[0])
  out['compile_s'] = out['eval'][first_bs]['first_call_s'] if compile_mode else 0.0
  out['eval_latency_ms_bs1'] = 1e3 * out['eval']['1']['median_s'] if '1' in out['eval'] else None
  out['eval_img_per_s'] = {k: v['img_per_s'] for k, v in out['eval'].items()}

  if not args.skip_train:
    bs = args.train_batch
    # The family's recipe from the config (torch_reference/training.py): CGRSeg AdamW with mmcv's
    # parameter groups + cross-entropy on the stride-8 logits resized to the labels; CSFCN SGD
    # (1-D params without decay) + OHEM on the full-size logits.
    step = training.build_train_step(tm, config, torch_compile=compile_mode)
    image = torch.from_numpy(data['image'][:bs]).to(device)
    label = torch.from_numpy(data['label'][:bs].astype(np.int64)).to(device)

    def one():
      step(image, label).item()
      sync()

    t = time.perf_counter()
    one()
    first = time.perf_counter() - t
    what = f'torch{" compiled" if compile_mode else ""} train bs{bs}'
    report_train(out, measure(one, max(args.warmup - 1, 0), args.reps), bs, what, log, train_first_call_s=first)
  out['peak_memory_bytes'] = int(torch.cuda.max_memory_allocated()) if device == 'cuda' else peak_rss()
  out['device'] = cost.device_name(device, torch.cuda.get_device_name() if device == 'cuda' else '')
  out['platform'] = device
  out['version'] = torch.__version__
  if args.profile and not compile_mode:
    out['profile'] = profile_torch(tm, data, args.profile_top, device, log)
  return out


def profile_torch(tm, data, top: int, device, log) -> list:
  import torch  # the optional torch extra

  tm.eval()
  x = torch.from_numpy(data['x'][:1]).permute(0, 3, 1, 2).contiguous().to(device)
  with torch.inference_mode():
    tm(x)
    with torch.profiler.profile() as prof:
      for _ in range(3):
        tm(x)
  rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
  table = [dict(op=e.key, self_ms=round(e.self_cpu_time_total / 1e3 / 3, 3), calls=e.count // 3) for e in rows]
  log('torch profile (bs1, self CPU ms per forward):')
  for r in table:
    log(f'  {r["self_ms"]:8.2f} ms  {r["op"]}')
  return table


# ------------------------------------------------------------------- report


def ratios(jax_res: dict, torch_res: dict) -> dict:
  def ratio(a, b):
    return a / b if a and b else None

  return dict(
    eval_bs1=ratio(jax_res.get('eval_img_per_s', {}).get('1'), torch_res.get('eval_img_per_s', {}).get('1')),
    eval_bs8=ratio(jax_res.get('eval_img_per_s', {}).get('8'), torch_res.get('eval_img_per_s', {}).get('8')),
    train=ratio(jax_res.get('train_img_per_s'), torch_res.get('train_img_per_s')),
  )


def table(result: dict) -> str:
  """Rows: measurements; columns: JAX f32 / bf16, PyTorch eager, torch.compile.
  A cell is the median, with the spread (max-min)/median of the repetitions and
  the fraction of peak on the lines below it."""
  cols = [('JAX f32', result['jax'])]
  if 'bfloat16' in result['jax']:
    cols.append(('JAX bf16', result['jax']['bfloat16']))
  for key, name in (('torch', 'PyTorch eager'), ('torch_compile', 'torch.compile')):
    if isinstance(result.get(key), dict) and 'eval' in result[key]:
      cols.append((name, result[key]))

  def timing(r, bs=None):
    return r.get('eval', {}).get(str(bs)) if bs is not None else r.get('train')

  rows = [('eval latency bs1 (ms)', lambda r: r.get('eval_latency_ms_bs1'), lambda r: timing(r, 1), 'eval_bs1')]
  for bs in result['batch_sizes']:
    rows.append(
      (
        f'eval img/s bs{bs}',
        lambda r, bs=bs: r.get('eval_img_per_s', {}).get(str(bs)),
        lambda r, bs=bs: timing(r, bs),
        f'eval_bs{bs}',
      )
    )
  rows += [
    (f'train step bs{result.get("train_batch")} (s)', lambda r: r.get('train_step_s'), timing, None),
    ('train img/s', lambda r: r.get('train_img_per_s'), timing, 'train'),
    ('compile / first call (s)', lambda r: r.get('compile_s'), lambda r: None, None),
    ('peak memory (GiB)', lambda r: (r.get('peak_memory_bytes') or 0) / 2**30 or None, lambda r: None, None),
  ]
  width = max(len(r[0]) for r in rows) + 2
  peak = result.get('peak_gflops')
  lines = [
    f'{result["model"]} at {result["input"][0]}x{result["input"][1]}, '
    f'{result["params"] / 1e6:.2f}M params, {result["gmacs"]:.2f} GMACs (convs+matmuls), '
    f'XLA {result.get("gflops_xla") or float("nan"):.2f} GFLOPs',
    f'device: {result.get("device")}; peak {peak or float("nan"):.0f} GFLOP/s float32'
    + (f' (measured matmul {result["matmul_gflops"]:.0f})' if result.get('matmul_gflops') else '')
    + f'; {result["host"]}',
    f'median of {result["reps"]} after {result["warmup"]} warm-up; (spread) = (max-min)/median; '
    '[%] = fraction of peak (train = 3 forwards)',
    'GLIBC_TUNABLES: '
    + '; '.join(f'{side} {v or "(none)"}' for side, v in (result.get('glibc_tunables') or {}).items()),
    ''.ljust(width) + ''.join(f'{n:>22}' for n, _ in cols),
  ]
  for name, get, get_timing, frac_key in rows:
    cells = []
    for _, r in cols:
      v = get(r)
      if not isinstance(v, (int, float)):
        cells.append(f'{"-":>22}')
        continue
      cell = f'{v:.2f}'
      t = get_timing(r)
      if t and 'spread' in t:
        cell += f' ({100 * t["spread"]:.0f}%)'
      frac = r.get('fraction_of_peak', {}).get(frac_key) if frac_key else None
      if frac is not None:
        cell += f' [{100 * frac:.1f}%]'
      cells.append(f'{cell:>22}')
    lines.append(name.ljust(width) + ''.join(cells))
  for key in ('torch_compile',):
    if isinstance(result.get(key), dict) and 'error' in result[key]:
      lines.append(f'torch.compile failed: {result[key]["error"][:200]}')
  if result.get('ratio'):
    lines.append(
      'JAX / PyTorch eager speed: ' + ', '.join(f'{k} {v:.2f}x' for k, v in result['ratio'].items() if v is not None)
    )
  if result.get('ratio_vs_torch_compile'):
    lines.append(
      'JAX / torch.compile speed: '
      + ', '.join(f'{k} {v:.2f}x' for k, v in result['ratio_vs_torch_compile'].items() if v is not None)
    )
  return '\n'.join(lines)


# ---------------------------------------------------------- processes


def worker_env(side: str, threads: int) -> dict:
  """Environment of a worker process. PyTorch: `threads` OpenMP/MKL threads
  (set before import) and the caller's environment otherwise. JAX: XLA's own
  pool (one thread per core), no OpenMP, and huge pages for XLA's temporaries
  as `main.py` runs (`host_memory`)."""
  env = dict(os.environ)
  env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads if side != 'jax' else 1)
  return host_memory.with_huge_pages(env) if side == 'jax' else env


def run_worker(args, side: str, log) -> dict:
  """Measure one framework in this process (`--worker=SIDE`)."""
  config, name, num_classes, hw = setup(args)
  data = make_data(args, hw, num_classes)
  if side == 'jax':
    return bench_jax(args, name, num_classes, hw, config, data, log)
  return bench_torch(args, name, num_classes, hw, config, data, log, compile_mode=side == 'torch_compile')


def spawn(side: str, argv: list[str], args, log) -> dict:
  """Run `--worker=SIDE` in a fresh interpreter; its result, or {'error': ...}."""
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, f'{side}.json')
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f'--worker={side}', f'--worker-output={out}']
    log(f'--- {side}: own process, {args.threads} threads')
    proc = subprocess.run(cmd, env=worker_env(side, args.threads), stdout=sys.stderr)
    if proc.returncode != 0 or not os.path.exists(out):
      return dict(error=f'{side} worker exited with status {proc.returncode}')
    with open(out) as f:
      return json.load(f)


def setup(args):
  config = config_files.load(args.config)
  with config.unlocked():
    if args.variant:  # a registered model name or its short form within the config's family (tiny)
      config.model.name = registry.resolve(args.variant, registry.family_of(config.model.name).name)
    if args.num_classes:
      config.model.num_classes = args.num_classes
  name, num_classes = config.model.name, config.model.num_classes
  hw = tuple(int(v) for v in args.size.split(',')) if args.size else tuple(config.data.crop_size)
  return config, name, num_classes, hw


def make_data(args, hw, num_classes) -> dict:
  """The same random images and labels in every worker (fixed seed)."""
  rng = np.random.default_rng(0)
  n = max(max(args.batch_sizes), args.train_batch)
  image = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
  mean, std = np.asarray(MEAN_RGB, np.float32), np.asarray(STD_RGB, np.float32)
  return dict(
    image=image,
    x=((image[..., ::-1].astype(np.float32) - mean) / std),
    label=rng.integers(0, num_classes, (n, *hw), dtype=np.uint8),
  )


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/ade20k_t.py')
  p.add_argument(
    '--model',
    '--variant',
    dest='variant',
    default=None,
    help='override config.model.name (csfcn, cgrseg_tiny, or tiny)',
  )
  p.add_argument('--num-classes', type=int, default=None)
  p.add_argument('--size', default=None, help='H,W (default: config.data.crop_size)')
  p.add_argument('--batch-sizes', default='1,8,32')
  p.add_argument('--train-batch', type=int, default=8)
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--reps', type=int, default=7)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='PyTorch intra-op / OpenMP threads')
  p.add_argument('--compare-torch', action='store_true')
  p.add_argument(
    '--torch-compile', action=argparse.BooleanOptionalAction, default=True, help='with --compare-torch: torch.compile'
  )
  p.add_argument('--skip-train', action='store_true')
  p.add_argument('--profile', action='store_true', help='per-op / per-module time of the bs1 eval forward')
  p.add_argument('--profile-top', type=int, default=15)
  p.add_argument('--output', default=None, help='write the JSON here')
  p.add_argument('--worker', choices=('jax', 'torch', 'torch_compile'), default=None, help=argparse.SUPPRESS)
  p.add_argument('--worker-output', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  if 'float32' not in args.dtypes:
    args.dtypes.insert(0, 'float32')
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  if args.worker:
    res = run_worker(args, args.worker, log)
    with open(args.worker_output, 'w') as f:
      json.dump(res, f)
    return 0

  config, name, num_classes, hw = setup(args)
  family = registry.family_of(name)
  variant = name[len(family.name) + 1 :] if name.startswith(family.name + '_') else name
  worker_argv = []  # the same options, less --output (the workers write their own files)
  skip = False
  for a in argv:
    if not skip and not a.startswith('--output'):
      worker_argv.append(a)
    skip = a == '--output'
  result: dict = dict(
    config=args.config,
    model=name,
    variant=variant,
    num_classes=num_classes,
    input=list(hw),
    batch_sizes=args.batch_sizes,
    train_batch=args.train_batch,
    warmup=args.warmup,
    reps=args.reps,
    threads=args.threads,
    paper=PAPER.get(variant),
  )
  result['glibc_tunables'] = {
    side: worker_env(side, args.threads).get('GLIBC_TUNABLES', '') for side in ('jax', 'torch')
  }
  result['jax'] = spawn('jax', worker_argv, args, log)
  if 'error' in result['jax']:
    log(result['jax']['error'])
    return 1
  for k in ('params', 'gmacs', 'gflops_xla', 'host', 'matmul_gflops'):
    result[k] = result['jax'].pop(k, None)
  result['device'] = result['jax'].get('device')
  plat = result['jax'].get('platform', 'cpu')
  result['peak_gflops'] = cost.peak_gflops(plat, result['device'] or '', matmul=result['matmul_gflops'])
  cost.add_fraction_of_peak(result['jax'], result['gmacs'], result['peak_gflops'])
  if 'bfloat16' in result['jax']:
    cost.add_fraction_of_peak(
      result['jax']['bfloat16'],
      result['gmacs'],
      cost.peak_gflops(plat, result['device'], 'bfloat16', result['matmul_gflops']),
    )
  if args.compare_torch:
    sides = ['torch'] + (['torch_compile'] if args.torch_compile else [])
    for side in sides:
      res = spawn(side, worker_argv, args, log)
      cost.add_fraction_of_peak(res, result['gmacs'], result['peak_gflops'])
      result[side] = res
    if 'error' in result['torch']:
      log(result['torch']['error'])
      return 1
    result['ratio'] = ratios(result['jax'], result['torch'])
    if 'eval' in result.get('torch_compile', {}):
      result['ratio_vs_torch_compile'] = ratios(result['jax'], result['torch_compile'])
  print(table(result))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(result, f, indent=2)
    log(f'wrote {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
