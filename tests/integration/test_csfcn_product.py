"""CSFCN wired into the product: the one loader (upstream state dict, ImageNet
backbone) and one training run with the family's recipe (SGD + OHEM)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cgrseg_jax import loader, train
from cgrseg_jax.models import build_model
from cgrseg_jax.models.registry import init_variables
from cgrseg_jax.torch_reference import csfcn as ref
from configs import cityscapes_csfcn, synthetic_csfcn


def _expected_flax(value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> ours, stated independently: OIHW -> HWIO, Conv1d (O, I, 1) -> (O, I)."""
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value[..., 0] if value.ndim == 3 else value


def test_upstream_state_dict_through_the_loader(tmp_path):
  model = ref.randomize_(ref.build_torch_csfcn('csfcn_tiny', 11), seed=3)
  state = model.state_dict()
  path = tmp_path / 'csfcn_tiny_camvid.pth'
  torch.save({'state_dict': state, 'meta': {}}, path)  # mmseg-style wrapper
  loaded = loader.load(str(path))
  assert (loaded.kind, loaded.model, loaded.num_classes) == ('torch', 'csfcn_tiny', 11)
  v = loaded.variables
  checks = {
    'resnet.conv1.0.weight': v['params']['resnet']['conv1_0']['kernel'],
    'resnet.layer3.0.downsample.1.running_var': v['batch_stats']['resnet']['layer3_0']['downsample']['1']['var'],
    'cfc.key_conv.weight': v['params']['cfc']['key_conv']['kernel'],
    'cfc.value_conv.bias': v['params']['cfc']['value_conv']['bias'],
    'sfc.conv_offset.1.weight': v['params']['sfc']['conv_offset']['1']['kernel'],
    'conv_out32.conv_out.weight': v['params']['conv_out32']['conv_out']['kernel'],
  }
  for key, got in checks.items():
    np.testing.assert_array_equal(got, _expected_flax(state[key].numpy()), err_msg=key)
  n_vars = len(jax.tree_util.tree_leaves(v))
  assert n_vars == len(state) - sum(k.endswith('num_batches_tracked') for k in state)
  assert len(loaded.report.used) == n_vars


def test_imagenet_backbone_through_the_loader(tmp_path):
  backbone = ref.randomize_(ref.ResNetTorch(num_classes=1000), seed=4)
  path = tmp_path / 'resnet18-deep-inplane128.pth'
  torch.save(backbone.state_dict(), path)
  loaded = loader.load(str(path), model='csfcn_tiny')
  assert loaded.kind == 'backbone' and loaded.model == 'csfcn_tiny'
  assert loaded.report.skipped['fc.weight'] == 'ImageNet classifier'
  # config.init: the backbone replaces the fresh one, the rest stays fresh
  model = build_model('csfcn_tiny', 11)
  fresh = jax.tree_util.tree_map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  variables = loader.initial_variables(str(path), fresh, 'csfcn_tiny', 11)
  w = backbone.state_dict()['layer4.1.conv2.weight'].numpy()
  np.testing.assert_array_equal(variables['params']['resnet']['layer4_1']['conv2']['kernel'], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
    variables['params']['cfc']['key_conv']['kernel'], fresh['params']['cfc']['key_conv']['kernel']
  )


def test_train_two_steps_with_sgd_ohem_and_upstream_frozen_conv1d(tmp_path):
  c = synthetic_csfcn.get_config()
  cityscapes_csfcn.csfcn_recipe(c, crop_hw=(64, 64), lr=0.01, batch_size=2, total_steps=2, warmup_steps=1)
  c.model.name = 'csfcn_tiny'
  c.data.train_pipeline = cityscapes_csfcn.train_pipeline(
    size_range=(48, 96), side='short', round_half_up=False, crop_hw=(64, 64), jitter=(0.3, 0.3, 0.3, 0.1)
  )
  c.data.synthetic.image_size = (64, 80)
  c.data.synthetic.num_train = 8
  c.data.synthetic.num_val = 2
  c.data.img_scale = (80, 64)
  c.ohem.min_kept = 500
  c.optimizer.upstream_frozen = True
  c.eval_batch_size = 2
  c.eval_every = 0
  c.checkpoint_every = 0
  c.progress_bar = False
  c.log_every = 1
  c.lock()
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result['step'] == 2 and result['status'] == 'done'
  params = jax.device_get(result['state'].params)
  # the run's own initialisation (registry.init_variables, as train.py calls it)
  fresh = init_variables(
    build_model('csfcn_tiny', 5), jax.random.PRNGKey(c.seed), jnp.zeros((1, 64, 64, 3), jnp.float32)
  )['params']
  # upstream's optimizer never sees the Conv1d weights; their biases and the rest train
  np.testing.assert_array_equal(params['cfc']['key_conv']['kernel'], fresh['cfc']['key_conv']['kernel'])
  np.testing.assert_array_equal(params['cfc']['value_conv']['kernel'], fresh['cfc']['value_conv']['kernel'])
  assert not np.array_equal(params['cfc']['key_conv']['bias'], fresh['cfc']['key_conv']['bias'])
  assert not np.array_equal(params['resnet']['conv1_0']['kernel'], fresh['resnet']['conv1_0']['kernel'])
  assert 0.0 <= result['val']['mIoU'] <= 1.0  # the end-of-run evaluation ran (csfcn_tiny at 64x80)
