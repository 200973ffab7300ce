"""CGRSeg-T on Cityscapes (19 classes), mmseg 0.27 `cityscapes.py` dataset settings
(from the dataset registry): img_scale (2048, 1024), crop 512x1024, no
reduce_zero_label, cat_max_ratio 0.75.

Assumptions: the CGRSeg repo ships no Cityscapes config; we keep the ADE20K
optimiser and schedule length (160k, batch 16) and mmseg's dataset pipeline.
mmseg evaluates Cityscapes with sliding windows (1024x1024, stride 768); this
port uses whole-image inference at (2048, 1024).
"""

from configs import default


def get_config():
  return default.get_config('cityscapes')
