"""Helpers for comparing a Flax module with its PyTorch counterpart in tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cgrseg_jax.models import key_layout
from cgrseg_jax.models import family_of


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def variables_from_torch(torch_module: torch.nn.Module, flax_module, *inputs, model='cgrseg_t', **kwargs) -> dict:
  """Flax variables for `flax_module` (a part of registered `model`) holding the
  weights of `torch_module`, mapped through the project's converter with the
  family's key layout (strict: every key must be used)."""
  template = jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), *inputs, **kwargs))
  layout = family_of(model).key_layout
  variables, _ = key_layout.fill_from_state_dict(torch_module.state_dict(), template, layout, strict=True)
  return jax.tree_util.tree_map(jnp.asarray, variables)


def assert_close(ours, ref, rtol=1e-5, scale_atol=1e-5):
  """Element-wise closeness with an absolute floor relative to the reference range."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  np.testing.assert_allclose(ours, ref, rtol=rtol, atol=scale_atol * max(np.abs(ref).max(), 1e-12))


def compare_module(torch_mod: torch.nn.Module, flax_mod, x: np.ndarray, train: bool, rtol: float = 1e-5):
  """Run both on `x` (NHWC) in eval mode, or in train mode with batch
  statistics, and compare the outputs and the updated BN running statistics."""
  variables = variables_from_torch(torch_mod, flax_mod, x, train=False)
  torch_mod.train(train)
  with torch.no_grad():
    want = nhwc(torch_mod(nchw(x)))
  if train:
    out, updates = flax_mod.apply(variables, x, train=True, mutable=['batch_stats'])
    after = variables_from_torch(torch_mod, flax_mod, x, train=False)['batch_stats']
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates['batch_stats'], after
    )
  else:
    out = flax_mod.apply(variables, x, train=False)
  assert_close(out, want, rtol=rtol)
