"""CSFCN state-dict conversion: the rule table, round trips, detection, errors."""

import jax
import numpy as np
import pytest
import torch

from cgrseg_jax import convert, errors
from cgrseg_jax.models import csfcn
from cgrseg_jax.torch_reference import csfcn as ref


@pytest.fixture(scope='module', params=[('csfcn', 19), ('csfcn_tiny', 11)])
def torch_state(request):
  name, k = request.param
  model = ref.randomize_(ref.build_torch_csfcn(name, k), seed=7)
  return name, k, {key: v.clone() for key, v in model.state_dict().items()}


def test_keys_map_mechanically():
  f = csfcn.KEY_LAYOUT.torch_key
  assert f('params', ('resnet', 'conv1_0', 'kernel')) == 'resnet.conv1.0.weight'
  assert f('batch_stats', ('resnet', 'conv1_4', 'var')) == 'resnet.conv1.4.running_var'
  assert f('params', ('resnet', 'layer1_0', 'downsample', '1', 'scale')) == 'resnet.layer1.0.downsample.1.weight'
  assert (
    f('params', ('cfc', 'local_attention', 'conv', '0', 'conv', 'kernel')) == 'cfc.local_attention.conv.0.conv.weight'
  )
  assert f('params', ('sfc', 'conv_32', 'bn', 'bias')) == 'sfc.conv_32.bn.bias'  # not a list module
  assert f('params', ('cfc', 'key_conv', 'kernel')) == 'cfc.key_conv.weight'


def test_state_dict_round_trip_is_bit_exact(torch_state):
  name, k, state = torch_state
  variables, report = convert.state_dict_to_variables(state)
  assert (report.model, report.num_classes) == (name, k)
  back = convert.variables_to_state_dict(variables, name)
  assert set(back) == set(state)
  for key, value in state.items():
    if key.endswith('num_batches_tracked'):
      assert back[key].dtype == np.int64 and back[key] == 0  # not a Flax variable: written as 0
      continue
    assert back[key].shape == tuple(value.shape), key
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  # and the other way: variables -> state dict -> variables
  again, _ = convert.state_dict_to_variables(back)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)
  # the exported dict loads strictly into the reference
  model = ref.build_torch_csfcn(name, k)
  model.load_state_dict({key: torch.from_numpy(np.asarray(v)) for key, v in back.items()}, strict=True)


def test_conv1d_and_conv_layouts(torch_state):
  _, _, state = torch_state
  variables, _ = convert.state_dict_to_variables(state)
  w = state['cfc.value_conv.weight'].numpy()  # (O, I, 1)
  np.testing.assert_array_equal(variables['params']['cfc']['value_conv']['kernel'], w[:, :, 0])  # (O, I): a reshape
  c = state['resnet.conv1.0.weight'].numpy()  # OIHW
  np.testing.assert_array_equal(variables['params']['resnet']['conv1_0']['kernel'], c.transpose(2, 3, 1, 0))


def test_detects_variant_and_class_count(torch_state):
  name, k, state = torch_state
  assert csfcn.detect(state) == (name, k)
  other = 'csfcn_tiny' if name == 'csfcn' else 'csfcn'
  with pytest.raises(errors.ConversionError, match=f"checkpoint is {name} .*'{other}' was requested"):
    convert.state_dict_to_variables(state, model=other)
  with pytest.raises(errors.ConversionError, match=rf'{k} classes.*num_classes=3'):
    convert.state_dict_to_variables(state, model=name, num_classes=3)


def test_errors_name_key_and_shapes(torch_state):
  _, _, state = torch_state
  bad = dict(state)
  bad['cfc.key_conv.weight'] = torch.zeros(32, 256)  # a Linear-shaped tensor where Conv1d (32, 256, 1) belongs
  with pytest.raises(errors.ConversionError, match=r"'cfc\.key_conv\.weight'.*\(32, 256\).*\(32, 256, 1\)"):
    convert.state_dict_to_variables(bad)
  missing = {key: v for key, v in state.items() if key != 'sfc.conv_offset.1.weight'}
  with pytest.raises(errors.ConversionError, match=r"missing key 'sfc\.conv_offset\.1\.weight' .*\(10, 64, 3, 3\)"):
    convert.state_dict_to_variables(missing)
  extra = dict(state, **{'cfc.gamma': torch.zeros(1)})
  with pytest.raises(errors.ConversionError, match=r"unexpected key 'cfc\.gamma' \(1,\)"):
    convert.state_dict_to_variables(extra)
  with pytest.raises(errors.ConversionError, match='not a CSFCN checkpoint'):
    csfcn.detect({'backbone.x': torch.zeros(1)})
  assert issubclass(errors.ConversionError, errors.UserError)
