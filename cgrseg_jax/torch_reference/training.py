"""The families' training recipes in plain PyTorch (the `torch` extra), read from the same config as the JAX side.

Written from upstream's semantics, independently of `cgrseg_jax.optim` and
`cgrseg_jax.losses` (the tests check those against this module, and
`scripts/benchmark.py --compare-torch` trains the PyTorch reference with it):

- optimizer, `config.optimizer.name` (default: the family's recipe):
  'adamw_mmcv' = `torch.optim.AdamW` with mmcv 1.x's per-parameter groups from
  `optimizer.custom_keys` (`mmcv_param_groups`); 'sgd' = CSFCN's
  `torch.optim.SGD` with weight decay 0 for 1-D parameters and, with
  `optimizer.upstream_frozen`, the family's `upstream_frozen` parameters left
  out (`sgd_param_groups`);
- lr schedule, a factor on each group's initial lr per update (`lr_factor`):
  mmcv's poly + linear warmup (`mmcv_lr`) or CSFCN's `WarmupPolyLR`
  (`warmup_poly_lr`, stepped before each update as upstream);
- loss, `config.loss` (default: the family's recipe): 'cross_entropy' =
  mmseg 0.27's decode-head loss (`decode_head_loss`), 'ohem' = CSFCN's
  `OhemCrossEntropy2d` (`ohem_cross_entropy`), with the dataset's ignore index;
- input: BGR uint8 -> normalised RGB NCHW with `MEAN_RGB` / `STD_RGB` (`image_normalizer`);
- `build_train_step`: forward through the family's `loss_method`, loss,
  backward, optimizer step.

Parameter names are the upstream state-dict keys (the references keep that
layout), the names mmcv's `custom_keys` and the family's key layout match.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data.transforms import MEAN_RGB, STD_RGB
from cgrseg_jax.models import registry

# --------------------------------------------------------------------------- optimizers


def mmcv_param_groups(
  model: torch.nn.Module, base_lr: float, base_wd: float, custom_keys: Mapping[str, Mapping[str, float]]
) -> list[dict]:
  """mmcv 1.x `DefaultOptimizerConstructor.add_params` with
  `paramwise_cfg=dict(custom_keys=...)`: one group per parameter (with its
  `name`). Keys sorted by length, longest first, ties alphabetical; the first
  key that is a substring of the name sets `lr = base_lr * lr_mult` and
  `weight_decay = base_wd * decay_mult`; a parameter no key matches has
  neither (the optimizer's defaults apply)."""
  sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
  groups = []
  for name, param in model.named_parameters():
    group = {'params': [param], 'name': name}
    for key in sorted_keys:
      if key in name:
        group['lr'] = base_lr * custom_keys[key].get('lr_mult', 1.0)
        group['weight_decay'] = base_wd * custom_keys[key].get('decay_mult', 1.0)
        break
    groups.append(group)
  return groups


def sgd_param_groups(model: torch.nn.Module, frozen=()) -> list[dict]:
  """CSFCN train.py's `set_optimizer` groups: the weight decay for parameters of
  more than one dimension, 0 for 1-D ones (biases, BN); parameters named in
  `frozen` are not handed to the optimizer (upstream's keeps only 1-, 2- and
  4-D tensors: `frozen_parameter_names`)."""
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    if name not in frozen:
      (decay if param.dim() > 1 else no_decay).append(param)
  return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]


