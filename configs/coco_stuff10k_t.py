"""CGRSeg-T on COCO-Stuff-10k (171 classes), mmseg 0.27 `coco-stuff10k.py` dataset
settings (from the dataset registry): img_scale (2048, 512), crop 512,
reduce_zero_label, cat_max_ratio 0.75.

Assumption: the paper reports COCO-Stuff-10k with the ADE20K optimiser settings;
the schedule length is not in the upstream repo, we use mmseg's 80k schedule
for this dataset (`schedule_80k.py`, as in mmseg's COCO-Stuff-10k configs).
"""

from configs import default


def get_config():
  c = default.get_config('coco_stuff10k')
  c.total_steps = 80_000
  return c
