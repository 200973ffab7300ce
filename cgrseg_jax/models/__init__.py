"""Segmentation models behind one registry (`registry.py`):

  build_model('cgrseg_t', num_classes=150, dtype=jnp.float32, **overrides)

Each family module registers one `ModelFamily` on import; `build_segmentor`
is CGRSeg's own builder (`variant` in t | b | l | tiny)."""

from cgrseg_jax.models import cgrseg as _cgrseg  # registers the CGRSeg family
from cgrseg_jax.models import csfcn as _csfcn  # registers the CSFCN family
from cgrseg_jax.models.cgrseg import VARIANTS, CGRSegHead, CGRSegModel, build_segmentor
from cgrseg_jax.models.efficientformer_v2 import BACKBONES, EfficientFormerV2, build_backbone
from cgrseg_jax.models.registry import ModelFamily, build_model, family_of, model_names, register

del _cgrseg, _csfcn

__all__ = [
  'VARIANTS',
  'BACKBONES',
  'CGRSegHead',
  'CGRSegModel',
  'EfficientFormerV2',
  'ModelFamily',
  'build_model',
  'build_segmentor',
  'build_backbone',
  'family_of',
  'model_names',
  'register',
]
