"""CSFCN-Tiny on CamVid: the recipe and choices of configs/camvid_csfcn.py."""

from configs import camvid_csfcn


def get_config():
  c = camvid_csfcn.get_config()
  c.model.name = 'csfcn_tiny'
  return c
