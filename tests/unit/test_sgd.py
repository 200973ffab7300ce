"""CSFCN's SGD (two groups, warmup + poly) against torch.optim.SGD with upstream's groups and schedule
(`cgrseg_jax.torch_reference.training`), and the configs' optimizer on both sides."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cgrseg_jax import config_files, optim
from cgrseg_jax.models import cfc, csfcn, key_layout, registry
from cgrseg_jax.torch_reference import csfcn as ref
from cgrseg_jax.torch_reference import training
from csfcn_helpers import variables_for
from paths import REPO


# The Cityscapes recipe's WarmupPolyLR settings (upstream train.py / lr_scheduler.py).
RECIPE = dict(warmup_iters=2480, warmup_factor=1 / 3, power=0.9)


@pytest.mark.parametrize('step', [0, 1, 1000, 2478, 2479, 2480, 50000, 119038, 119039])
def test_schedule_is_upstream_with_scheduler_stepped_first(step):
  # update `step` runs after the scheduler's (step + 1)-th .step()
  want = training.warmup_poly_lr(0.01, step + 1, 119040, **RECIPE)
  assert float(optim.warmup_poly_lr(step, 0.01, 119040)) == pytest.approx(want, rel=1e-5, abs=1e-9)
  assert float(optim.warmup_poly_lr(0, 0.01, 119040)) == pytest.approx(0.01 / 3 + 0.01 * 2 / 3 / 2480, rel=1e-6)


@pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')  # upstream's order, on purpose
@pytest.mark.parametrize('upstream_frozen', [False, True])
def test_three_sgd_steps_match_torch(upstream_frozen):
  torch_mod = ref.randomize_(ref.ContextBlock(64), seed=0)
  flax_mod = cfc.ContextBlock()
  x = np.zeros((1, 4, 4, 512), np.float32)
  params = variables_for(torch_mod, flax_mod, x, train=False)['params']
  base_lr, max_iters, warm = 0.01, 10, 2
  # Upstream's set_optimizer hands only 1-, 2- and 4-D tensors to SGD: the family's frozen list is its 3-D ones.
  frozen_names = training.frozen_parameter_names('csfcn', ('cfc',)) if upstream_frozen else set()
  if upstream_frozen:
    assert frozen_names == {n for n, p in torch_mod.named_parameters() if p.dim() not in (1, 2, 4)}
  groups = training.sgd_param_groups(torch_mod, frozen_names)
  opt = torch.optim.SGD(groups, lr=base_lr, momentum=0.9, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda T: training.warmup_poly_lr(1.0, T, max_iters, warmup_iters=warm, warmup_factor=1 / 3, power=0.9)
  )
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
    grads = key_layout.fill_from_state_dict(grads_t, {'params': params}, csfcn.KEY_LAYOUT)[0]['params']
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = key_layout.fill_from_state_dict(
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


@pytest.mark.parametrize('upstream_frozen', [False, True])
def test_config_recipe_matches_torch(upstream_frozen):
  """configs/cityscapes_csfcn.py's optimizer on both sides (the torch one from
  `training.build_optimizer` + `lr_factor`): the same parameters after updates
  through the end of the warmup, the frozen ones unchanged."""
  config = config_files.load(os.path.join(REPO, 'configs', 'cityscapes_csfcn.py'))
  with config.unlocked():
    config.total_steps, config.schedule.warmup_steps = 10, 2
    config.optimizer.upstream_frozen = upstream_frozen
  name, k = config.model.name, config.model.num_classes
  tm = ref.randomize_(ref.build_torch_csfcn(name, k), seed=0)
  names = dict(tm.named_parameters())
  template = {'params': registry.family_of(name).variable_shapes(name, k)['params']}
  params = key_layout.fill_from_state_dict(names, template, csfcn.KEY_LAYOUT)[0]['params']
  before = params
  opt = training.build_optimizer(tm, config)
  initial, factor = [g['lr'] for g in opt.param_groups], training.lr_factor(config)
  tx = optim.build_optimizer_from_config(params, config)
  state = tx.init(params)
  rng = np.random.default_rng(2)
  for i in range(4):
    grads_t = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in names.items()}
    for g, lr in zip(opt.param_groups, initial):
      g['lr'] = lr * factor(i)
    for n, p in names.items():
      p.grad = torch.from_numpy(grads_t[n])
    opt.step()
    grads = key_layout.fill_from_state_dict(grads_t, template, csfcn.KEY_LAYOUT)[0]['params']
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = key_layout.fill_from_state_dict({n: p.detach() for n, p in names.items()}, template, csfcn.KEY_LAYOUT)[0]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, want['params'])
  frozen = params['cfc']['key_conv']['kernel'], before['cfc']['key_conv']['kernel']
  assert np.array_equal(*frozen) == upstream_frozen
