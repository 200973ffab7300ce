"""Deep-stem ResNet-18 against the PyTorch reference, and loading the ImageNet checkpoint layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgrseg_jax import errors
from cgrseg_jax.models import csfcn
from cgrseg_jax.models.resnet import ResNet
from cgrseg_jax.torch_reference.csfcn import ResNetTorch, randomize_
from csfcn_helpers import compare, rel
from flax_torch import nchw, nhwc


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('hw', [(64, 96), (50, 70)])  # 50x70: odd sizes after each stride-2 op
def test_resnet_matches_torch(hw, train):
  x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
  torch_mod = randomize_(ResNetTorch(), seed=1, calibrate=nchw(x))
  compare(torch_mod, ResNet(), [x], train=train, tol=2e-5)  # 20 conv layers of float32 rounding


def _imagenet_checkpoint(tmp_path, seed=2):
  """A checkpoint in the layout of resnet18-deep-inplane128.pth (conv1.0/.1/.3/.4/.6,
  bn1, layerN.M.*, fc.*), written to disk as torch.save does."""
  model = randomize_(ResNetTorch(num_classes=1000), seed=seed)
  path = tmp_path / 'resnet18-deep-inplane128.pth'
  torch.save(model.state_dict(), path)
  return model, path


def test_load_imagenet_backbone_layout(tmp_path):
  torch_mod, path = _imagenet_checkpoint(tmp_path)
  state = torch.load(path, weights_only=True)
  assert {'conv1.0.weight', 'conv1.1.running_var', 'conv1.6.weight', 'bn1.weight', 'fc.weight'} <= set(state)
  backbone, report = csfcn.load_backbone(state, csfcn.FAMILY.variable_shapes('csfcn', 19))
  assert report.skipped == {
    'fc.weight': 'ImageNet classifier',
    'fc.bias': 'ImageNet classifier',
    **{k: 'buffer not used by the model' for k in state if k.endswith('num_batches_tracked')},
  }
  assert len(report.used) + len(report.skipped) == len(state)
  # merge into a freshly initialised CSFCN: its backbone now computes the ImageNet network
  model = csfcn.build('csfcn', 19)
  x = np.random.default_rng(3).standard_normal((1, 64, 64, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  variables = {
    c: {**variables[c], 'resnet': jax.tree_util.tree_map(jnp.asarray, backbone[c]['resnet'])} for c in variables
  }
  feats = jax.jit(lambda v, x: model.apply(v, x, method='extract_features'))(variables, x)
  torch_mod.eval()
  with torch.no_grad():
    want = torch_mod(nchw(x))[1:]
  for f, w in zip(feats, want):
    assert rel(f, nhwc(w)) <= 1e-5


def _load(state):
  return csfcn.load_backbone(state, csfcn.FAMILY.variable_shapes('csfcn', 19))


def test_imagenet_layout_errors_name_key_and_shape(tmp_path):
  _, path = _imagenet_checkpoint(tmp_path)
  state = torch.load(path, weights_only=True)
  bad = dict(state, **{'layer3.1.conv2.weight': torch.zeros(256, 256, 1, 1)})
  with pytest.raises(errors.ConversionError, match=r'layer3\.1\.conv2\.weight.*\(256, 256, 1, 1\).*\(256, 256, 3, 3\)'):
    _load(bad)
  missing = {k: v for k, v in state.items() if k != 'conv1.4.running_mean'}
  with pytest.raises(errors.ConversionError, match=r"missing key 'conv1\.4\.running_mean'.*\(64,\)"):
    _load(missing)
  with pytest.raises(errors.ConversionError, match=r"unexpected key 'layer5\.0\.conv1\.weight'"):
    _load(dict(state, **{'layer5.0.conv1.weight': torch.zeros(1)}))
