"""AdamW with mmcv's per-parameter multipliers and the poly + warmup schedule.

Upstream (mmseg 0.27 / mmcv 1.x) builds one optimizer parameter group per
parameter with `DefaultOptimizerConstructor(paramwise_cfg=dict(custom_keys=...))`:

- the keys of `custom_keys` are sorted by length, longest first, ties
  alphabetically; the first key that is a *substring* of the full parameter
  name wins, and sets the group's `lr = base_lr * lr_mult` and
  `weight_decay = base_wd * decay_mult` (either multiplier defaults to 1);
- `torch.optim.AdamW` then applies decoupled decay `p -= lr_g * wd_g * p`
  (on the parameter before the Adam step) and `p -= lr_g * adam_update`;
- the lr hook rescales every group from its *initial* lr each iteration
  (poly decay, then linear warmup over the first iterations).

Names are the upstream state-dict keys (`models.registry.param_names`), so
the same `custom_keys` dict as the upstream config gives the same groups.
`optax.adamw` would scale the decay by the global lr only, hence the custom
chain below: Adam moments, + wd_g * p per leaf, x per-leaf lr at step i.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgrseg_jax import errors
from cgrseg_jax.models import registry

_ALLOWED_MULTS = ('lr_mult', 'decay_mult')


def match_custom_key(name: str, custom_keys: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
  """(lr_mult, decay_mult) of one parameter by mmcv's rule (see module doc)."""
  for key in sorted(sorted(custom_keys), key=len, reverse=True):
    if key in name:
      mults = custom_keys[key]
      bad = set(mults) - set(_ALLOWED_MULTS)
      if bad:
        raise ValueError(f'custom_keys[{key!r}] has unknown fields {sorted(bad)}; expected {_ALLOWED_MULTS}')
      return float(mults.get('lr_mult', 1.0)), float(mults.get('decay_mult', 1.0))
  return 1.0, 1.0


def multipliers(params: Any, custom_keys: Mapping[str, Mapping[str, float]], model: str) -> tuple[Any, Any]:
  """Two pytrees like `params` of registered `model`: lr and weight-decay multipliers."""
  names = registry.param_names(params, model)
  pairs = jax.tree_util.tree_map(lambda n: match_custom_key(n, custom_keys), names)
  is_pair = lambda x: isinstance(x, tuple)
  lr = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
  wd = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
  return lr, wd


def poly_warmup_factor(step, total_steps: int, power: float = 1.0, warmup_steps: int = 0, warmup_ratio: float = 1e-6):
  """mmcv `PolyLrUpdaterHook` with `warmup='linear'` as a factor on the
  group's initial lr, at 0-based iteration `step` (min_lr = 0, as upstream).

  poly:   (1 - i / total) ** power
  warmup: x (1 - (1 - i / warmup) * (1 - ratio)) while i < warmup
  """
  i = jnp.asarray(step, jnp.float32)
  # (total - i) / total rather than 1 - i / total: exact near the end in float32.
  coeff = jnp.maximum((total_steps - i) / total_steps, 0.0) ** power
  if warmup_steps > 0:
    # 1 - (1 - t)(1 - r) written as t + r (1 - t): no float32 cancellation near t = 0.
    t = i / warmup_steps
    coeff = jnp.where(i < warmup_steps, coeff * (t + warmup_ratio * (1.0 - t)), coeff)
  return coeff


class ScaleByGroupLrState(NamedTuple):
  count: jax.Array


def scale_by_group_lr(
  base_lr: float, lr_mults: Any, factor_fn: Callable[[jax.Array], jax.Array]
) -> optax.GradientTransformation:
  """updates * -(base_lr * lr_mult * factor_fn(count)), per leaf; count from 0."""

  def init_fn(params):
    del params
    return ScaleByGroupLrState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    lr = base_lr * factor_fn(state.count)
    updates = jax.tree_util.tree_map(lambda u, m: (-lr * m) * u, updates, lr_mults)
    return updates, ScaleByGroupLrState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def add_group_decay(weight_decay: float, decay_mults: Any) -> optax.GradientTransformation:
  """updates + weight_decay * decay_mult * params, per leaf (before the lr scaling,
  so the decay is lr_g * wd_g * p as in torch AdamW)."""

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError('add_group_decay needs the params')
    updates = jax.tree_util.tree_map(
      lambda u, p, m: u + (weight_decay * m) * p if m else u, updates, params, decay_mults
    )
    return updates, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def build_optimizer(
  params: Any,
  *,
  model: str,
  lr: float,
  weight_decay: float,
  total_steps: int,
  betas=(0.9, 0.999),
  eps: float = 1e-8,
  power: float = 1.0,
  warmup_steps: int = 0,
  warmup_ratio: float = 1e-6,
  custom_keys: Mapping[str, Mapping[str, float]],
  grad_clip: float | None = None,
) -> optax.GradientTransformation:
  """The upstream optimizer for `params` (multipliers are static Python floats
  baked into the transformation, so they are not part of the optimizer state)."""
  lr_mults, decay_mults = multipliers(params, custom_keys, model)
  factor = lambda i: poly_warmup_factor(i, total_steps, power, warmup_steps, warmup_ratio)
  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  chain += [
    optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps),
    add_group_decay(weight_decay, decay_mults),
    scale_by_group_lr(lr, lr_mults, factor),
  ]
  return optax.chain(*chain)


