"""CGRSeg-T on Pascal Context 59, mmseg 0.27 `pascal_context_59.py` dataset settings
(from the dataset registry): img_scale (520, 520), crop 480x480,
reduce_zero_label, cat_max_ratio 0.75.

Assumption: mmseg's Pascal Context configs train 80k iterations with batch 16;
the CGRSeg repo ships no Pascal Context config, so we keep the ADE20K optimiser
and use 80k iterations. mmseg evaluates Pascal Context with sliding windows
(480, stride 320); this port uses whole-image inference (documented difference).
"""

from configs import default


def get_config():
  c = default.get_config('pascal_context59')
  c.total_steps = 80_000
  return c
