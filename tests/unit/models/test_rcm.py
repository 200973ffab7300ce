"""RCA and RCM against the PyTorch reference."""

import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.models import rcm
from flax_torch import compare_module, nchw, nhwc


@pytest.mark.parametrize('band', [11, 9, 5])
@pytest.mark.parametrize('hw', [(8, 8), (5, 13)])
@pytest.mark.parametrize('train', [False, True])
def test_rca(band, hw, train):
  torch_mod = ref.randomize_(ref.RectCalibAttention(16, band, 3), seed=band)
  x = np.random.default_rng(0).standard_normal((2, *hw, 16)).astype(np.float32)
  compare_module(torch_mod, rcm.RCA(band, 3), x, train)


@pytest.mark.parametrize('hw', [(8, 8), (4, 10)])
@pytest.mark.parametrize('train', [False, True])
def test_rcm(hw, train):
  torch_mod = ref.randomize_(ref.RCM(24, band_kernel=11, square_kernel=3, mlp_ratio=2, ls_init=1e-6), seed=7)
  x = np.random.default_rng(1).standard_normal((2, *hw, 24)).astype(np.float32)
  compare_module(torch_mod, rcm.RCM(11), x, train)


def test_rca_context_is_row_plus_column_mean():
  """With a pass-through calibration the gate input is mean over W + mean over H."""
  x = np.random.default_rng(2).standard_normal((1, 4, 6, 3)).astype(np.float32)
  ctx = x.mean(axis=2, keepdims=True) + x.mean(axis=1, keepdims=True)
  torch_ctx = torch.nn.functional.adaptive_avg_pool2d(nchw(x), (None, 1)) + torch.nn.functional.adaptive_avg_pool2d(
    nchw(x), (1, None)
  )
  np.testing.assert_allclose(ctx, nhwc(torch_ctx), rtol=1e-6, atol=1e-6)
