"""CSFCN's SGD (two groups, warmup + poly) against torch.optim.SGD and the upstream schedule formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cgrseg_jax import convert, optim
from cgrseg_jax.models import cfc, csfcn
from cgrseg_jax.torch_reference import csfcn as ref
from csfcn_helpers import variables_for


def upstream_lr(base, T, max_iters, warmup_iters=2480, warmup_factor=1 / 3, power=0.9):
  """WarmupPolyLR.get_lr (linear warmup, target_lr 0) at scheduler epoch T."""
  if T < warmup_iters:
    alpha = T / warmup_iters
    return base * (warmup_factor * (1 - alpha) + alpha)
  return base * (1 - (T - warmup_iters) / (max_iters - warmup_iters)) ** power


@pytest.mark.parametrize('step', [0, 1, 1000, 2478, 2479, 2480, 50000, 119038, 119039])
def test_schedule_is_upstream_with_scheduler_stepped_first(step):
  # update `step` runs after the scheduler's (step + 1)-th .step()
  want = upstream_lr(0.01, step + 1, 119040)
  assert float(optim.warmup_poly_lr(step, 0.01, 119040)) == pytest.approx(want, rel=1e-5, abs=1e-9)
  assert float(optim.warmup_poly_lr(0, 0.01, 119040)) == pytest.approx(0.01 / 3 + 0.01 * 2 / 3 / 2480, rel=1e-6)


def _torch_groups(model, upstream: bool):
  """train.py's set_optimizer: 1-D -> no decay; 2-D/4-D -> decay; 3-D (Conv1d) dropped
  upstream, or put with the decayed weights when trained."""
  wd, nowd = [], []
  for _, p in model.named_parameters():
    if p.dim() == 1:
      nowd.append(p)
    elif p.dim() in (2, 4) or not upstream:
      wd.append(p)
  return [{'params': wd}, {'params': nowd, 'weight_decay': 0}]


@pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')  # upstream's order, on purpose
@pytest.mark.parametrize('upstream_frozen', [False, True])
def test_three_sgd_steps_match_torch(upstream_frozen):
  torch_mod = ref.randomize_(ref.ContextBlock(64), seed=0)
  flax_mod = cfc.ContextBlock()
  x = np.zeros((1, 4, 4, 512), np.float32)
  params = variables_for(torch_mod, flax_mod, x, train=False)['params']
  base_lr, max_iters, warm = 0.01, 10, 2
  opt = torch.optim.SGD(_torch_groups(torch_mod, upstream_frozen), lr=base_lr, momentum=0.9, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda T: upstream_lr(1.0, T, max_iters, warm))
  frozen = tuple(p[1:] for p in csfcn.UPSTREAM_FROZEN) if upstream_frozen else ()  # paths inside `cfc`
  tx = optim.build_sgd(params, lr=base_lr, max_iters=max_iters, warmup_iters=warm, frozen=frozen)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  names = dict(torch_mod.named_parameters())
  for _ in range(3):
    grads_t = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in names.items()}
    sched.step()  # upstream order: scheduler, then the optimizer
    for k, p in names.items():
      p.grad = torch.from_numpy(grads_t[k])
    opt.step()
    grads = convert.fill_from_state_dict(grads_t, {'params': params}, csfcn.KEY_LAYOUT)[0]['params']
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = convert.fill_from_state_dict(
    {k: v.detach() for k, v in torch_mod.named_parameters()}, {'params': params}, csfcn.KEY_LAYOUT
  )[0]['params']
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, want)
  before = variables_for(ref.randomize_(ref.ContextBlock(64), seed=0), flax_mod, x, train=False)['params']
  moved = not np.array_equal(params['key_conv']['kernel'], before['key_conv']['kernel'])
  assert moved != upstream_frozen
  assert not np.array_equal(params['key_conv']['bias'], before['key_conv']['bias'])  # 1-D: trained upstream too


def test_no_decay_for_one_dimensional_params():
  params = {'w': jnp.ones((2, 3, 4, 5)), 'b': jnp.ones((5,))}
  tx = optim.build_sgd(params, lr=1.0, max_iters=10, warmup_iters=0, weight_decay=0.1)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  lr0 = float(optim.warmup_poly_lr(0, 1.0, 10, 0))
  np.testing.assert_allclose(updates['w'], -lr0 * 0.1 * np.ones((2, 3, 4, 5)), rtol=1e-6)
  assert np.all(np.asarray(updates['b']) == 0)
