"""The context block (pyramid-pooled attention + local attention) against PyTorch."""

import numpy as np
import pytest
import torch

from cgrseg_jax.models import cfc
from cgrseg_jax.torch_reference import csfcn as ref
from csfcn_helpers import compare, rel
from flax_torch import nchw, nhwc


def test_pyramid_bins_known_answers():
  # 32x64 map (1024x2048 input): 6x12 + 3x6 + 2x4 + 1x2 = 100 bins
  assert cfc.pyramid_bins(32, 64) == [(6, 12), (3, 6), (2, 4), (1, 2)]
  # 23x30 (720x960): ar 1.304 -> 8, 4, 3, 1: 48 + 12 + 6 + 1 = 67 bins
  assert sum(a * b for a, b in cfc.pyramid_bins(23, 30)) == 67
  # ties go to even as Python's round: ar 2.5 -> 15, 7.5 -> 8, 5, 2.5 -> 2
  assert cfc.pyramid_bins(2, 5) == [(6, 15), (3, 8), (2, 5), (1, 2)]
  # a tall map never pools to zero columns
  assert cfc.pyramid_bins(30, 2)[-1] == (1, 1)


@pytest.mark.parametrize('hw', [(8, 16), (23, 30), (12, 7)])  # 23x30 and 12x7: overlapping adaptive bins
def test_pyramid_pool_matches_torch(hw):
  x = np.random.default_rng(0).standard_normal((2, *hw, 5)).astype(np.float32)
  want = ref.pyramid_pool(nchw(x), cfc.GRIDS).numpy().transpose(0, 2, 1)
  assert rel(cfc.pyramid_pool(x), want) <= 1e-6


@pytest.mark.parametrize('local_channels', [64, 32])
@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('hw', [(8, 16), (12, 15)])
def test_context_block_matches_torch(hw, train, local_channels):
  x = np.random.default_rng(1).standard_normal((2, *hw, 512)).astype(np.float32)
  torch_mod = ref.randomize_(ref.ContextBlock(local_channels), seed=2, calibrate=nchw(x))
  compare(torch_mod, cfc.ContextBlock(local_channels=local_channels), [x], train=train, tol=1e-5)


def test_local_attention_is_tanh_gate():
  torch_mod = ref.randomize_(ref.LocalAttention(16, 4), seed=3)
  x = np.random.default_rng(4).standard_normal((1, 5, 6, 16)).astype(np.float32)
  torch_mod.eval()
  with torch.no_grad():
    inner = nhwc(torch_mod.conv(nchw(x)))
  # independent restatement: out = x * tanh(branch) + x
  compare(torch_mod, cfc.LocalAttention(16, 4), [x], train=False)
  from csfcn_helpers import variables_for

  v = variables_for(torch_mod, cfc.LocalAttention(16, 4), x, train=False)
  assert rel(cfc.LocalAttention(16, 4).apply(v, x, train=False), x * np.tanh(inner) + x) <= 1e-6