def frozen_parameter_names(name: str, prefix: tuple[str, ...] = ()) -> set[str]:
  """PyTorch names of registered model `name`'s `upstream_frozen` parameters,
  through its key layout; with `prefix` (Flax path components), those inside that
  submodule, relative to it (e.g. ('cfc',) for a reference `ContextBlock`)."""
  family = registry.family_of(name)
  n = len(prefix)
  return {family.key_layout.torch_key('params', p[n:]) for p in family.upstream_frozen if tuple(p[:n]) == prefix}


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
  """The torch optimizer of `config`'s recipe for the reference `model` of
  `config.model.name`, every group at its initial lr (`lr_factor` scales them)."""
  o = config.optimizer
  name = registry.recipe_value(config, 'optimizer.name')
  if name == 'adamw_mmcv':
    groups = mmcv_param_groups(model, o.lr, o.weight_decay, o.custom_keys)
    for g in groups:
      del g['name']
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
  if name == 'sgd':
    frozen = frozen_parameter_names(config.model.name) if o.upstream_frozen else ()
    groups = sgd_param_groups(model, frozen)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
  raise ValueError(f'config.optimizer.name={name!r}; expected adamw_mmcv or sgd')


def grad_clip(config) -> float | None:
  """Max gradient norm of the recipe, or None: `optimizer.grad_clip` in the AdamW
  recipe (mmcv's OptimizerHook); the SGD recipe (as `optim.build_sgd`) has none."""
  if registry.recipe_value(config, 'optimizer.name') != 'adamw_mmcv':
    return None
  return config.optimizer.get('grad_clip', None)


# --------------------------------------------------------------------------- schedules


def mmcv_lr(base, i, max_iters, warmup_iters, warmup_ratio, power=1.0, min_lr=0.0):
  """mmcv `PolyLrUpdaterHook.get_lr` + `get_warmup_lr('linear')` at 0-based iteration i."""
  lr = (base - min_lr) * (1 - i / max_iters) ** power + min_lr
  if i < warmup_iters:
    k = (1 - i / warmup_iters) * (1 - warmup_ratio)
    lr = lr * (1 - k)
  return lr


def warmup_poly_lr(base, T, max_iters, *, warmup_iters, warmup_factor, power):
  """CSFCN's `WarmupPolyLR.get_lr` (linear warmup, target_lr 0) at scheduler epoch T."""
  if T < warmup_iters:
    alpha = T / warmup_iters
    return base * (warmup_factor * (1 - alpha) + alpha)
  return base * (1 - (T - warmup_iters) / (max_iters - warmup_iters)) ** power


def lr_factor(config) -> Callable[[int], float]:
  """The factor on each group's initial lr for 0-based update `i` of `config`'s
  recipe: mmcv's hook sets iteration i's lr before the update; CSFCN steps its
  scheduler before the update, so update i runs at epoch i + 1."""
  s = config.schedule
  if registry.recipe_value(config, 'optimizer.name') == 'sgd':
    return lambda i: warmup_poly_lr(
      1.0, i + 1, config.total_steps, warmup_iters=s.warmup_steps, warmup_factor=s.warmup_factor, power=s.power
    )
  return lambda i: mmcv_lr(1.0, i, config.total_steps, s.warmup_steps, s.warmup_ratio, s.power)


# --------------------------------------------------------------------------- losses


def to_label_size(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Logits (N, K, h, w) resized bilinearly (align_corners False) to the labels' (N, H, W), as mmseg does."""
  if logits.shape[2:] == labels.shape[1:]:
    return logits
  return F.interpolate(logits, size=labels.shape[1:], mode='bilinear', align_corners=False)


def decode_head_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
  """mmseg 0.27's `BaseDecodeHead.losses` with `CrossEntropyLoss(avg_non_ignore=False)`,
  loss_weight 1: the logits at any stride resized to the labels, per-pixel cross
  entropy (0 where ignored), summed and divided by ALL pixels of the batch."""
  logits = to_label_size(logits, labels)
  return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction='sum') / labels.numel()


