"""Speed, size and cost of CGRSeg in JAX, optionally against the PyTorch reference.

  python scripts/benchmark.py --config=configs/ade20k_t.py --compare-torch --output=bench_t.json
  python scripts/benchmark.py --config=configs/ade20k_t.py --profile          # where the time goes
  python scripts/benchmark.py --config=configs/synthetic_t.py --variant=tiny --size=128,128 \\
      --batch-sizes=1,2 --train-batch=2 --reps=3 --compare-torch          # smoke run

Measured at the config's crop size (`--size` overrides), random weights:

* parameters; multiply-adds of every conv and matmul (attention included),
  counted on the traced program, and XLA's cost-analysis FLOPs;
* JAX: compile time, eval latency (batch 1) and throughput (each batch size)
  of the jitted eval forward (`model.apply(..., train=False)`, normalised
  input, logits at the input size) in float32 and bfloat16; the training step
  (`cgrseg_jax.train.train_step`: forward, loss, backward, AdamW) at
  `--train-batch`; peak device memory where the backend reports it;
* `--compare-torch`: the same for `tests/torch_reference.py` on the same
  inputs in the same run (eager; `--torch-compile` adds `torch.compile`),
  and the ratios JAX speed / PyTorch speed.

Every timing runs `--warmup` untimed calls, then `--reps` timed ones, each
ending in `block_until_ready` (JAX) or a synchronised result (PyTorch); the
median is reported with min/max. PyTorch uses as many threads as there are
cores (`--threads`). The JSON (`--output`) has `params`, `gmacs`, `input`,
`jax` / `torch` sections (`compile_s`, `eval_latency_ms_bs1`,
`eval_img_per_s` by batch size, `train_step_s`, `train_img_per_s`) and
`ratio` (`eval_bs1`, `eval_bs8`, `train`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import glob
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, 'tests')):
  if p not in sys.path:
    sys.path.insert(0, p)

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
  return dict(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples), reps=reps)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ----------------------------------------------------------------- counting


def count_macs(closed_jaxpr) -> int:
  """Multiply-adds of every convolution and dot_general in a (nested) jaxpr."""
  import jax

  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == 'conv_general_dilated':
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params['dimension_numbers'].rhs_spec  # (out feat, in feat, spatial...)
        total += int(np.prod(out)) * rhs[spec[1]] * int(np.prod([rhs[d] for d in spec[2:]]))
      elif name == 'dot_general':
        (lc, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lc]))
      for v in eqn.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            total += walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            total += walk(sub)
    return total

  return walk(closed_jaxpr.jaxpr)


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def peak_memory():
  import jax

  stats = jax.devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


# --------------------------------------------------------------------- JAX


def bench_jax(args, variant, num_classes, hw, config, data, log) -> dict:
  import jax
  import jax.numpy as jnp
  from cgrseg_jax import optim, train
  from cgrseg_jax.models import build_segmentor
  from cgrseg_jax.models.layers import depthwise_as_grouped_conv

  out: dict = {}
  model32 = build_segmentor(variant, num_classes)
  variables = jax.jit(lambda k: model32.init(k, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(0))
  out['params'] = int(sum(x.size for x in jax.tree_util.tree_leaves(variables['params'])))

  for dtype_name in args.dtypes:
    dtype = dict(float32=jnp.float32, bfloat16=jnp.bfloat16)[dtype_name]
    model = build_segmentor(variant, num_classes, dtype=dtype)
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
        # Depthwise convs run as shifted sums; trace them as convolutions (un-jitted,
        # so no cached trace is reused) to count their multiply-adds.
        with depthwise_as_grouped_conv():
          out['gmacs'] = (
            count_macs(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)) / bs / 1e9
          )
        flops = xla_flops(compiled)
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
    model = train.build_model(config)
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
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, dtype=model.dtype), donate_argnums=(0,))
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

    timing = measure(one, args.warmup, args.reps)
    out.update(
      train_step_s=timing['median_s'],
      train_img_per_s=bs / timing['median_s'],
      train_batch=bs,
      train_compile_s=train_compile,
      train=timing,
    )
    log(
      f'jax train bs{bs} ({config.precision}): {timing["median_s"]:.3f} s/step ({bs / timing["median_s"]:.2f} '
      f'img/s), compile {train_compile:.1f}s'
    )
  out['peak_memory_bytes'] = peak_memory()
  out['device'] = str(jax.devices()[0].device_kind)
  if args.profile:
    out['profile'] = profile_jax(model32, variables, jnp.asarray(data['x'][:1]), args.profile_top, log)
  return out


def profile_jax(model, variables, x, top: int, log) -> dict:
  """Per-XLA-op device time of the eval forward (jax.profiler), grouped by the
  model module each op comes from (its op_name metadata)."""
  import jax

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


def bench_torch(args, variant, num_classes, hw, data, log, compile_mode: bool) -> dict:
  import torch
  import torch.nn.functional as F
  import torch_reference as ref

  torch.set_num_threads(args.threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  tm = ref.randomize_(ref.build_torch_segmentor(variant, num_classes), seed=0).to(device)
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
    tm.train()
    decode = torch.compile(tm.decode) if compile_mode else tm.decode
    # The reference recipe: AdamW; the loss on stride-8 logits resized to the labels.
    opt = torch.optim.AdamW(tm.parameters(), lr=1.2e-4, betas=(0.9, 0.999), weight_decay=0.01)
    image = torch.from_numpy(data['image'][:bs]).to(device)
    label = torch.from_numpy(data['label'][:bs].astype(np.int64)).to(device)
    mean = torch.tensor([123.675, 116.28, 103.53], device=device)
    std = torch.tensor([58.395, 57.12, 57.375], device=device)

    def one():
      x = ((image.flip(-1).float() - mean) / std).permute(0, 3, 1, 2).contiguous()  # BGR -> RGB, NCHW
      logits = decode(x)
      logits = F.interpolate(logits, size=label.shape[1:], mode='bilinear', align_corners=False)
      loss = F.cross_entropy(logits, label, ignore_index=255, reduction='sum') / label.numel()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      loss.item()
      sync()

    t = time.perf_counter()
    one()
    first = time.perf_counter() - t
    timing = measure(one, max(args.warmup - 1, 0), args.reps)
    out.update(
      train_step_s=timing['median_s'],
      train_img_per_s=bs / timing['median_s'],
      train_batch=bs,
      train_first_call_s=first,
      train=timing,
    )
    log(
      f'torch{" compiled" if compile_mode else ""} train bs{bs}: {timing["median_s"]:.3f} s/step '
      f'({bs / timing["median_s"]:.2f} img/s)'
    )
  out['peak_memory_bytes'] = int(torch.cuda.max_memory_allocated()) if device == 'cuda' else None
  if args.profile and not compile_mode:
    out['profile'] = profile_torch(tm, data, args.profile_top, device, log)
  return out


def profile_torch(tm, data, top: int, device, log) -> list:
  import torch

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
  cols = [('JAX f32', result['jax'])]
  if 'bfloat16' in result['jax']:
    cols.append(('JAX bf16', result['jax']['bfloat16']))
  for key, name in (('torch', 'PyTorch eager'), ('torch_compile', 'torch.compile')):
    if isinstance(result.get(key), dict) and 'eval' in result[key]:
      cols.append((name, result[key]))
  rows = [('eval latency bs1 (ms)', lambda r: r.get('eval_latency_ms_bs1'))]
  for bs in result['batch_sizes']:
    rows.append((f'eval img/s bs{bs}', lambda r, bs=bs: r.get('eval_img_per_s', {}).get(str(bs))))
  rows += [
    (f'train step bs{result.get("train_batch")} (s)', lambda r: r.get('train_step_s')),
    ('train img/s', lambda r: r.get('train_img_per_s')),
    ('compile / first call (s)', lambda r: r.get('compile_s')),
  ]
  width = max(len(r[0]) for r in rows) + 2
  lines = [
    f'CGRSeg-{result["variant"].upper()} at {result["input"][0]}x{result["input"][1]}, '
    f'{result["params"] / 1e6:.2f}M params, {result["gmacs"]:.2f} GMACs (convs+matmuls), '
    f'XLA {result.get("gflops_xla") or float("nan"):.2f} GFLOPs; {result["host"]}',
    ''.ljust(width) + ''.join(f'{n:>16}' for n, _ in cols),
  ]
  for name, get in rows:
    cells = []
    for _, r in cols:
      v = get(r)
      cells.append(f'{v:16.2f}' if isinstance(v, (int, float)) else f'{"-":>16}')
    lines.append(name.ljust(width) + ''.join(cells))
  if result.get('ratio'):
    lines.append(
      'JAX / PyTorch eager speed: ' + ', '.join(f'{k} {v:.2f}x' for k, v in result['ratio'].items() if v is not None)
    )
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/ade20k_t.py')
  p.add_argument('--variant', default=None, help='override config.model.variant (t | b | l | tiny)')
  p.add_argument('--num-classes', type=int, default=None)
  p.add_argument('--size', default=None, help='H,W (default: config.data.crop_size)')
  p.add_argument('--batch-sizes', default='1,8,32')
  p.add_argument('--train-batch', type=int, default=8)
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='PyTorch intra-op threads')
  p.add_argument('--compare-torch', action='store_true')
  p.add_argument('--torch-compile', action='store_true', help='with --compare-torch: also torch.compile')
  p.add_argument('--skip-train', action='store_true')
  p.add_argument('--profile', action='store_true', help='per-op / per-module time of the bs1 eval forward')
  p.add_argument('--profile-top', type=int, default=15)
  p.add_argument('--output', default=None, help='write the JSON here')
  args = p.parse_args(argv)
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  if 'float32' not in args.dtypes:
    args.dtypes.insert(0, 'float32')

  config = load_config(args.config)
  with config.unlocked():
    if args.variant:
      config.model.variant = args.variant
    if args.num_classes:
      config.model.num_classes = args.num_classes
  variant, num_classes = config.model.variant, config.model.num_classes
  hw = tuple(int(v) for v in args.size.split(',')) if args.size else tuple(config.data.crop_size)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  rng = np.random.default_rng(0)
  n = max(max(args.batch_sizes), args.train_batch)
  image = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
  mean, std = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)
  data = dict(
    image=image,
    x=((image[..., ::-1].astype(np.float32) - mean) / std),
    label=rng.integers(0, num_classes, (n, *hw), dtype=np.uint8),
  )

  import jax

  result: dict = dict(
    config=args.config,
    variant=variant,
    num_classes=num_classes,
    input=list(hw),
    batch_sizes=args.batch_sizes,
    train_batch=args.train_batch,
    warmup=args.warmup,
    reps=args.reps,
    host=f'{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}',
    paper=PAPER.get(variant),
  )
  result['jax'] = bench_jax(args, variant, num_classes, hw, config, data, log)
  for k in ('params', 'gmacs', 'gflops_xla'):
    result[k] = result['jax'].pop(k, None)
  if args.compare_torch:
    result['torch'] = bench_torch(args, variant, num_classes, hw, data, log, compile_mode=False)
    result['ratio'] = ratios(result['jax'], result['torch'])
    if args.torch_compile:
      try:
        result['torch_compile'] = bench_torch(args, variant, num_classes, hw, data, log, compile_mode=True)
        result['ratio_vs_torch_compile'] = ratios(result['jax'], result['torch_compile'])
      except Exception as e:  # inductor needs a working C++ toolchain; report, keep the rest
        result['torch_compile'] = dict(error=f'{type(e).__name__}: {str(e)[:500]}')
        log(f'torch.compile failed: {result["torch_compile"]["error"]}')
  print(table(result))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(result, f, indent=2)
    log(f'wrote {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
