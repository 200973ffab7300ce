#!/usr/bin/env python3
"""CSFCN's float32 error stage by stage, against the PyTorch reference in float64.

  python scripts/csfcn_precision.py --sizes 368x480,184x240 --models csfcn:19,csfcn_tiny:11

For each model and input size: random weights (BN statistics calibrated on a
random batch, `torch_reference.csfcn.randomize_`), one random input; per stage
(feat8/16/32, cfc, sfc_offsets, sfc, logits), the worst relative error
max|a - b| / max|b| and the rms relative error rms(a - b) / rms(b) of the JAX
float32 model and of the PyTorch float32 model, both against the PyTorch model
run in float64 on the same weights and input. An error that grows through the
stages alike in both (a steady ratio) is float32 rounding amplified by the
network, not a different computation.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cgrseg_jax import convert
from cgrseg_jax.models import csfcn
from cgrseg_jax.torch_reference import csfcn as ref

STAGES = ('feat8', 'feat16', 'feat32', 'cfc', 'sfc_offsets', 'sfc', 'logits')


def rel(a, b) -> float:
  """Worst relative error, max|a - b| / max|b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def rms_rel(a, b) -> float:
  """Root-mean-square relative error, rms(a - b) / rms(b): the typical element, not the tail."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def measure(name: str, k: int, hw: tuple[int, int], seed: int) -> dict:
  """{stage: (worst jax, worst torch, rms jax, rms torch)}, float32 against float64, for one model and size."""
  torch_mod = ref.build_torch_csfcn(name, k)
  calib = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, 3, 64, 96)).astype(np.float32))
  ref.randomize_(torch_mod, seed=seed, calibrate=calib).eval()
  variables, _ = convert.state_dict_to_variables(torch_mod.state_dict(), model=name, num_classes=k)
  x = np.random.default_rng(seed + 1).standard_normal((1, *hw, 3)).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    f32 = {s: v.numpy() for s, v in torch_mod.forward_stages(xt).items()}
    f64 = {s: v.numpy() for s, v in torch_mod.double().forward_stages(xt.double()).items()}
  got = jax.jit(lambda v, x: csfcn.build(name, k).apply(v, x, method='stages'))(
    jax.tree_util.tree_map(jnp.asarray, variables), x
  )
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  out = {}
  for s in STAGES:
    want = f64[s][..., : hw[0], : hw[1]] if s == 'logits' else f64[s]
    torch32 = f32[s][..., : hw[0], : hw[1]] if s == 'logits' else f32[s]
    ours = nchw(got[s])
    out[s] = (rel(ours, want), rel(torch32, want), rms_rel(ours, want), rms_rel(torch32, want))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', default='368x480,184x240,200x328,232x296')
  p.add_argument('--models', default='csfcn:19,csfcn_tiny:11')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None, help='also write the table here')
  args = p.parse_args(argv)
  torch.set_num_threads(1)
  rows = []
  for spec in args.models.split(','):
    name, k = spec.split(':')
    for size in args.sizes.split(','):
      hw = tuple(int(v) for v in size.split('x'))
      errs = measure(name, int(k), hw, args.seed + sum(hw))
      rows.append(
        dict(
          model=name,
          classes=int(k),
          size=list(hw),
          stages={s: dict(jax=j, torch=t, jax_rms=jr, torch_rms=tr) for s, (j, t, jr, tr) in errs.items()},
        )
      )
      print(f'{name} ({k} classes) {hw[0]}x{hw[1]}, relative error against PyTorch float64:')
      print(f'  {"stage":12s} {"worst JAX":>10s} {"worst PT":>10s} {"rms JAX":>10s} {"rms PT":>10s} {"rms ratio":>9s}')
      for s, (j, t, jr, tr) in errs.items():
        print(f'  {s:12s} {j:10.2e} {t:10.2e} {jr:10.2e} {tr:10.2e} {jr / max(tr, 1e-30):9.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
