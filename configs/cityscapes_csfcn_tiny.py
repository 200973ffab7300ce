"""CSFCN-Tiny on Cityscapes: the recipe and choices of configs/cityscapes_csfcn.py
(same upstream training script; only the model differs)."""

from configs import cityscapes_csfcn


def get_config():
  c = cityscapes_csfcn.get_config()
  c.model.name = 'csfcn_tiny'
  return c
