"""Independent pure-PyTorch reference of the CGRSeg segmentor (the `torch` extra).

This module re-implements, with plain ``torch`` only (no timm / mmcv / mmseg /
torchvision), the network that the upstream CGRSeg code builds through
mmsegmentation 0.27:

* backbone: EfficientFormerV2 (``efficientformerv2_{s0,s1,s2,l}_feat``),
* decode head: ``CGRSeg`` (pyramid pooling + rectangular-calibration modules,
  sigmoid-gated fusion, dynamic prototype guidance).

``state_dict()`` of a model built here has exactly the key layout of an
upstream mmseg checkpoint (``backbone.*`` / ``decode_head.*``, buffers
included), so upstream checkpoints load strictly and the model serves as the
numerical reference for the Flax port.

Deliberate differences from the upstream *training harness* (not the math):

* BatchNorm layers are plain ``nn.BatchNorm2d``. The backbone keeps upstream's
  ``train()`` rule: after ``super().train(mode)`` every ``nn.BatchNorm2d`` of
  the backbone goes back to eval mode, so in training it normalises with its
  running statistics and never updates them (``backbone_bn='batch'`` turns the
  rule off, for comparisons with batch statistics everywhere).
* The gathered attention-bias table is recomputed and bicubically resized on
  every forward, in train and eval mode alike (upstream caches the gather at
  ``eval()`` time, which gives the same numbers).
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
  'BACKBONE_ARCHS',
  'HEAD_COMMON',
  'VARIANTS',
  'build_torch_segmentor',
  'randomize_',
  'load_upstream_checkpoint',
  'count_learnable_params',
  'CGRSegTorch',
]

# ---------------------------------------------------------------------------
# Architecture tables (the Flax side mirrors these)
# ---------------------------------------------------------------------------

# EfficientFormerV2 backbones.  ``mlp_ratios[s][b]`` is the FFN expansion
# ratio of block ``b`` of stage ``s``.  In stages 3 and 4 (index 2 and 3) the
# last ``vit_num`` blocks are attention+FFN blocks; the attention of stage 3
# works at half resolution (stride 2).  ``drop_path_rate`` is the rate the
# upstream ``*_feat`` class hard-codes.
BACKBONE_ARCHS: Dict[str, dict] = {
  'S0': dict(
    widths=(32, 48, 96, 176),
    depths=(2, 2, 6, 4),
    vit_num=2,
    drop_path_rate=0.0,
    mlp_ratios=(
      (4, 4),
      (4, 4),
      (4, 3, 3, 3, 4, 4),
      (4, 3, 3, 4),
    ),
  ),
  'S1': dict(
    widths=(32, 48, 120, 224),
    depths=(3, 3, 9, 6),
    vit_num=2,
    drop_path_rate=0.0,
    mlp_ratios=(
      (4, 4, 4),
      (4, 4, 4),
      (4, 4, 3, 3, 3, 3, 4, 4, 4),
      (4, 4, 3, 3, 4, 4),
    ),
  ),
  'S2': dict(
    widths=(32, 64, 144, 288),
    depths=(4, 4, 12, 8),
    vit_num=4,
    drop_path_rate=0.02,
    mlp_ratios=(
      (4, 4, 4, 4),
      (4, 4, 4, 4),
      (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4),
      (4, 4, 3, 3, 3, 3, 4, 4),
    ),
  ),
  'L': dict(
    widths=(40, 80, 192, 384),
    depths=(5, 5, 15, 10),
    vit_num=6,
    drop_path_rate=0.1,
    mlp_ratios=(
      (4, 4, 4, 4, 4),
      (4, 4, 4, 4, 4),
      (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4),
      (4, 4, 4, 3, 3, 3, 3, 4, 4, 4),
    ),
  ),
}

# Settings shared by every variant.
HEAD_COMMON: Dict[str, object] = dict(
  in_index=(1, 2, 3),  # the head reads backbone stages 2-4 (strides 8, 16, 32)
  square_kernel_size=3,  # depthwise square kernel inside RCA
  rcm_mlp_ratio=2,  # RCM ConvMlp expansion
  rcm_layer_scale_init=1e-6,  # RCM `gamma` init value
  backbone_layer_scale_init=1e-5,
  dropout_ratio=0.1,  # Dropout2d before conv_seg (both classifier calls)
  resolution=512,  # backbone `resolution` -> attention-bias table sizes
  ppa_stride=2,  # pyramid pooling target = stride-32 map halved
)

# Segmentor variants.  't', 'b', 'l' follow local_configs/cgrseg/*.py.
# 'tiny' is a TEST-ONLY variant (no upstream counterpart as a whole): the
# upstream S0 backbone (widths 32/48/96/176, depths 2/2/6/4, 2 attention blocks
# in stages 3-4, same bias tables as the others, i.e. resolution 512) with a
# small head: 32 channels, one RCM in the pyramid context, band kernel 5.
VARIANTS: Dict[str, dict] = {
  't': dict(backbone='S1', in_channels=(48, 120, 224), channels=128, next_repeat=5, band_kernel=11, drop_path_rate=0.0),
  'b': dict(
    backbone='S2', in_channels=(64, 144, 288), channels=256, next_repeat=6, band_kernel=11, drop_path_rate=0.02
  ),
  'l': dict(backbone='L', in_channels=(80, 192, 384), channels=256, next_repeat=5, band_kernel=9, drop_path_rate=0.1),
  'tiny': dict(backbone='S0', in_channels=(48, 96, 176), channels=32, next_repeat=1, band_kernel=5, drop_path_rate=0.0),
}


# ---------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------


class StochasticDepth(nn.Module):
  """Per-sample residual-branch dropping, rescaled by the keep probability."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = float(rate)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.rate == 0.0 or not self.training:
      return x
    keep = 1.0 - self.rate
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(mask_shape).bernoulli_(keep)
    if keep > 0.0:
      mask.div_(keep)
    return x * mask

  def extra_repr(self) -> str:
    return f'rate={self.rate}'


