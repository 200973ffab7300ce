"""CGRSeg models: `build_segmentor(variant, num_classes)` and the variant tables."""

from cgrseg_jax.models.cgrseg import VARIANTS, CGRSegHead, CGRSegModel, build_segmentor
from cgrseg_jax.models.efficientformer_v2 import BACKBONES, EfficientFormerV2, build_backbone

__all__ = [
  'VARIANTS',
  'BACKBONES',
  'CGRSegHead',
  'CGRSegModel',
  'EfficientFormerV2',
  'build_segmentor',
  'build_backbone',
]
