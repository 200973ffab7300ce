"""The model-family registry (models/registry.py): config -> model options, the
recipe, and the checks that keep a stray option from being dropped silently."""

import pytest

from cgrseg_jax import errors
from cgrseg_jax.models import registry
from train_config import tiny_config, with_values


def test_build_from_config_passes_the_family_options():
  c = tiny_config()
  assert c.model.backbone_bn == 'batch'  # the synthetic demo's choice (configs/synthetic_t.py)
  assert registry.build_from_config(c).backbone.frozen_bn is False
  frozen = with_values(c, **{'model.backbone_bn': 'frozen'})
  assert registry.build_from_config(frozen).backbone.frozen_bn is True
  # unset: the model's default, upstream's rule
  default = with_values(c, **{'model.backbone_bn': None})
  assert registry.build_from_config(default).backbone.frozen_bn is True
  with pytest.raises(errors.ConfigError, match="backbone_bn='sync'"):
    registry.build_from_config(with_values(c, **{'model.backbone_bn': 'sync'}))


def test_an_option_the_family_lacks_is_an_error():
  c = with_values(tiny_config(), **{'model.name': 'csfcn_tiny', 'model.num_classes': 5})
  with pytest.raises(errors.ConfigError, match="config.model.backbone_bn='batch': model family 'csfcn' has no"):
    registry.build_from_config(c)
  c = with_values(c, **{'model.backbone_bn': None})
  assert type(registry.build_from_config(c)).__name__ == 'CSFCN'


def test_recipe_values_come_from_the_config_or_the_family():
  c = tiny_config()
  assert registry.recipe_value(c, 'optimizer.name') == 'adamw_mmcv'  # CGRSeg's recipe
  assert registry.recipe_value(with_values(c, **{'model.name': 'csfcn_tiny'}), 'loss') == 'ohem'
  assert registry.recipe_value(with_values(c, **{'loss': 'ohem'}), 'loss') == 'ohem'  # the config wins
  with pytest.raises(ValueError, match=r"recipe names no \['loss'\]"):
    registry.register(
      registry.ModelFamily(
        'broken', {'broken_x': {}}, build=None, key_layout=None, detect=None, recipe={'optimizer.name': 'sgd'}
      )
    )
