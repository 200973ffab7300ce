"""A plain-PyTorch CSFCN / CSFCN-Tiny in the upstream key layout (test and
benchmark reference; needs the `torch` extra).

Written from the upstream semantics (kaigelee/CSFCN, with the deep-stem
ResNet-18 of `resnetv1b.py` as backbone, SPEC-CSFCN.md), without its training
harness: `model.state_dict()` has the upstream keys (resnet.*, cfc.*, sfc.*,
conv_out32.*), so upstream checkpoints load strictly. `forward_stages` returns
every intermediate the shared fixture stores.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CSFCNTorch', 'build_torch_csfcn', 'randomize_', 'count_learnable_params', 'ResNetTorch']


def _conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class ConvBNReLU(nn.Sequential):
  def __init__(self, cin, cout, k):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, 1, k // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU()


class BasicBlock(nn.Module):
  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = _conv3x3(cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetTorch(nn.Module):
  """Deep-stem ResNet-18 with inplanes 128; `fc` only when `num_classes` is given
  (the ImageNet checkpoint layout)."""

  def __init__(self, depths=(2, 2, 2, 2), num_classes=None):
    super().__init__()
    self.conv1 = nn.Sequential(
      _conv3x3(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(), _conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(),
      _conv3x3(64, 128),
    )  # fmt: skip
    self.bn1 = nn.BatchNorm2d(128)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 128
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths)):
      blocks = [BasicBlock(cin if j == 0 else planes, planes, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
      cin = planes
    if num_classes is not None:
      self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    outs = []
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
      outs.append(x)
    return outs


def pyramid_pool(x, grids):
  n, c, h, w = x.shape
  ar = w / h
  return torch.cat([F.adaptive_avg_pool2d(x, (g, max(1, round(ar * g)))).reshape(n, c, -1) for g in grids], 2)


class LocalAttention(nn.Module):
  def __init__(self, c, inter):
    super().__init__()
    self.conv = nn.Sequential(ConvBNReLU(c, inter, 1), nn.Conv2d(inter, c, 3, padding=1, bias=False))

  def forward(self, x):
    return x * torch.tanh(self.conv(x)) + x


class ContextBlock(nn.Module):
  def __init__(self, local_channels, cin=512, inter=256, key=32, grids=(6, 3, 2, 1)):
    super().__init__()
    self.grids, self.inter, self.key = grids, inter, key
    self.reduce_channel = ConvBNReLU(cin, inter, 3)
    self.query_conv = nn.Conv2d(inter, key, 1)
    self.key_conv = nn.Conv1d(inter, key, 1)
    self.value_conv = nn.Conv1d(inter, inter, 1)
    self.local_attention = LocalAttention(inter, local_channels)

  def forward(self, x):
    x = self.reduce_channel(x)
    n, _, h, w = x.shape
    q = self.query_conv(x).reshape(n, self.key, h * w).transpose(1, 2)  # n, hw, key
    k = self.key_conv(pyramid_pool(x, self.grids))  # n, key, s
    v = self.value_conv(pyramid_pool(x, self.grids))  # n, c, s
    attn = torch.softmax(q @ k, dim=-1)  # n, hw, s
    ctx = (v @ attn.transpose(1, 2)).reshape(n, self.inter, h, w)
    return x + self.local_attention(ctx)


class SpatialBlock(nn.Module):
  def __init__(self, tiny, groups=2):
    super().__init__()
    self.tiny, self.groups = tiny, groups
    self.conv_8 = ConvBNReLU(128, 128, 3)
    self.conv_32 = ConvBNReLU(256, 128, 3)
    if not tiny:
      self.cp1x1 = nn.Conv2d(128, 32, 1, bias=False)
      self.sp1x1 = nn.Conv2d(128, 32, 1, bias=False)
    self.conv_offset = nn.Sequential(
      ConvBNReLU(256 if tiny else 64, 64, 1), nn.Conv2d(64, 4 * groups + 2, 3, padding=1, bias=False)
    )

  def _sample(self, x, off):
    n, c, h, w = x.shape
    g = self.groups
    xs = x.reshape(n * g, c // g, h, w)
    off = off.reshape(n * g, 2, h, w).permute(0, 2, 3, 1)
    ys, xs_ = torch.meshgrid(torch.linspace(-1.0, 1.0, h), torch.linspace(-1.0, 1.0, w), indexing='ij')
    base = torch.stack([xs_, ys], -1)[None]
    grid = base + off / torch.tensor([w, h], dtype=x.dtype)
    return F.grid_sample(xs, grid, mode='bilinear', padding_mode='zeros', align_corners=True).reshape(n, c, h, w)

  def forward(self, cp, sp, return_offsets=False):
    h, w = cp.shape[2:]
    sp = F.interpolate(self.conv_32(sp), (h, w), mode='bilinear', align_corners=True)
    cp = self.conv_8(cp)
    both = torch.cat([cp, sp], 1) if self.tiny else torch.cat([self.cp1x1(cp), self.sp1x1(sp)], 1)
    o = self.conv_offset(both)
    g2 = 2 * self.groups
    cp_s = self._sample(cp, o[:, :g2])
    sp_s = self._sample(sp, o[:, g2 : 2 * g2])
    att = 1 + torch.tanh(o[:, 2 * g2 :])
    out = sp_s * att[:, 0:1] + cp_s * att[:, 1:2]
    return (out, o) if return_offsets else out


class Head(nn.Module):
  def __init__(self, num_classes, tiny, up=8):
    super().__init__()
    self.tiny, self.up = tiny, up
    self.conv = ConvBNReLU(128, 128, 3)
    self.conv_out = nn.Conv2d(128, num_classes if tiny else num_classes * up * up, 1)

  def forward(self, x):
    x = self.conv_out(self.conv(x))
    if self.tiny:
      return F.interpolate(x, scale_factor=self.up, mode='bilinear', align_corners=True)
    return F.pixel_shuffle(x, self.up)


class CSFCNTorch(nn.Module):
  def __init__(self, num_classes=19, tiny=False):
    super().__init__()
    self.resnet = ResNetTorch()
    self.cfc = ContextBlock(32 if tiny else 64)
    self.sfc = SpatialBlock(tiny)
    self.conv_out32 = Head(num_classes, tiny)

  def extract_features(self, x):
    """layer2 / layer3 / layer4 (strides 8, 16, 32), as the Flax model's method of that name."""
    return self.resnet(x)[1:]

  def forward_stages(self, x):
    _, feat8, feat16, feat32 = self.resnet(x)
    ctx = self.cfc(feat32)
    f, offsets = self.sfc(feat8, ctx, return_offsets=True)
    logits = self.conv_out32(f)
    return dict(feat8=feat8, feat16=feat16, feat32=feat32, cfc=ctx, sfc_offsets=offsets, sfc=f, logits=logits)

  def forward(self, x):
    return self.forward_stages(x)['logits']


