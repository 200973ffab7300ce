"""Shared helpers for the CSFCN component tests: Flax variables from a PyTorch
submodule through the CSFCN key layout, and the parity metric."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cgrseg_jax.models import csfcn, key_layout
from flax_torch import nchw, nhwc


def rel(a, b) -> float:
  """max|a - b| / max|b| (the acceptance metric of ../shared/tools/csfcn_parity.py)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / np.abs(b).max())


def variables_for(torch_mod, flax_mod, *inputs, **kwargs):
  template = jax.eval_shape(lambda: flax_mod.init(jax.random.PRNGKey(0), *inputs, **kwargs))
  variables, _ = key_layout.fill_from_state_dict(torch_mod.state_dict(), template, csfcn.KEY_LAYOUT)
  return jax.tree_util.tree_map(jnp.asarray, variables)


def compare(torch_mod, flax_mod, inputs, train: bool, tol: float = 1e-5):
  """Run both on NHWC `inputs` (eval, or train with batch statistics) and compare
  the outputs and, in train mode, every updated BN running statistic."""
  variables = variables_for(torch_mod, flax_mod, *inputs, train=False)
  torch_mod.train(train)
  with torch.no_grad():
    want = torch_mod(*[nchw(x) for x in inputs])
  want = [nhwc(w) for w in want] if isinstance(want, (list, tuple)) else [nhwc(want)]
  if train:
    got, updates = flax_mod.apply(variables, *inputs, train=True, mutable=['batch_stats'])
    after = variables_for(torch_mod, flax_mod, *inputs, train=False)['batch_stats']
    n = 0
    for a, b in zip(jax.tree_util.tree_leaves(updates['batch_stats']), jax.tree_util.tree_leaves(after)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      n += 1
    assert n > 0
  else:
    got = flax_mod.apply(variables, *inputs, train=False)
  got = list(got) if isinstance(got, (list, tuple)) else [got]
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert rel(g, w) <= tol, rel(g, w)
