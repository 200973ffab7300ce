"""CSFCN on Cityscapes (19 classes): the upstream recipe as shipped (SPEC-CSFCN §4).

SGD lr 0.01, momentum 0.9, weight decay 5e-4 except 1-D parameters; WarmupPolyLR:
linear warmup from lr/3 over 2480 iterations, then poly 0.9; 119,040 iterations
(480 epochs x 248) at batch 12; OHEM cross-entropy (thresh 0.9, min_kept 110,000
over the whole batch). Augmentation in upstream's order: horizontal flip 0.5,
random short side in [128, 2048], pad + random 1024x1024 crop, Gaussian blur p 0.5,
ColorJitter(0.5, 0.5, 0.5). Validation: whole 1024x2048 images, single scale.

Choices where upstream is ambiguous or does not run:
- backbone: upstream imports `models.base_models.resnetv1c`, which no commit has;
  we use the repo's deep-stem ResNet-18 (inplanes 128), the network whose ImageNet
  weights (`resnet18-deep-inplane128.pth`) upstream loads: set `config.init` to it.
- padded label pixels are 255 (ignored) rather than upstream's raw 0 (ignored on
  Cityscapes labelIds anyway, but `Sky` on CamVid).
- the context block's Conv1d weights are trained (`optimizer.upstream_frozen=False`);
  upstream's `set_optimizer` drops 3-D tensors, so they stay at their init there:
  `--config.optimizer.upstream_frozen=True` reproduces that.
- crop: pad bottom/right to the crop size first, then crop at a uniform position
  (both ends included), as upstream; no cat_max_ratio.
- OHEM: a batch with no kept pixel gives loss 0 (upstream: NaN); fixed shapes (a sort).
- logits of inputs that are not multiples of 8 are cropped to the input size
  (upstream returns the larger map).
- batch 12 is the global batch (upstream: one GPU); min_kept counts pixels of it.
"""

from configs import default


def csfcn_recipe(c, *, crop_hw, lr, batch_size, total_steps, warmup_steps=2480):
  """The fields every CSFCN config sets: model, SGD + WarmupPolyLR, OHEM, test padding."""
  c.model.name = 'csfcn'
  c.data.crop_size = tuple(crop_hw)
  c.data.size_divisor = 8  # the model needs no padding; 8 keeps 720x960 and 1024x2048 as they are
  c.batch_size = batch_size
  c.total_steps = total_steps
  c.optimizer.name = 'sgd'
  c.optimizer.lr = lr
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.upstream_frozen = False
  c.schedule.warmup_steps = warmup_steps
  c.schedule.warmup_factor = 1.0 / 3.0
  c.schedule.power = 0.9
  c.loss = 'ohem'
  c.ohem.thresh = 0.9
  c.ohem.min_kept = 110_000
  return c


def train_pipeline(*, size_range, side, round_half_up, crop_hw, jitter):
  """Upstream's `_sync_transform` + `ColorJitter` as registered transforms."""
  return (
    ('RandomFlip', {'prob': 0.5}),
    ('RandomSideScale', {'size_range': tuple(size_range), 'side': side, 'round_half_up': round_half_up}),
    ('RandomPadCrop', {'crop_size': tuple(crop_hw)}),
    ('RandomGaussianBlur', {'prob': 0.5}),
    ('ColorJitter', dict(zip(('brightness', 'contrast', 'saturation', 'hue'), jitter))),
    # A no-op at the crop size that records valid_hw = the whole crop: upstream pads the
    # raw image with 0 and normalises the padding too, so nothing is zeroed after.
    ('Pad', {}),
  )


def get_config():
  c = default.get_config('cityscapes')
  csfcn_recipe(c, crop_hw=(1024, 1024), lr=0.01, batch_size=12, total_steps=119_040)
  c.data.train_pipeline = train_pipeline(
    size_range=(128, 2048), side='short', round_half_up=False, crop_hw=(1024, 1024), jitter=(0.5, 0.5, 0.5, 0.0)
  )
  c.eval_every = 2480 * 10
  c.checkpoint_every = 2480
  return c