def build_torch_csfcn(name: str = 'csfcn', num_classes: int = 19) -> CSFCNTorch:
  if name not in ('csfcn', 'csfcn_tiny'):
    raise ValueError(f'unknown CSFCN model {name!r}')
  return CSFCNTorch(num_classes, tiny=name == 'csfcn_tiny')


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, offset_scale: float = 3.0, calibrate=None) -> nn.Module:
  """Non-trivial random weights: fan-in scaled conv/linear weights, random biases
  and BN affine parameters and statistics. The offset conv is scaled by
  `offset_scale` so that some sample points fall outside the map. With an input
  batch `calibrate`, the BN statistics are then set to the exact batch
  statistics of a forward pass (activations stay O(1) through the network)."""
  g = torch.Generator().manual_seed(seed)
  for name, m in model.named_modules():
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
      if name.endswith('conv_offset.1'):
        m.weight.mul_(offset_scale)
      if m.bias is not None:
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    elif isinstance(m, nn.BatchNorm2d):
      m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
      m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  if calibrate is not None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
      m.momentum = None  # cumulative average: one batch -> exactly its statistics
      m.reset_running_stats()
    was_training = model.training
    model.train()
    model(calibrate)
    model.train(was_training)
    for m, (mom, nbt) in zip(bns, saved):
      m.momentum = mom
      m.num_batches_tracked.copy_(nbt)
  return model


def count_learnable_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)