def _residual_drop(rate: float) -> nn.Module:
  return StochasticDepth(rate) if rate > 0.0 else nn.Identity()


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
  """conv (with bias) followed by BN; children named ``0`` and ``1``."""
  return nn.Sequential(
    nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups),
    nn.BatchNorm2d(cout),
  )


def _same_res_bias_index(res: int) -> Tuple[int, torch.Tensor]:
  """Relative-offset table for a res x res attention over itself.

  Offsets |dy|,|dx| are numbered in order of first appearance while walking
  query points (row-major) and key points (row-major).
  Returns (number of distinct offsets, LongTensor (res*res, res*res)).
  """
  grid = list(itertools.product(range(res), range(res)))
  numbering: Dict[Tuple[int, int], int] = {}
  table = []
  for qy, qx in grid:
    for ky, kx in grid:
      key = (abs(qy - ky), abs(qx - kx))
      table.append(numbering.setdefault(key, len(numbering)))
  n = len(grid)
  return len(numbering), torch.tensor(table, dtype=torch.long).view(n, n)


def _downsample_bias_index(res: int, res_q: int) -> Tuple[int, torch.Tensor]:
  """Offset table for queries on a res_q grid attending keys on a res grid.

  A query at (qy, qx) sits at (qy*step, qx*step) of the key grid with
  step = ceil(res / res_q).
  """
  step = math.ceil(res / res_q)
  q_grid = list(itertools.product(range(res_q), range(res_q)))
  k_grid = list(itertools.product(range(res), range(res)))
  numbering: Dict[Tuple[int, int], int] = {}
  table = []
  for qy, qx in q_grid:
    for ky, kx in k_grid:
      key = (abs(qy * step - ky), abs(qx * step - kx))
      table.append(numbering.setdefault(key, len(numbering)))
  return (len(numbering), torch.tensor(table, dtype=torch.long).view(len(q_grid), len(k_grid)))


