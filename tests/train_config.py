"""A CPU-test-sized training config (tiny model, 64x64 crops); not a test file.

`toy_config` trains the toy family (tests/toy_family.py) instead: for tests whose
question is the run (checkpoints, resuming, signals, NaN stops), not the model,
it compiles in seconds instead of a minute. `main.py
--config=tests/train_config.py:toy` is the same from a subprocess (with tests/ on
PYTHONPATH, as for every use of this file)."""

import toy_family
from cgrseg_jax.models import registry
from configs import synthetic_t


def tiny_config(**overrides):
  c = synthetic_t.get_config()
  c.model.name = 'cgrseg_tiny'
  c.data.synthetic.image_size = (64, 80)
  c.data.synthetic.num_train = 64
  c.data.synthetic.num_val = 8
  c.data.img_scale = (80, 64)
  c.data.crop_size = (64, 64)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 3
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 0
  c.progress_bar = False
  c.eval.worst_images = 2
  c.schedule.warmup_steps = 0
  c.optimizer.lr = 1e-4
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  c.lock()
  return c


TOY = {'model.name': 'toy_small', 'model.backbone_bn': None}


def toy_config(**overrides):
  """`tiny_config` with the toy family, which this registers."""
  registry.register(toy_family.FAMILY, replace=True)
  return tiny_config(**{**TOY, **overrides})


def with_values(config, **values):
  """A resolved copy of `config` with dotted fields set: with_values(c, **{'model.num_classes': 5})."""
  config = config.copy_and_resolve_references()
  for key, value in values.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def get_config(arg=None):
  """`main.py --config=tests/train_config.py[:toy]` (tests in subprocesses): the tiny or toy config; set fields
  with --config.x."""
  if arg not in (None, '', 'toy'):
    raise ValueError(f'tests/train_config.py:{arg}: expected no argument or :toy')
  return toy_config() if arg == 'toy' else tiny_config()
