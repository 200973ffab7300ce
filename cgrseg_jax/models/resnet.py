"""Deep-stem ResNet (ResNet-D stem, `inplanes` 128): the CSFCN backbone, NHWC.

The upstream CSFCN imports a `resnetv1c` module that no commit contains; the
repository's `models/base_models/resnetv1b.py` is the deep-stem ResNet-18 whose
ImageNet weights (`resnet18-deep-inplane128.pth`) the code loads, so that is the
network here (see SPEC-CSFCN.md §1).

Stem: three 3x3 convs (the first with stride 2; 3->64->64->128) with BN+ReLU
between them, then `bn1`, ReLU and a 3x3 stride-2 max pool. Flax names follow
the PyTorch keys through the list rule of `csfcn.KEY_LAYOUT` (`conv1_0` <->
`conv1.0`, `layer2_1` <-> `layer2.1`). Every stride-2 op pads (1, 1)
symmetrically as PyTorch does (Flax 'SAME' would pad (0, 1) on even sizes).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cgrseg_jax.models.layers import BatchNorm, ConvBN, conv

Dtype = Any

# ResNet depths by name (BasicBlock only: the CSFCN family uses ResNet-18).
DEPTHS = {'resnet18': (2, 2, 2, 2)}
STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN with an identity (or 1x1 conv-BN `downsample`) shortcut."""

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out = conv(self.planes, 3, stride=self.stride, padding=1, bias=False, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(out, train))
    out = conv(self.planes, 3, padding=1, bias=False, dtype=self.dtype, name='conv2')(out)
    out = BatchNorm(dtype=self.dtype, name='bn2')(out, train)
    if self.downsample:
      x = ConvBN(self.planes, 1, stride=self.stride, bias=False, dtype=self.dtype, name='downsample')(x, train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """Returns the four stage outputs (layer1..layer4: strides 4, 8, 16, 32)."""

  depths: Sequence[int] = DEPTHS['resnet18']
  stem_width: int = 64
  inplanes: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    w, d = self.stem_width, self.dtype
    x = conv(w, 3, stride=2, padding=1, bias=False, dtype=d, name='conv1_0')(x)
    x = nn.relu(BatchNorm(dtype=d, name='conv1_1')(x, train))
    x = conv(w, 3, padding=1, bias=False, dtype=d, name='conv1_3')(x)
    x = nn.relu(BatchNorm(dtype=d, name='conv1_4')(x, train))
    x = conv(self.inplanes, 3, padding=1, bias=False, dtype=d, name='conv1_6')(x)
    x = nn.relu(BatchNorm(dtype=d, name='bn1')(x, train))
    # MaxPool2d(3, 2, padding=1): the -inf border written out, because jax2onnx's
    # max_pool drops explicit padding (and wants the window as a keyword).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2))
    inplanes, outs = self.inplanes, []
    for i, (planes, depth) in enumerate(zip(STAGE_WIDTHS, self.depths)):
      stride = 1 if i == 0 else 2
      for j in range(depth):
        s = stride if j == 0 else 1
        down = j == 0 and (s != 1 or inplanes != planes)
        x = BasicBlock(planes, s, down, dtype=d, name=f'layer{i + 1}_{j}')(x, train)
        inplanes = planes
      outs.append(x)
    return tuple(outs)
