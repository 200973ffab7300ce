"""CGRSeg-T on your own data (README, "Your own data"): set the directories and
classes on the command line or in a copy of this file, e.g.

  python main.py --config=configs/custom_t.py --workdir=runs/mine \\
    --config.data.root=data/my_data \\
    --config.data.custom.img_dir='images/{split}' --config.data.custom.ann_dir='annotations/{split}' \\
    --config.data.custom.class_names="('background', 'road', 'car')"

model.num_classes follows the class names (or data.custom.num_classes).
The ADE20K recipe otherwise (img_scale (2048, 512), crop 512, 160k steps).
"""

from configs import default


def get_config():
  return default.get_config('custom')
