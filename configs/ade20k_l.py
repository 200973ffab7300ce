"""CGRSeg-L on ADE20K (upstream cgrseg-l_ade20k_160k.py; backbone EfficientFormerV2-L,
init eformer_l_450.pth, backbone drop-path 0.1 from the variant table)."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'cgrseg_l'
  return c
