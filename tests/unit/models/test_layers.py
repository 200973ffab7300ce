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


def test_batchnorm_train_gradients_match_torch():
  """Input, scale and bias gradients of training-mode BatchNorm (hand-written VJP) against autograd."""
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((3, 5, 4, 6)) * 2 + 0.5).astype(np.float32)
  gy = rng.standard_normal(x.shape).astype(np.float32)
  bn_t = torch.nn.BatchNorm2d(6).train()
  with torch.no_grad():
    bn_t.weight.uniform_(0.5, 1.5)
    bn_t.bias.normal_()
  xt = nchw(x).requires_grad_(True)
  bn_t(xt).backward(nchw(gy))
  params = {'scale': jnp.asarray(bn_t.weight.detach().numpy()), 'bias': jnp.asarray(bn_t.bias.detach().numpy())}
  stats = {'mean': jnp.zeros(6), 'var': jnp.ones(6)}

  def f(p, x):
    y, _ = BatchNorm().apply({'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(y * gy)

  dp, dx = jax.grad(f, argnums=(0, 1))(params, jnp.asarray(x))
  np.testing.assert_allclose(dx, nhwc(xt.grad), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dp['scale'], bn_t.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp['bias'], bn_t.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


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


DEPTHWISE_CASES = [
  ((3, 3), 1, (1, 1), (9, 7)),
  ((3, 3), 2, (1, 1), (9, 8)),
  ((3, 3), 2, (1, 1), (8, 9)),
  ((3, 3), 2, (0, 0), (9, 10)),
  ((1, 11), 1, (0, 5), (6, 13)),
  ((11, 1), 1, (5, 0), (13, 6)),
  ((2, 5), 2, (1, 2), (7, 11)),
  ((5, 3), 3, (2, 0), (11, 7)),
  ((1, 1), 1, (0, 0), (4, 5)),
  # taller than one group of rows of the kernel gradient's first pass, with a partial last group
  ((3, 3), 1, (1, 1), (37, 5)),
  ((3, 3), 2, (1, 1), (35, 4)),
]


def _depthwise_pair(kernel, stride, padding, c=6, seed=0):
  torch.manual_seed(seed)
  conv_t = torch.nn.Conv2d(c, c, kernel, stride=stride, padding=padding, groups=c)
  variables = {
    'params': {
      'kernel': jnp.asarray(conv_t.weight.detach().numpy().transpose(2, 3, 1, 0)),
      'bias': jnp.asarray(conv_t.bias.detach().numpy()),
    }
  }
  return conv_t, variables


@pytest.mark.parametrize('impl', ['shifts', 'xla'])
@pytest.mark.parametrize('kernel,stride,padding,hw', DEPTHWISE_CASES)
def test_depthwise_conv_matches_torch_grouped_conv(kernel, stride, padding, hw, impl):
  c = 6
  conv_t, variables = _depthwise_pair(kernel, stride, padding, c)
  x = np.random.default_rng(0).standard_normal((2, *hw, c)).astype(np.float32)
  mod = conv(c, kernel, stride=stride, padding=padding, groups=c, depthwise=impl)
  assert isinstance(mod, DepthwiseConv)
  with torch.no_grad():
    want = nhwc(conv_t(nchw(x)))
  np.testing.assert_allclose(mod.apply(variables, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('impl', ['shifts', 'xla'])
@pytest.mark.parametrize('kernel,stride,padding,hw', DEPTHWISE_CASES)
def test_depthwise_conv_gradients_match_torch(kernel, stride, padding, hw, impl):
  """Input, kernel and bias gradients of a weighted sum of the output (the
  shifted-sum implementation has a hand-written VJP) against PyTorch autograd."""
  c = 6
  conv_t, variables = _depthwise_pair(kernel, stride, padding, c, seed=1)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, *hw, c)).astype(np.float32)
  xt = nchw(x).clone().requires_grad_(True)
  out_t = conv_t(xt)
  r = rng.standard_normal(out_t.shape).astype(np.float32)
  (out_t * torch.from_numpy(r)).sum().backward()
  mod = conv(c, kernel, stride=stride, padding=padding, groups=c, depthwise=impl)

  def loss(params, x):
    return jnp.sum(mod.apply({'params': params}, x) * jnp.asarray(nhwc(torch.from_numpy(r))))

  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, nhwc(xt.grad), **tol)
  np.testing.assert_allclose(g_params['kernel'], conv_t.weight.grad.numpy().transpose(2, 3, 1, 0), **tol)
  np.testing.assert_allclose(g_params['bias'], conv_t.bias.grad.numpy(), **tol)


def test_depthwise_impl_is_checked():
  with pytest.raises(ValueError, match='depthwise'):
    conv(4, 3, padding=1, groups=4, depthwise='fast').init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 4)))


def test_pointwise_conv_gradients_match_torch():
  """1x1 conv (a matmul over channels with hand-written GEMM gradients) against torch conv2d autograd."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
  gy = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  conv_t = torch.nn.Conv2d(7, 3, 1)
  xt = nchw(x).requires_grad_(True)
  conv_t(xt).backward(nchw(gy))
  mod = conv(3, 1)
  params = {
    'kernel': jnp.asarray(conv_t.weight.detach().numpy().transpose(2, 3, 1, 0)),
    'bias': jnp.asarray(conv_t.bias.detach().numpy()),
  }
  dp, dx = jax.grad(lambda p, x: jnp.sum(mod.apply({'params': p}, x) * gy), argnums=(0, 1))(params, jnp.asarray(x))
  np.testing.assert_allclose(dx, nhwc(xt.grad), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp['kernel'], conv_t.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp['bias'], conv_t.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