def ohem_cross_entropy(pred, target, *, ignore_index: int, thresh: float, min_kept: int) -> torch.Tensor:
  """CSFCN's `OhemCrossEntropy2d` (kaigelee/CSFCN utils/loss.py), restated:
  pred (N, C, H, W), target (N, H, W). Over the batch, p = the softmax
  probability of each valid pixel's target class; with at least `min_kept`
  valid pixels, keep those with p <= max(thresh, the `min_kept`-th smallest
  p) (`thresh` alone when min_kept is 0); else every valid pixel. Mean cross
  entropy over the kept pixels (NaN when none is kept, as upstream)."""
  n, c, h, w = pred.shape
  target = target.reshape(-1).clone()
  valid = target != ignore_index
  target = target * valid.long()
  num_valid = int(valid.sum())
  prob = F.softmax(pred, dim=1).detach().transpose(0, 1).reshape(c, -1)
  if min_kept > num_valid:
    pass  # upstream prints and trains on every valid pixel
  elif num_valid > 0:
    prob = prob.masked_fill(~valid, 1)
    p = prob[target, torch.arange(len(target), device=target.device)]
    threshold = thresh
    if min_kept > 0:
      kth = p[p.argsort()[min(len(p), min_kept) - 1]]
      if kth > thresh:
        threshold = kth
    kept = p.le(threshold)
    valid = valid & kept
    target = target * kept.long()
  target = target.masked_fill(~valid, ignore_index).view(n, h, w)
  return F.cross_entropy(pred, target, ignore_index=ignore_index)


def build_loss(config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
  """`config`'s loss (`config.loss`, default the family's) -> loss(logits (N, K, h, w)
  at any stride, labels (N, H, W) int64), with the dataset's ignore index."""
  name = registry.recipe_value(config, 'loss')
  ignore_index = input_pipeline.dataset_info(config).ignore_index
  if name == 'cross_entropy':
    return lambda logits, labels: decode_head_loss(logits, labels, ignore_index=ignore_index)
  if name == 'ohem':
    thresh, min_kept = float(config.ohem.thresh), int(config.ohem.min_kept)
    return lambda logits, labels: ohem_cross_entropy(
      to_label_size(logits, labels), labels, ignore_index=ignore_index, thresh=thresh, min_kept=min_kept
    )
  # The reference step exists to time and check the recipes' steps, not every loss of losses.py.
  raise ValueError(
    f"config.loss={name!r}: the PyTorch reference step has the recipes' losses only, cross_entropy and ohem"
  )


# --------------------------------------------------------------------------- the step


def image_normalizer(device) -> Callable[[torch.Tensor], torch.Tensor]:
  """normalize(uint8 BGR (N, H, W, 3)) -> float32 RGB (N, 3, H, W), (x - MEAN_RGB) / STD_RGB
  (mmseg's Normalize with to_rgb), the statistics kept on `device`."""
  mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=device)
  std = torch.tensor(STD_RGB, dtype=torch.float32, device=device)
  return lambda image: ((image.flip(-1).float() - mean) / std).permute(0, 3, 1, 2).contiguous()


def build_train_step(
  model: torch.nn.Module, config, *, torch_compile: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
  """One training step of `config`'s recipe on the reference `model` (put in
  train mode): step(image uint8 BGR (N, H, W, 3), labels int64 (N, H, W)) ->
  the loss (detached). It sets each group's lr for its update (`lr_factor`),
  normalises the image, runs the family's `loss_method` (with `torch_compile`,
  through `torch.compile`), the loss, the backward pass, the recipe's gradient
  clipping and the optimizer step."""
  family = registry.family_of(config.model.name)
  model.train()
  forward = model if family.loss_method == '__call__' else getattr(model, family.loss_method)
  if torch_compile:
    forward = torch.compile(forward)
  optimizer = build_optimizer(model, config)
  initial = [g['lr'] for g in optimizer.param_groups]
  factor = lr_factor(config)
  loss_fn = build_loss(config)
  max_norm = grad_clip(config)
  normalize = image_normalizer(next(model.parameters()).device)
  count = [0]

  def step(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    f = factor(count[0])
    for g, lr in zip(optimizer.param_groups, initial):
      g['lr'] = lr * f
    loss = loss_fn(forward(normalize(image)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    count[0] += 1
    return loss.detach()

  return step
