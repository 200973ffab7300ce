"""CSFCN on CamVid (SegNet layout, 11 classes, void ignored), upstream
`configs/fcn_camvid.yaml` (SPEC-CSFCN §4): SGD lr 0.001, batch 16, 968 epochs of
the 367 training images (22 iterations each: 21,296 iterations), crop 720x960,
random long side in [480, 1920] (rounded half up), flip, Gaussian blur p 0.5,
ColorJitter(0.3, 0.3, 0.3, hue 0.1), OHEM (0.9, 110,000). Validation: whole
720x960 images (`val`; set data.val_split='test' for the test split).

Choices: those of configs/cityscapes_csfcn.py (deep-stem ResNet-18 for the
missing resnetv1c, padded labels 255 not 0 - upstream's 0 is `Sky` on CamVid, a
bug -, Conv1d trained, OHEM with nothing kept = 0, logits cropped to the input
size); warmup: the Cityscapes 2480 iterations, which the CamVid yaml does not
change as we read it; min_kept 110,000 unchanged although a 16 x 720x960 batch
has 11M pixels (upstream's number).
"""

from configs import cityscapes_csfcn, default


def get_config():
  c = default.get_config('camvid')
  cityscapes_csfcn.csfcn_recipe(c, crop_hw=(720, 960), lr=0.001, batch_size=16, total_steps=21_296)
  c.data.train_pipeline = cityscapes_csfcn.train_pipeline(
    size_range=(480, 1920), side='long', round_half_up=True, crop_hw=(720, 960), jitter=(0.3, 0.3, 0.3, 0.1)
  )
  c.eval_every = 2200
  c.checkpoint_every = 2200
  return c
