"""CGRSeg-B on ADE20K (upstream cgrseg-b_ade20k_160k.py; backbone EfficientFormerV2-S2,
init eformer_s2_450.pth, backbone drop-path 0.02 from the variant table)."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'cgrseg_b'
  return c
