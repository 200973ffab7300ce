"""A toy model family registered from the tests (not a test file): a few convs
with its own PyTorch key layout, to show that a family plugs into training,
resuming, evaluation, conversion, inference and export with no package change.

PyTorch layout (the `ToyTorch` reference below):
  stem.0.weight/bias (3x3 conv, stride 2), stem.1.* (BatchNorm2d),
  mix.weight (1x1 conv, no bias), classifier.weight/bias (1x1 conv);
ImageNet-style backbone checkpoints hold `stem.*` plus a `fc.*` classifier.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F

from cgrseg_jax.errors import ConversionError
from cgrseg_jax.models import key_layout, registry
from cgrseg_jax.torch_reference.cgrseg import randomize_  # noqa: F401  (a reference module's seeded filler: benchmark.py)

WIDTHS = {'toy_small': 8, 'toy_wide': 16}


class ToySeg(nn.Module):
  num_classes: int
  width: int = 8
  dtype: object = jnp.float32
  frozen_bn: bool = False  # BatchNorm on running statistics in training too (`toy_frozen_bn`)

  @nn.compact
  def logits(self, x, train: bool = False):
    """Logits at stride 2 (what the loss reads)."""
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(self.width, (3, 3), strides=2, padding=1, dtype=self.dtype, name='stem_0')(x)
    x = nn.BatchNorm(
      use_running_average=not train or self.frozen_bn, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name='stem_1'
    )(x)
    x = nn.relu(x)
    x = x + nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype, name='mix')(x)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x).astype(jnp.float32)

  def __call__(self, x, train: bool = False):
    y = self.logits(x, train)
    n, _, _, k = y.shape
    return jax.image.resize(y, (n, x.shape[1], x.shape[2], k), 'bilinear')


class ToyTorch(torch.nn.Module):
  """The same network in PyTorch, written for the test (NCHW)."""

  def __init__(self, num_classes: int, width: int):
    super().__init__()
    self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, 2, 1), torch.nn.BatchNorm2d(width))
    self.mix = torch.nn.Conv2d(width, width, 1, bias=False)
    self.classifier = torch.nn.Conv2d(width, num_classes, 1)

  def logits(self, x):
    """Stride-2 logits, the family's `loss_method` (what the training loss reads)."""
    y = F.relu(self.stem(x))
    return self.classifier(y + self.mix(y))

  def forward(self, x):
    return F.interpolate(self.logits(x), size=x.shape[2:], mode='bilinear', align_corners=False)


def detect(state):
  missing = [k for k in ('stem.0.weight', 'classifier.weight') if k not in state]
  if missing:
    raise ConversionError(f'not a toy checkpoint: key {missing[0]!r} is missing')
  width = int(state['stem.0.weight'].shape[0])
  names = [n for n, w in WIDTHS.items() if w == width]
  if not names:
    raise ConversionError(f'no toy model of width {width}; known {WIDTHS}')
  return names[0], int(state['classifier.weight'].shape[0])


def detect_backbone(state):
  if 'stem.0.weight' not in state or 'classifier.weight' in state:
    raise ConversionError('not a toy backbone checkpoint')
  return [n for n, w in WIDTHS.items() if w == state['stem.0.weight'].shape[0]]


def load_backbone(state, template):
  part = {c: {k: v for k, v in t.items() if k.startswith('stem_')} for c, t in template.items()}
  return key_layout.fill_from_state_dict(
    state, part, LAYOUT, strict=False, skip_unused=lambda k: 'ImageNet classifier' if k.startswith('fc.') else None
  )


LAYOUT = key_layout.KeyLayout(list_modules=('stem',))

FAMILY = registry.ModelFamily(
  name='toy',
  # toy_frozen_bn: a step without batch statistics, whose gradient is a plain mean over images.
  variants={**{name: {'width': w} for name, w in WIDTHS.items()}, 'toy_frozen_bn': {'width': 8, 'frozen_bn': True}},
  build=lambda num_classes, dtype=jnp.float32, width=8, frozen_bn=False, platform=None: ToySeg(
    num_classes, width, dtype, frozen_bn
  ),
  key_layout=LAYOUT,
  detect=detect,
  loss_method='logits',
  loss_stride=2,
  detect_backbone=detect_backbone,
  load_backbone=load_backbone,
  recipe={'optimizer.name': 'adamw_mmcv', 'loss': 'cross_entropy'},
  torch_reference=lambda name, num_classes: ToyTorch(num_classes, WIDTHS.get(name, 8)),
)