def build_optimizer_from_config(params: Any, config) -> optax.GradientTransformation:
  """`config.optimizer` + `config.schedule` + `config.total_steps` -> the
  optimizer named by `config.optimizer.name` (default: the model family's)."""
  name = registry.recipe_value(config, 'optimizer.name')
  if name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name={name!r}; expected one of {sorted(OPTIMIZERS)}')
  tx = OPTIMIZERS[name](params, config)
  k = accumulation_steps(config)
  # The inner optimizer (and so its schedule's count) steps once per k micro-batches, on
  # their mean gradient; the partial sum lives in the optimizer state, so it is checkpointed.
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def accumulation_steps(config) -> int:
  """`config.grad_accum_steps` (micro-batches per optimizer step), checked."""
  k = config.get('grad_accum_steps', 1)
  if not isinstance(k, int) or k < 1:
    raise errors.ConfigError(f'config.grad_accum_steps={k!r}; expected an integer >= 1')
  return k


def _adamw_mmcv(params: Any, config) -> optax.GradientTransformation:
  o, s = config.optimizer, config.schedule
  custom_keys = {k: dict(v) for k, v in o.custom_keys.items()}
  return build_optimizer(
    params,
    model=config.model.name,
    lr=o.lr,
    weight_decay=o.weight_decay,
    total_steps=config.total_steps,
    betas=tuple(o.betas),
    eps=o.eps,
    power=s.power,
    warmup_steps=s.warmup_steps,
    warmup_ratio=s.warmup_ratio,
    custom_keys=custom_keys,
    grad_clip=o.get('grad_clip', None),
  )


def learning_rate(config, step) -> float:
  """The base (multiplier 1) lr at iteration `step`, for logging."""
  s = config.schedule
  if registry.recipe_value(config, 'optimizer.name') == 'sgd':
    return float(
      warmup_poly_lr(step, config.optimizer.lr, config.total_steps, s.warmup_steps, s.warmup_factor, s.power)
    )
  return float(
    config.optimizer.lr
    * np.asarray(poly_warmup_factor(step, config.total_steps, s.power, s.warmup_steps, s.warmup_ratio))
  )


# --------------------------------------------------------------------------- CSFCN recipe: SGD


def warmup_poly_lr(
  step,
  base_lr: float,
  max_iters: int,
  warmup_iters: int = 2480,
  warmup_factor: float = 1.0 / 3.0,
  power: float = 0.9,
  target_lr: float = 0.0,
):
  """CSFCN's `WarmupPolyLR` for the update at 0-based `step`.

  Upstream steps the scheduler before each optimizer step, so update `step`
  uses the scheduler's epoch T = step + 1:
    T <  W: factor = warmup_factor (1 - T / W) + T / W           (linear warmup from lr / 3)
    T >= W: factor = (1 - (T - W) / (max_iters - W)) ** power    (poly; 0 from T = max_iters on)
  lr = target_lr + (base_lr - target_lr) * factor.
  """
  t = jnp.asarray(step, jnp.float32) + 1.0
  w = float(warmup_iters)
  if warmup_iters > 0:
    alpha = t / w
    warm = warmup_factor * (1.0 - alpha) + alpha
  else:
    warm = jnp.float32(1.0)
  poly = jnp.maximum(1.0 - (t - w) / max(max_iters - warmup_iters, 1), 0.0) ** power
  factor = jnp.where(t < w, warm, poly)
  return target_lr + (base_lr - target_lr) * factor


def _path_labels(params: Any, frozen: tuple) -> Any:
  frozen = {tuple(p) for p in frozen}
  return jax.tree_util.tree_map_with_path(
    lambda path, _: 'frozen' if tuple(k.key for k in path) in frozen else 'train', params
  )


def build_sgd(
  params: Any,
  *,
  lr: float,
  max_iters: int,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  warmup_iters: int = 2480,
  warmup_factor: float = 1.0 / 3.0,
  power: float = 0.9,
  frozen: tuple = (),
) -> optax.GradientTransformation:
  """The CSFCN optimizer: `torch.optim.SGD` (momentum, no dampening, coupled
  weight decay g + wd p, buffer starts at the first gradient) with upstream's
  two groups: weight decay 0 for 1-D parameters (biases, BN), `weight_decay`
  for the rest; lr by `warmup_poly_lr`.

  `frozen`: Flax parameter paths that never change (no update, no decay), e.g.
  `models.csfcn.UPSTREAM_FROZEN` to reproduce upstream, whose `set_optimizer`
  drops the 3-D Conv1d weights of the context block.
  """
  decay_mask = jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
  schedule = lambda i: -warmup_poly_lr(i, lr, max_iters, warmup_iters, warmup_factor, power)
  train = optax.chain(
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.trace(decay=momentum, nesterov=False),
    optax.scale_by_schedule(schedule),
  )
  if not frozen:
    return train
  return optax.multi_transform({'train': train, 'frozen': optax.set_to_zero()}, _path_labels(params, frozen))


def _sgd(params: Any, config) -> optax.GradientTransformation:
  """`build_sgd` from the config: `optimizer.lr / momentum / weight_decay`,
  `schedule.warmup_steps / warmup_factor / power`; with `optimizer.upstream_frozen`
  the family's `upstream_frozen` parameters stay at their init (as upstream)."""
  o, s = config.optimizer, config.schedule
  frozen = registry.family_of(config.model.name).upstream_frozen if o.upstream_frozen else ()
  return build_sgd(
    params,
    lr=o.lr,
    max_iters=config.total_steps,
    momentum=o.momentum,
    weight_decay=o.weight_decay,
    warmup_iters=s.warmup_steps,
    warmup_factor=s.warmup_factor,
    power=s.power,
    frozen=frozen,
  )


# config.optimizer.name -> builder(params, config).
OPTIMIZERS = {'adamw_mmcv': _adamw_mmcv, 'sgd': _sgd}
