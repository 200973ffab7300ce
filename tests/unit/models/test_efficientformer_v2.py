"""EfficientFormerV2 pieces against the PyTorch reference (cgrseg_jax/torch_reference/cgrseg.py)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.models import efficientformer_v2 as ef
from flax_torch import assert_close, compare_module, nchw, nhwc, variables_from_torch


def _loop_bias_index(res, downsample):
  """The offset numbering written out as plain loops (queries, then keys, row-major)."""
  keys = list(itertools.product(range(res), range(res)))
  if downsample:
    res2 = math.ceil(res / 2)
    step = math.ceil(res / res2)
    queries = [(a * step, b * step) for a, b in itertools.product(range(res2), range(res2))]
  else:
    queries = keys
  numbering, table = {}, []
  for qy, qx in queries:
    for ky, kx in keys:
      table.append(numbering.setdefault((abs(qy - ky), abs(qx - kx)), len(numbering)))
  return np.array(table).reshape(len(queries), len(keys)), len(numbering)


@pytest.mark.parametrize(
  'res,downsample', [(1, False), (4, False), (7, False), (16, False), (4, True), (7, True), (32, True)]
)
def test_attention_bias_index(res, downsample):
  idx, n = ef.attention_bias_index(res, downsample)
  want_idx, want_n = _loop_bias_index(res, downsample)
  assert n == want_n
  np.testing.assert_array_equal(idx, want_idx)


@pytest.mark.parametrize('stride,hw', [(None, (8, 8)), (None, (6, 10)), (2, (16, 16)), (2, (12, 20))])
@pytest.mark.parametrize('train', [False, True])
def test_attention4d(stride, hw, train):
  resolution = 8 if stride is None else 16
  torch_mod = ref.randomize_(ref.MHSA4D(64, resolution, stride=stride), seed=1)
  x = np.random.default_rng(0).standard_normal((2, *hw, 64)).astype(np.float32)
  compare_module(torch_mod, ef.Attention4D(64, resolution, stride), x, train)


@pytest.mark.parametrize('hw', [(8, 8), (12, 16), (6, 6)])
@pytest.mark.parametrize('train', [False, True])
def test_attention4d_downsample(hw, train):
  torch_mod = ref.randomize_(ref.DownsampleAttention(48, 64, 8), seed=2)
  x = np.random.default_rng(1).standard_normal((2, *hw, 48)).astype(np.float32)
  compare_module(torch_mod, ef.Attention4DDownsample(48, 64, 8), x, train)


@pytest.mark.parametrize('train', [False, True])
def test_ffn_blocks(train):
  x = np.random.default_rng(2).standard_normal((2, 6, 7, 24)).astype(np.float32)
  compare_module(ref.randomize_(ref.FFNBlock(24, 3, 0.0, 1e-5), seed=3), ef.Block(24, 3), x, train)
  attn = ref.randomize_(ref.AttnFFNBlock(32, 4, 0.0, 1e-5, resolution=4, stride=None), seed=4)
  x = np.random.default_rng(3).standard_normal((2, 4, 6, 32)).astype(np.float32)
  compare_module(attn, ef.Block(32, 4, attention=True, resolution=4), x, train)


@pytest.mark.parametrize('train,frozen_bn', [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize('hw', [(64, 64), (96, 64)])
def test_backbone_s0(train, frozen_bn, hw):
  # frozen_bn: upstream's train() rule (BNs in eval mode while the model trains)
  torch_ref = ref.EfficientFormerV2Backbone('S0', drop_path_rate=0.0, resolution=64, frozen_bn=frozen_bn)
  torch_mod = ref.randomize_(torch_ref, seed=5)
  flax_mod = ef.build_backbone('s0', 0.0, resolution=64, frozen_bn=frozen_bn)
  x = np.random.default_rng(4).standard_normal((2, *hw, 3)).astype(np.float32)
  variables = variables_from_torch(torch_mod, flax_mod, x, train=False)
  torch_mod.train(train)
  with torch.no_grad():
    want = [nhwc(f) for f in torch_mod(nchw(x))]
  if train:
    outs, _ = jax.jit(lambda v, x: flax_mod.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  else:
    outs = jax.jit(lambda v, x: flax_mod.apply(v, x, train=False))(variables, x)
  assert [o.shape for o in outs] == [w.shape for w in want]
  for o, w in zip(outs, want):
    assert_close(o, w, rtol=2e-5)


@pytest.mark.parametrize('name,arch,rate', [('s1', 'S1', 0.0), ('s2', 'S2', 0.02), ('l', 'L', 0.1)])
def test_drop_path_rates_match_reference(name, arch, rate):
  torch_mod = ref.EfficientFormerV2Backbone(arch, drop_path_rate=rate)
  want = [tuple(getattr(b.drop_path, 'rate', 0.0) for b in torch_mod.network[s]) for s in (0, 2, 4, 6)]
  got = ef.drop_path_rates(ef.BACKBONES[name]['depths'], rate)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-12)


def test_add_to_every_sample_gradients_match_torch():
  """The attention bias is added to every sample; its gradient (a hand-written
  sum over the batch) against torch autograd."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 3, 4, 6)).astype(np.float32)
  bias = rng.standard_normal((3, 4, 6)).astype(np.float32)
  r = rng.standard_normal(x.shape).astype(np.float32)
  xt, bt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(bias).requires_grad_(True)
  ((xt + bt[None]) * torch.from_numpy(r)).sum().backward()
  value, grads = jax.value_and_grad(lambda a, b: jnp.sum(ef.add_to_every_sample(a, b) * r), argnums=(0, 1))(x, bias)
  np.testing.assert_allclose(value, float(((xt + bt[None]) * torch.from_numpy(r)).sum()), rtol=1e-5)
  np.testing.assert_allclose(grads[0], xt.grad.numpy(), rtol=1e-6)
  np.testing.assert_allclose(grads[1], bt.grad.numpy(), rtol=1e-5, atol=1e-6)
