"""BatchNorm, drop-path, Dropout2d and GELU against PyTorch semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgrseg_jax.models.layers import (
  BatchNorm,
  DepthwiseConv,
  DropPath,
  conv,
  depthwise_as_grouped_conv,
  dropout2d,
  gelu,
)
from flax_torch import nchw, nhwc


def test_batchnorm_train_and_running_stats_match_torch():
  rng = np.random.default_rng(0)
  bn_t = torch.nn.BatchNorm2d(6)  # eps 1e-5, momentum 0.1
  with torch.no_grad():
    bn_t.weight.uniform_(0.5, 1.5)
    bn_t.bias.normal_()
  bn = BatchNorm()
  variables = {
    'params': {'scale': jnp.asarray(bn_t.weight.detach().numpy()), 'bias': jnp.asarray(bn_t.bias.detach().numpy())},
    'batch_stats': {'mean': jnp.zeros(6), 'var': jnp.ones(6)},
  }
  bn_t.train()
  for step in range(3):  # running stats accumulate with momentum 0.1 and unbiased variance
    x = (rng.standard_normal((2, 5, 7, 6)) * 3 + 1).astype(np.float32)
    ref = nhwc(bn_t(nchw(x)))
    out, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
    variables = {'params': variables['params'], 'batch_stats': updates['batch_stats']}
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variables['batch_stats']['mean'], bn_t.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variables['batch_stats']['var'], bn_t.running_var.numpy(), rtol=1e-5, atol=1e-6)
  # The unbiased correction matters: n = 70 per channel here.
  x = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
  _, upd = bn.apply(
    {'params': variables['params'], 'batch_stats': {'mean': jnp.zeros(6), 'var': jnp.zeros(6)}},
    x,
    train=True,
    mutable=['batch_stats'],
  )
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.1 * x.reshape(-1, 6).var(0, ddof=1), rtol=1e-5)

  bn_t.eval()
  x = rng.standard_normal((1, 4, 4, 6)).astype(np.float32)
  np.testing.assert_allclose(bn.apply(variables, x, train=False), nhwc(bn_t(nchw(x))), rtol=1e-5, atol=1e-5)


def test_batchnorm_bfloat16_compute_keeps_float32_stats():
  x = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
  bn = BatchNorm(dtype=jnp.bfloat16)
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  out, upd = bn.apply(variables, jnp.asarray(x, jnp.bfloat16), train=True, mutable=['batch_stats'])
  assert out.dtype == jnp.bfloat16
  assert upd['batch_stats']['var'].dtype == jnp.float32
  ref = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_drop_path_drops_whole_samples_and_rescales():
  rate = 0.3
  x = jnp.ones((4000, 2, 2, 3))
  out = np.asarray(DropPath(rate).apply({}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)}))
  per_sample = out.reshape(4000, -1)
  assert np.all(per_sample.min(1) == per_sample.max(1))  # one decision per sample
  kept = per_sample[per_sample[:, 0] != 0, 0]
  np.testing.assert_allclose(kept, 1 / (1 - rate), rtol=1e-6)
  dropped = np.mean(per_sample[:, 0] == 0)
  assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / 4000)
  np.testing.assert_array_equal(DropPath(rate).apply({}, x, train=False), x)


def test_dropout2d_zeroes_whole_channels():
  rate = 0.25
  x = jnp.ones((50, 6, 5, 40))
  out = np.asarray(dropout2d(rate).apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)}))
  flat = out.transpose(0, 3, 1, 2).reshape(50 * 40, -1)
  assert np.all(flat.min(1) == flat.max(1))  # constant over H x W per (sample, channel)
  assert abs(np.mean(flat[:, 0] == 0) - rate) < 4 * np.sqrt(rate * (1 - rate) / 2000)
  np.testing.assert_allclose(flat[flat[:, 0] > 0, 0], 1 / (1 - rate), rtol=1e-6)


def test_gelu_is_exact_erf_form():
  x = np.linspace(-6, 6, 1001).astype(np.float32)
  ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(gelu(x), ref, rtol=1e-6, atol=1e-6)
  # the tanh approximation would be off by far more than that
  assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - ref).max() > 1e-4


@pytest.mark.parametrize(
  'kernel,stride,padding,hw',
  [
    ((3, 3), 1, (1, 1), (9, 7)),
    ((3, 3), 2, (1, 1), (9, 8)),
    ((1, 11), 1, (0, 5), (6, 13)),
    ((11, 1), 1, (5, 0), (13, 6)),
    ((1, 1), 1, (0, 0), (4, 5)),
  ],
)
def test_depthwise_conv_matches_torch_grouped_conv(kernel, stride, padding, hw):
  c = 6
  conv_t = torch.nn.Conv2d(c, c, kernel, stride=stride, padding=padding, groups=c)
  x = np.random.default_rng(0).standard_normal((2, *hw, c)).astype(np.float32)
  mod = conv(c, kernel, stride=stride, padding=padding, groups=c)
  assert isinstance(mod, DepthwiseConv)
  variables = {
    'params': {
      'kernel': jnp.asarray(conv_t.weight.detach().numpy().transpose(2, 3, 1, 0)),
      'bias': jnp.asarray(conv_t.bias.detach().numpy()),
    }
  }
  with torch.no_grad():
    want = nhwc(conv_t(nchw(x)))
  np.testing.assert_allclose(mod.apply(variables, x), want, rtol=1e-5, atol=1e-6)
  with depthwise_as_grouped_conv():  # the plain grouped convolution gives the same numbers
    np.testing.assert_allclose(
      conv(c, kernel, stride=stride, padding=padding, groups=c).apply(variables, x), want, rtol=1e-5, atol=1e-6
    )
