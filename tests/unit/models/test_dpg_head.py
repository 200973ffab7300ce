"""DPG head pieces against the PyTorch reference."""

import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.models import dpg_head
from flax_torch import assert_close, nchw, nhwc, variables_from_torch


@pytest.mark.parametrize('k', [1, 7, 150])
def test_spatial_gather(k):
  rng = np.random.default_rng(k)
  feats = rng.standard_normal((2, 6, 9, 16)).astype(np.float32)
  logits = (3 * rng.standard_normal((2, 6, 9, k))).astype(np.float32)
  want = ref._class_prototypes(nchw(feats), nchw(logits)).numpy()  # (B, C, K, 1)
  got = dpg_head.spatial_gather(feats, logits)  # (B, K, 1, C)
  assert_close(np.asarray(got).transpose(0, 3, 1, 2), want)
  # each prototype is a convex combination of pixel features
  probs = np.exp(logits - logits.max((1, 2), keepdims=True))
  probs /= probs.sum((1, 2), keepdims=True)
  direct = np.einsum('bhwk,bhwc->bkc', probs, feats)
  np.testing.assert_allclose(np.asarray(got)[:, :, 0], direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('k', [5, 150])
def test_dpg_gate(k):
  torch_mod = ref.randomize_(ref.PrototypeGate(32, 32), seed=3)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
  protos = rng.standard_normal((2, k, 1, 32)).astype(np.float32)
  flax_mod = dpg_head.DPGHead(32)
  variables = variables_from_torch(torch_mod, flax_mod, x, protos)
  with torch.no_grad():
    want = nhwc(torch_mod(nchw(x), nchw(protos)))
  assert_close(flax_mod.apply(variables, x, protos), want)


def test_dpg_gate_starts_at_half():
  """The last conv of the channel MLP starts at zero: the gate is sigmoid(0) = 0.5."""
  import jax

  x = np.random.default_rng(1).standard_normal((1, 4, 4, 8)).astype(np.float32)
  protos = np.random.default_rng(2).standard_normal((1, 3, 1, 8)).astype(np.float32)
  mod = dpg_head.DPGHead(8)
  variables = mod.init(jax.random.PRNGKey(0), x, protos)
  np.testing.assert_allclose(mod.apply(variables, x, protos), 0.5 * x, rtol=1e-6)