def _resized_bias(biases: torch.Tensor, index: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
  """Gather per-head biases into an (heads, Nq_table, Nk_table) map and resize
  it bicubically (align_corners=False) to (1, heads, n_q, n_k)."""
  table = biases[:, index].unsqueeze(0)
  return F.interpolate(table, size=(n_q, n_k), mode='bicubic', align_corners=False)


# ---------------------------------------------------------------------------
# EfficientFormerV2 backbone
# ---------------------------------------------------------------------------


class ConvFFN(nn.Module):
  """1x1 expand -> BN -> GELU -> 3x3 depthwise -> BN -> GELU -> 1x1 -> BN."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Conv2d(dim, hidden, 1)
    self.act = nn.GELU()
    self.fc2 = nn.Conv2d(hidden, dim, 1)
    self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
    self.mid_norm = nn.BatchNorm2d(hidden)
    self.norm1 = nn.BatchNorm2d(hidden)
    self.norm2 = nn.BatchNorm2d(dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.act(self.norm1(self.fc1(x)))
    h = self.act(self.mid_norm(self.mid(h)))
    return self.norm2(self.fc2(h))


class FFNBlock(nn.Module):
  """Residual FFN block with a per-channel layer scale."""

  def __init__(self, dim: int, mlp_ratio: float, drop_path: float, ls_init: float):
    super().__init__()
    self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
    self.drop_path = _residual_drop(drop_path)
    self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), ls_init))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class MHSA4D(nn.Module):
  """Multi-head self-attention on a 2D map with talking heads, a local value
  branch and learned relative-position biases.  With ``stride=2`` the map is
  first reduced by a strided depthwise conv and the result is upsampled 2x
  (bilinear) before the output projection."""

  def __init__(
    self,
    dim: int,
    resolution: int,
    stride: Optional[int] = None,
    key_dim: int = 32,
    num_heads: int = 8,
    attn_ratio: int = 4,
  ):
    super().__init__()
    self.num_heads = num_heads
    self.key_dim = key_dim
    self.scale = key_dim**-0.5
    self.d = attn_ratio * key_dim
    self.dh = self.d * num_heads
    qk_ch = key_dim * num_heads

    if stride is not None:
      self.resolution = math.ceil(resolution / stride)
      self.stride_conv = _conv_bn(dim, dim, 3, stride=stride, groups=dim)
      self.up_factor = stride
    else:
      self.resolution = resolution
      self.stride_conv = None
      self.up_factor = None

    self.q = _conv_bn(dim, qk_ch)
    self.k = _conv_bn(dim, qk_ch)
    self.v = _conv_bn(dim, self.dh)
    self.v_local = _conv_bn(self.dh, self.dh, 3, groups=self.dh)
    self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
    self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
    self.proj = nn.Sequential(nn.GELU(), nn.Conv2d(self.dh, dim, 1), nn.BatchNorm2d(dim))

    n_offsets, index = _same_res_bias_index(self.resolution)
    # ImageNet leftovers kept only for the checkpoint layout.
    self.register_buffer('attention_biases', torch.zeros(num_heads, 49))
    self.register_buffer('attention_bias_idxs', torch.ones(49, 49, dtype=torch.long))
    self.attention_biases_seg = nn.Parameter(torch.zeros(num_heads, n_offsets))
    self.register_buffer('attention_bias_idxs_seg', index)

  def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
    # (B, heads*c, H, W) -> (B, heads, c, n): head h owns channels [h*c, (h+1)*c)
    return t.flatten(2).reshape(t.shape[0], self.num_heads, -1, n)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    if self.stride_conv is not None:
      x = self.stride_conv(x)
      h, w = h // 2, w // 2
    n = h * w
    q = self._heads(self.q(x), n).permute(0, 1, 3, 2)  # B,h,N,kd
    k = self._heads(self.k(x), n)  # B,h,kd,N
    v_map = self.v(x)
    v_loc = self.v_local(v_map)
    v = self._heads(v_map, n).permute(0, 1, 3, 2)  # B,h,N,d

    logits = (q @ k) * self.scale
    logits = logits + _resized_bias(
      self.attention_biases_seg, self.attention_bias_idxs_seg, logits.shape[-2], logits.shape[-1]
    )
    logits = self.talking_head1(logits)
    weights = self.talking_head2(logits.softmax(dim=-1))

    y = (weights @ v).transpose(2, 3).reshape(b, self.dh, h, w) + v_loc
    if self.up_factor is not None:
      y = F.interpolate(y, scale_factor=self.up_factor, mode='bilinear', align_corners=False)
    return self.proj(y)


class AttnFFNBlock(nn.Module):
  """Attention block followed by an FFN block, both with layer scales."""

  def __init__(
    self, dim: int, mlp_ratio: float, drop_path: float, ls_init: float, resolution: int, stride: Optional[int]
  ):
    super().__init__()
    self.token_mixer = MHSA4D(dim, resolution=resolution, stride=stride)
    self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
    self.drop_path = _residual_drop(drop_path)
    self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), ls_init))
    self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), ls_init))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(x))
    return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class LocalGlobalQuery(nn.Module):
  """Query for the downsampling attention: strided depthwise 3x3 conv plus
  plain stride-2 subsampling, then a 1x1 conv + BN."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.local = nn.Sequential(nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin))
    self.proj = _conv_bn(cin, cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    subsampled = x[:, :, ::2, ::2]
    return self.proj(self.local(x) + subsampled)


class DownsampleAttention(nn.Module):
  """Attention whose queries live on the 2x-reduced grid (stage 3 -> 4)."""

  def __init__(
    self, dim: int, out_dim: int, resolution: int, key_dim: int = 16, num_heads: int = 8, attn_ratio: int = 4
  ):
    super().__init__()
    self.num_heads = num_heads
    self.key_dim = key_dim
    self.scale = key_dim**-0.5
    self.d = attn_ratio * key_dim
    self.dh = self.d * num_heads
    qk_ch = key_dim * num_heads
    self.resolution = resolution
    self.resolution2 = math.ceil(resolution / 2)

    self.q = LocalGlobalQuery(dim, qk_ch)
    self.k = _conv_bn(dim, qk_ch)
    self.v = _conv_bn(dim, self.dh)
    self.v_local = _conv_bn(self.dh, self.dh, 3, stride=2, groups=self.dh)
    self.proj = nn.Sequential(nn.GELU(), nn.Conv2d(self.dh, out_dim, 1), nn.BatchNorm2d(out_dim))

    n_offsets, index = _downsample_bias_index(self.resolution, self.resolution2)
    self.register_buffer('attention_biases', torch.zeros(num_heads, 196))
    self.register_buffer('attention_bias_idxs', torch.ones(49, 196, dtype=torch.long))
    self.attention_biases_seg = nn.Parameter(torch.zeros(num_heads, n_offsets))
    self.register_buffer('attention_bias_idxs_seg', index)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    n_k = h * w
    n_q = n_k // 4
    nh = self.num_heads
    q = self.q(x).flatten(2).reshape(b, nh, -1, n_q).permute(0, 1, 3, 2)
    k = self.k(x).flatten(2).reshape(b, nh, -1, n_k)
    v_map = self.v(x)
    v_loc = self.v_local(v_map)
    v = v_map.flatten(2).reshape(b, nh, -1, n_k).permute(0, 1, 3, 2)

    logits = (q @ k) * self.scale
    logits = logits + _resized_bias(
      self.attention_biases_seg, self.attention_bias_idxs_seg, logits.shape[-2], logits.shape[-1]
    )
    weights = logits.softmax(dim=-1)
    y = (weights @ v).transpose(2, 3).reshape(b, self.dh, h // 2, w // 2)
    return self.proj(y + v_loc)


class ConvDownsample(nn.Module):
  """3x3 stride-2 conv + BN between stages 1->2 and 2->3."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.proj = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
    self.norm = nn.BatchNorm2d(cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.norm(self.proj(x))


class AttnConvDownsample(nn.Module):
  """Stage 3->4 transition: downsampling attention + (3x3 s2 conv + BN)."""

  def __init__(self, cin: int, cout: int, resolution: int):
    super().__init__()
    self.attn = DownsampleAttention(cin, cout, resolution)
    self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.attn(x) + self.bn(self.conv(x))


class EfficientFormerV2Backbone(nn.Module):
  """Feature extractor returning the 4 stage outputs (strides 4..32).

  ``network`` interleaves stages and transitions:
  [stage1, down, stage2, down, stage3, attn-down, stage4].
  """

  def __init__(
    self,
    arch: str,
    drop_path_rate: Optional[float] = None,
    resolution: int = 512,
    ls_init: float = 1e-5,
    frozen_bn: bool = True,
  ):
    super().__init__()
    self.frozen_bn = frozen_bn
    spec = BACKBONE_ARCHS[arch]
    widths, depths = spec['widths'], spec['depths']
    vit_num, ratios = spec['vit_num'], spec['mlp_ratios']
    if drop_path_rate is None:
      drop_path_rate = spec['drop_path_rate']
    total = sum(depths)

    self.patch_embed = nn.Sequential(
      nn.Conv2d(3, widths[0] // 2, 3, stride=2, padding=1),
      nn.BatchNorm2d(widths[0] // 2),
      nn.GELU(),
      nn.Conv2d(widths[0] // 2, widths[0], 3, stride=2, padding=1),
      nn.BatchNorm2d(widths[0]),
      nn.GELU(),
    )

    modules: List[nn.Module] = []
    for s, (dim, depth) in enumerate(zip(widths, depths)):
      stage_res = math.ceil(resolution / 2 ** (s + 2))
      blocks = []
      for j in range(depth):
        dpr = drop_path_rate * (sum(depths[:s]) + j) / (total - 1)
        use_attn = s >= 2 and j >= depth - vit_num
        if use_attn:
          blocks.append(
            AttnFFNBlock(dim, ratios[s][j], dpr, ls_init, resolution=stage_res, stride=2 if s == 2 else None)
          )
        else:
          blocks.append(FFNBlock(dim, ratios[s][j], dpr, ls_init))
      modules.append(nn.Sequential(*blocks))
      if s == len(widths) - 1:
        break
      if s >= 2:
        modules.append(AttnConvDownsample(dim, widths[s + 1], stage_res))
      else:
        modules.append(ConvDownsample(dim, widths[s + 1]))
    self.network = nn.ModuleList(modules)
    self.out_indices = (0, 2, 4, 6)

  def train(self, mode: bool = True):
    """Upstream's rule: the backbone's BNs stay in eval mode (mmcv's runner calls
    `model.train()` every iteration, which lands here)."""
    super().train(mode)
    if self.frozen_bn:
      for m in self.modules():
        if isinstance(m, nn.BatchNorm2d):
          m.eval()
    return self

  def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
    x = self.patch_embed(x)
    feats = []
    for i, m in enumerate(self.network):
      x = m(x)
      if i in self.out_indices:
        feats.append(x)
    return feats


# ---------------------------------------------------------------------------
# CGRSeg head
# ---------------------------------------------------------------------------


class ConvBNAct(nn.Module):
  """mmcv-ConvModule equivalent with a norm: bias-free conv, BN, optional ReLU."""

  def __init__(self, cin: int, cout: int, groups: int = 1, relu: bool = True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.activate = nn.ReLU() if relu else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.bn(self.conv(x))
    return self.activate(x) if self.activate is not None else x


class RectCalibAttention(nn.Module):
  """Rectangular self-calibration attention (RCA): a depthwise square conv
  gated by a sigmoid map computed from row-mean + column-mean context with a
  horizontal then a vertical band depthwise conv."""

  def __init__(self, dim: int, band_kernel: int, square_kernel: int):
    super().__init__()
    self.dwconv_hw = nn.Conv2d(dim, dim, square_kernel, padding=square_kernel // 2, groups=dim)
    self.excite = nn.Sequential(
      nn.Conv2d(dim, dim, (1, band_kernel), padding=(0, band_kernel // 2), groups=dim),
      nn.BatchNorm2d(dim),
      nn.ReLU(),
      nn.Conv2d(dim, dim, (band_kernel, 1), padding=(band_kernel // 2, 0), groups=dim),
      nn.Sigmoid(),
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    row_ctx = F.adaptive_avg_pool2d(x, (None, 1))  # (B,C,H,1)
    col_ctx = F.adaptive_avg_pool2d(x, (1, None))  # (B,C,1,W)
    gate = self.excite(row_ctx + col_ctx)
    return gate * self.dwconv_hw(x)


class PointwiseMlp(nn.Module):
  """1x1 conv -> GELU -> 1x1 conv (both with bias)."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Conv2d(dim, hidden, 1)
    self.act = nn.GELU()
    self.fc2 = nn.Conv2d(hidden, dim, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class RCM(nn.Module):
  """Rectangular self-calibration module: RCA -> BN -> MLP, scaled by
  ``gamma`` and added to the input."""

  def __init__(self, dim: int, band_kernel: int, square_kernel: int, mlp_ratio: float, ls_init: float):
    super().__init__()
    self.token_mixer = RectCalibAttention(dim, band_kernel, square_kernel)
    self.norm = nn.BatchNorm2d(dim)
    self.mlp = PointwiseMlp(dim, int(mlp_ratio * dim))
    self.gamma = nn.Parameter(torch.full((dim,), ls_init))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.mlp(self.norm(self.token_mixer(x)))
    return y * self.gamma.view(1, -1, 1, 1) + x


class RCMStack(nn.Module):
  def __init__(self, depth: int, dim: int, **kw):
    super().__init__()
    self.transformer_blocks = nn.ModuleList(RCM(dim, **kw) for _ in range(depth))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for blk in self.transformer_blocks:
      x = blk(x)
    return x


class GatedFusion(nn.Module):
  """local: 1x1 conv+BN; global: 1x1 conv+BN -> hard-sigmoid -> bilinear up;
  output = local * gate."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.fuse1 = ConvBNAct(cin, cout, relu=False)
    self.fuse2 = ConvBNAct(cin, cout, relu=False)

  def forward(self, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    gate = F.relu6(self.fuse2(glob) + 3.0) / 6.0
    gate = F.interpolate(gate, size=local.shape[2:], mode='bilinear', align_corners=False)
    return self.fuse1(local) * gate


class PrototypeGate(nn.Module):
  """DPG head (attention pooling, channel_mul fusion only): pools the class
  prototypes into one context vector and gates features channel-wise."""

  def __init__(self, dim: int, mid: int):
    super().__init__()
    self.conv_mask = nn.Conv2d(dim, 1, 1)
    self.channel_mul_conv = nn.Sequential(
      nn.Conv2d(dim, mid, 1),
      nn.LayerNorm([mid, 1, 1]),
      nn.ReLU(),
      nn.Conv2d(mid, dim, 1),
    )

  def forward(self, x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    # protos: (B, C, K, 1)
    b, c, kh, kw = protos.shape
    attn = self.conv_mask(protos).view(b, 1, kh * kw).softmax(dim=2)
    pooled = torch.matmul(protos.view(b, c, kh * kw).unsqueeze(1), attn.unsqueeze(3))  # (B,1,C,1)
    pooled = pooled.view(b, c, 1, 1)
    return x * torch.sigmoid(self.channel_mul_conv(pooled))


def _class_prototypes(feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
  """Spatially-softmaxed class maps times features -> (B, C, K, 1)."""
  b, k = logits.shape[:2]
  c = feats.shape[1]
  probs = logits.view(b, k, -1).softmax(dim=2)  # B,K,N
  protos = torch.matmul(probs, feats.view(b, c, -1).permute(0, 2, 1))  # B,K,C
  return protos.permute(0, 2, 1).contiguous().unsqueeze(3)


class CGRHead(nn.Module):
  def __init__(
    self,
    in_channels: Sequence[int],
    channels: int,
    num_classes: int,
    next_repeat: int,
    band_kernel: int,
    square_kernel: int = 3,
    mlp_ratio: float = 2,
    ls_init: float = 1e-6,
    dropout_ratio: float = 0.1,
    in_index: Sequence[int] = (1, 2, 3),
    ppa_stride: int = 2,
  ):
    super().__init__()
    self.in_channels = list(in_channels)
    self.in_index = list(in_index)
    self.channels = channels
    self.ppa_stride = ppa_stride
    rcm_kw = dict(band_kernel=band_kernel, square_kernel=square_kernel, mlp_ratio=mlp_ratio, ls_init=ls_init)

    # pieces of mmseg's BaseDecodeHead
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)
    self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    self.linear_fuse = ConvBNAct(channels, channels, groups=channels, relu=True)
    self.trans = RCMStack(next_repeat, sum(self.in_channels), **rcm_kw)
    self.SIM = nn.ModuleList(GatedFusion(c, channels) for c in self.in_channels)
    self.meta = nn.ModuleList(RCM(c, **rcm_kw) for c in self.in_channels)
    self.conv = nn.ModuleList(nn.Conv2d(channels, c, 1) for c in self.in_channels[:-1])
    self.lgc = PrototypeGate(channels, channels)

  def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
    if self.dropout is not None:
      x = self.dropout(x)
    return self.conv_seg(x)

  def _pyramid_pool(self, xs: List[torch.Tensor]) -> torch.Tensor:
    h, w = xs[-1].shape[2:]
    size = ((h - 1) // self.ppa_stride + 1, (w - 1) // self.ppa_stride + 1)
    return torch.cat([F.adaptive_avg_pool2d(t, size) for t in xs], dim=1)

  def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    xs = [feats[i] for i in self.in_index]
    ctx = self.trans(self._pyramid_pool(xs))
    glob = torch.split(ctx, self.in_channels, dim=1)

    prev = None
    for i in reversed(range(len(self.in_channels))):
      local = xs[i]
      if prev is not None:
        up = F.interpolate(prev, size=local.shape[2:], mode='bilinear', align_corners=False)
        local = local + self.conv[i](up)
      prev = self.SIM[i](self.meta[i](local), glob[i])
    x = prev

    first = self.cls_seg(self.linear_fuse(x))
    protos = _class_prototypes(x, first)
    refined = self.lgc(x, protos) + x
    return self.cls_seg(refined)


# ---------------------------------------------------------------------------
# Segmentor
# ---------------------------------------------------------------------------


class CGRSegTorch(nn.Module):
  """EncoderDecoder equivalent: ``backbone`` + ``decode_head``."""

  def __init__(
    self,
    variant: str,
    num_classes: int = 150,
    drop_path_rate: Optional[float] = None,
    resolution: Optional[int] = None,
    backbone_bn: str = 'frozen',
  ):
    super().__init__()
    if backbone_bn not in ('frozen', 'batch'):
      raise ValueError(f"backbone_bn={backbone_bn!r}; expected 'frozen' or 'batch'")
    cfg = VARIANTS[variant]
    common = HEAD_COMMON
    self.variant = variant
    self.num_classes = num_classes
    if drop_path_rate is None:
      drop_path_rate = cfg['drop_path_rate']
    if resolution is None:
      resolution = common['resolution']
    self.backbone = EfficientFormerV2Backbone(
      cfg['backbone'],
      drop_path_rate=drop_path_rate,
      resolution=resolution,
      ls_init=common['backbone_layer_scale_init'],
      frozen_bn=backbone_bn == 'frozen',
    )
    self.decode_head = CGRHead(
      cfg['in_channels'],
      cfg['channels'],
      num_classes,
      next_repeat=cfg['next_repeat'],
      band_kernel=cfg['band_kernel'],
      square_kernel=common['square_kernel_size'],
      mlp_ratio=common['rcm_mlp_ratio'],
      ls_init=common['rcm_layer_scale_init'],
      dropout_ratio=common['dropout_ratio'],
      in_index=common['in_index'],
      ppa_stride=common['ppa_stride'],
    )

  def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
    return self.backbone(x)

  def decode(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Head logits at stride 8.  ``x`` is an image batch (NCHW) or the list
    of 4 backbone features."""
    feats = x if isinstance(x, (list, tuple)) else self.extract_features(x)
    return self.decode_head(feats)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    logits = self.decode(x)
    return F.interpolate(logits, size=x.shape[2:], mode='bilinear', align_corners=False)


def build_torch_segmentor(
  variant: str,
  num_classes: int = 150,
  drop_path_rate: Optional[float] = None,
  resolution: Optional[int] = None,
  backbone_bn: str = 'frozen',
) -> CGRSegTorch:
  """Build the reference segmentor for ``variant`` in {'t','b','l','tiny'}.

  ``drop_path_rate`` overrides the backbone stochastic-depth rate (default:
  the variant's upstream value); ``resolution`` overrides the backbone's
  attention-bias table resolution (default 512, as upstream); ``backbone_bn``
  'frozen' keeps upstream's rule (the backbone's BNs in eval mode in training),
  'batch' trains them with batch statistics."""
  if variant not in VARIANTS:
    raise KeyError(f'unknown variant {variant!r}; choose from {sorted(VARIANTS)}')
  return CGRSegTorch(
    variant, num_classes=num_classes, drop_path_rate=drop_path_rate, resolution=resolution, backbone_bn=backbone_bn
  )


def count_learnable_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Randomisation and checkpoint loading
# ---------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Fill every float parameter and buffer with deterministic, non-trivial
  random values (in place) so that every branch influences the output.

  * conv / linear weights: N(0, 1/fan_in); biases: N(0, 0.1^2), except the
    post-softmax ``talking_head2`` bias: N(0, 0.002^2) (it is summed over
    all keys)
  * BN: weight U(0.8, 1.2), bias N(0, 0.1^2), running_mean N(0, 0.2^2),
    running_var U(0.5, 1.5)
  * LayerNorm: weight U(0.8, 1.2), bias N(0, 0.1^2)
  * layer scales (``layer_scale_*``) and RCM ``gamma``: U(0.1, 0.6) with a
    random sign
  * DPG ``conv_mask`` weight: N(0, 100/fan_in) so the class pooling matters
  * attention biases (used ``*_seg`` and the unused leftovers): N(0, 1)

  Integer buffers (index tables, ``num_batches_tracked``) are left alone.
  The generator walks names in sorted order, so the result depends only on
  ``seed`` and the model structure.
  """
  gen = torch.Generator().manual_seed(int(seed))
  owners: Dict[str, nn.Module] = {}
  for mname, mod in model.named_modules():
    for pname, _ in itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)):
      owners[f'{mname}.{pname}' if mname else pname] = mod

  tensors = dict(model.named_parameters())
  tensors.update(dict(model.named_buffers()))

  def normal(shape, std):
    return torch.randn(shape, generator=gen) * std

  def uniform(shape, lo, hi):
    return torch.rand(shape, generator=gen) * (hi - lo) + lo

  for name in sorted(tensors):
    t = tensors[name]
    if not t.is_floating_point():
      continue
    mod = owners[name]
    leaf = name.rsplit('.', 1)[-1]
    shape = t.shape
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
      if leaf == 'weight':
        val = uniform(shape, 0.8, 1.2)
      elif leaf == 'bias':
        val = normal(shape, 0.1)
      elif leaf == 'running_mean':
        val = normal(shape, 0.2)
      elif leaf == 'running_var':
        val = uniform(shape, 0.5, 1.5)
      else:  # pragma: no cover
        raise RuntimeError(f'unexpected BN tensor {name}')
    elif isinstance(mod, nn.LayerNorm):
      val = uniform(shape, 0.8, 1.2) if leaf == 'weight' else normal(shape, 0.1)
    elif isinstance(mod, (nn.Conv2d, nn.Linear)):
      if leaf == 'weight':
        fan_in = t[0].numel()
        std = fan_in**-0.5
        if name.endswith('lgc.conv_mask.weight'):
          # class prototypes of a random net are nearly alike; a
          # larger scale makes the pooling over classes non-uniform
          std *= 10.0
        val = normal(shape, std)
      elif name.endswith('talking_head2.bias'):
        # added to every attention weight before the sum over all keys:
        # keep it small or it dominates (and scales with) the output
        val = normal(shape, 0.002)
      else:
        val = normal(shape, 0.1)
    elif leaf.startswith('layer_scale') or leaf == 'gamma':
      mag = uniform(shape, 0.1, 0.6)
      sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
      val = mag * sign
    elif leaf.startswith('attention_biases'):
      val = normal(shape, 1.0)
    else:
      raise RuntimeError(f'randomize_: no rule for float tensor {name}')
    t.copy_(val.to(dtype=t.dtype))
  return model


def load_upstream_checkpoint(model: nn.Module, path: str) -> dict:
  """Strictly load an mmseg checkpoint (``{'meta', 'state_dict'}``; a bare
  state dict or ``{'model': ...}`` is accepted too).  Returns the meta dict."""
  try:
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
  except Exception:  # meta with non-tensor python objects (trusted local file)
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
  if isinstance(ckpt, dict) and 'state_dict' in ckpt:
    sd = ckpt['state_dict']
  elif isinstance(ckpt, dict) and 'model' in ckpt:
    sd = ckpt['model']
  else:
    sd = ckpt
  if all(k.startswith('module.') for k in sd):
    sd = {k[len('module.') :]: v for k, v in sd.items()}
  model.load_state_dict(sd, strict=True)
  return ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
