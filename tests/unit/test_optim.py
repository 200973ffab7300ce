"""Optimizer: mmcv custom_keys multipliers, the poly+warmup schedule, and one
training step against PyTorch (reference model + torch.optim.AdamW, the recipe
of `cgrseg_jax.torch_reference.training` built from the same config)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax import convert, losses, optim
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.models import build_segmentor, family_of, key_layout, registry
from configs import default

LAYOUT = family_of('cgrseg_t').key_layout

torch = pytest.importorskip('torch')

from cgrseg_jax.torch_reference import training  # noqa: E402
from cgrseg_jax.torch_reference.cgrseg import build_torch_segmentor, randomize_  # noqa: E402

# The upstream recipe's paramwise_cfg.custom_keys, as the base config holds them.
CUSTOM_KEYS = default.get_config().optimizer.custom_keys.to_dict()


def test_multipliers_every_parameter_of_cgrseg_t():
  torch_model = build_torch_segmentor('t', 150)
  base_lr, base_wd = 1.0, 1.0
  expected = {
    g['name']: (g.get('lr', base_lr), g.get('weight_decay', base_wd))
    for g in training.mmcv_param_groups(torch_model, base_lr, base_wd, CUSTOM_KEYS)
  }
  params = family_of('cgrseg_t').variable_shapes('cgrseg_t', 150)['params']
  names = jax.tree_util.tree_leaves(registry.param_names(params, 'cgrseg_t'))
  lr, wd = optim.multipliers(params, CUSTOM_KEYS, 'cgrseg_t')
  got = dict(zip(names, zip(jax.tree_util.tree_leaves(lr), jax.tree_util.tree_leaves(wd))))
  assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:10]
  for name in expected:
    assert got[name] == pytest.approx(expected[name]), name
  # The documented consequences of the rule.
  assert got['backbone.network.4.7.token_mixer.talking_head1.weight'] == (10.0, 1.0)
  assert got['backbone.network.0.0.mlp.norm1.weight'] == (1.0, 0.0)
  assert got['backbone.patch_embed.1.weight'] == (1.0, 1.0)
  assert got['decode_head.lgc.channel_mul_conv.1.weight'] == (10.0, 1.0)  # 'head' beats 'norm'... (LayerNorm)
  assert got['decode_head.conv_seg.weight'] == (10.0, 1.0)
  n_head = sum(1 for n in got if 'head' in n)
  assert n_head > sum(1 for n in got if n.startswith('decode_head.'))  # talking heads too


def test_rule_order_longest_then_alphabetical():
  keys = {'ab': {'lr_mult': 2.0}, 'b': {'lr_mult': 3.0}, 'a': {'lr_mult': 5.0}, 'abc': {'decay_mult': 0.0}}
  assert optim.match_custom_key('xabcx', keys) == (1.0, 0.0)  # longest
  assert optim.match_custom_key('xab', keys) == (2.0, 1.0)
  assert optim.match_custom_key('ba', keys) == (5.0, 1.0)  # 'a' < 'b' alphabetically
  assert optim.match_custom_key('zzz', keys) == (1.0, 1.0)
  with pytest.raises(ValueError, match='lr_multt'):
    optim.match_custom_key('ab', {'ab': {'lr_multt': 1.0}})


@pytest.mark.parametrize('i', [0, 1, 749, 1499, 1500, 1501, 80000, 159999])
def test_schedule_matches_mmcv(i):
  got = float(optim.poly_warmup_factor(i, 160000, 1.0, 1500, 1e-6)) * 1.2e-4
  np.testing.assert_allclose(got, training.mmcv_lr(1.2e-4, i, 160000, 1500, 1e-6), rtol=1e-5, atol=1e-14)


def _adamw_config(num_classes, lr, wd, total, warmup, ratio):
  """The base (upstream AdamW) recipe for the test-only cgrseg_tiny, with these numbers."""
  config = default.get_config('synthetic')
  config.data.synthetic.num_classes = num_classes
  config.model.name, config.model.num_classes = 'cgrseg_tiny', num_classes
  config.optimizer.lr, config.optimizer.weight_decay = lr, wd
  config.total_steps = total
  config.schedule.warmup_steps, config.schedule.warmup_ratio = warmup, ratio
  return config


def test_one_step_parity_with_torch_adamw():
  """Same init and batch (no dropout / drop-path): loss, gradients, updated
  parameters and BN statistics after one AdamW step agree to 1e-4. Both sides
  from one config: the torch step is `training.build_train_step` (mmseg loss,
  mmcv groups, torch AdamW at iteration 0), the JAX one the config's optimizer and loss."""
  num_classes, lr, wd = 5, 2e-3, 0.05
  total, warmup, ratio = 10, 4, 0.3  # a step-0 lr far from 0 so the update matters
  config = _adamw_config(num_classes, lr, wd, total, warmup, ratio)
  ignore = input_pipeline.dataset_info(config).ignore_index
  tm = build_torch_segmentor('tiny', num_classes)
  randomize_(tm, seed=3)
  state = {k: v.clone() for k, v in tm.state_dict().items()}
  variables, _ = convert.state_dict_to_variables(state, 'tiny', num_classes)

  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(2, 64, 96, 3)).astype(np.uint8)  # BGR, as loaded
  y = rng.integers(0, num_classes, size=(2, 64, 96)).astype(np.int64)
  y[0, :10] = ignore
  y[1, :, :7] = ignore

  # ---- PyTorch: the recipe's step (mmseg loss, mmcv groups, torch AdamW at iteration 0)
  tm.decode_head.dropout = None
  step = training.build_train_step(tm, config)
  t_loss = step(torch.from_numpy(image), torch.from_numpy(y))
  t_grads = {n: p.grad.numpy().copy() for n, p in tm.named_parameters()}
  t_after = {k: v.numpy() for k, v in tm.state_dict().items()}

  # ---- JAX
  model = build_segmentor('tiny', num_classes)
  model = model.clone(decode_head=model.decode_head.clone(dropout_ratio=0.0))
  tx = optim.build_optimizer_from_config(variables['params'], config)
  loss_of = losses.build_loss(registry.recipe_value(config, 'loss'), config, ignore)
  x = dp.normalize_image(jnp.asarray(image))

  def loss_fn(params):
    out, upd = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      method='decode',
      mutable=['batch_stats'],
    )
    return loss_of(out, jnp.asarray(y)), upd['batch_stats']

  (loss, bstats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  updates, _ = jax.jit(tx.update)(
    grads, tx.init(variables['params']), variables['params']
  )  # one dispatch, not one per op
  params = jax.tree_util.tree_map(lambda p, u: p + u, variables['params'], updates)

  np.testing.assert_allclose(float(loss), float(t_loss), rtol=1e-4)

  # A conv bias that feeds a train-mode BatchNorm has an exact gradient of 0
  # (the BN subtracts the batch mean); both frameworks return rounding noise
  # there (~1e-9), and Adam normalises that noise to an O(lr) update. Such
  # tensors are recognised on the reference side and only checked to be noise.
  g_scale = max(float(np.abs(g).max()) for g in t_grads.values())
  null = {k for k, g in t_grads.items() if float(np.abs(g).max()) < 1e-6 * g_scale}
  assert all(k.endswith('.bias') for k in null), sorted(null)

  def compare(jax_tree, ref, collection, what, skip=()):
    n = 0
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(jax_tree)[0]:
      key = LAYOUT.torch_key(collection, tuple(k.key for k in keypath))
      if key in skip:
        continue
      got = key_layout.to_torch(np.asarray(leaf), key, LAYOUT)
      want = ref[key]
      scale = float(np.abs(want).max()) or 1.0
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=f'{what} {key}')
      n += 1
    return n

  assert compare(grads, t_grads, 'params', 'grad', skip=null) == len(t_grads) - len(null)
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
    key = LAYOUT.torch_key('params', tuple(k.key for k in keypath))
    if key in null:
      assert float(np.abs(leaf).max()) < 1e-6 * g_scale, key
  # Parameters after the step: relative error of each tensor (norm-wise). At the
  # first step Adam moves each element by ~lr * sign(g), so an element whose
  # gradient is within the gradient check's tolerance of 0 (1e-4 of the tensor's
  # max) has no determined direction in float32; those elements are only checked
  # to move by no more than Adam's step bound, the rest to 1e-4.
  lr0 = lr * training.mmcv_lr(1.0, 0, total, warmup, ratio)
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = LAYOUT.torch_key('params', tuple(k.key for k in keypath))
    if key in null:
      continue
    got, want = key_layout.to_torch(np.asarray(leaf), key, LAYOUT), t_after[key]
    g = t_grads[key]
    undetermined = np.abs(g) < 1e-4 * np.abs(g).max()
    diff = np.where(undetermined, 0.0, got - want)
    rel = np.linalg.norm(diff) / np.linalg.norm(want)
    assert rel <= 1e-4, (key, rel)
    mult = 10.0 if 'head' in key else 1.0
    assert np.all(np.abs(got - want)[undetermined] <= 2.05 * lr0 * mult), key
  compare(bstats, t_after, 'batch_stats', 'BN running stat')
  # upstream's train() rule, both sides: the backbone's running statistics are bit-unchanged by the
  # step (its BNs normalise with them), the head's SyncBN statistics move
  jax.tree_util.tree_map(np.testing.assert_array_equal, bstats['backbone'], variables['batch_stats']['backbone'])
  for key in t_after:
    if key.startswith('backbone.') and key.endswith(('running_mean', 'running_var')):
      np.testing.assert_array_equal(t_after[key], state[key].numpy(), err_msg=key)
  assert not np.array_equal(
    bstats['decode_head']['linear_fuse']['bn']['mean'],
    variables['batch_stats']['decode_head']['linear_fuse']['bn']['mean'],
  )
  # The update itself (the parameters barely move): Adam divides by |g|, so an
  # element whose gradient is at the level of the gradient error has an
  # ill-conditioned update; compare the elements with |g| >= 1e-2 max|g|.
  n = 0
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    key = LAYOUT.torch_key('params', tuple(k.key for k in keypath))
    if key in null:
      continue
    got = key_layout.to_torch(np.asarray(leaf), key, LAYOUT)
    want = t_after[key] - state[key].numpy()
    g = np.abs(t_grads[key])
    ok = g >= 1e-2 * g.max()
    # `want` is a float32 difference of parameters: it carries ~1 ulp of |p|.
    ulp = 2 * np.finfo(np.float32).eps * np.abs(state[key].numpy())
    err = np.abs(got - want)[ok]
    bound = (1e-4 * np.abs(want) + 1e-4 * float(np.abs(want).max()) + ulp)[ok]
    worst = int(np.argmax(err / bound))
    assert np.all(err <= bound), (key, float(err[worst]), float(bound[worst]))
    n += int(ok.sum())
  assert n > 10000
