"""Base configuration: the upstream CGRSeg-T ADE20K 160k recipe (SPEC §6, §7).

Every other config starts from `get_config()` here and changes what differs.
Configs are locked by `main.py` (`lock_config=True`), so a misspelt
`--config.some.field=...` is an error; fields that may legitimately be unset
are `placeholder`s with a type.

Batch sizes are GLOBAL (summed over all processes and devices); each process
loads `batch_size / jax.process_count()` examples per step.
"""

import ml_collections
from ml_collections import config_dict

from cgrseg_jax.data import datasets, transforms


def get_config(dataset: str = 'ade20k'):
  """The upstream recipe for `dataset`; its numbers (classes, scales, crop,
  root) come from the dataset registry (cgrseg_jax/data/datasets.py)."""
  info = datasets.get(dataset)
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- data (mmseg 0.27 pipeline; the dataset's facts from the registry)
  c.data = ml_collections.ConfigDict()
  c.data.dataset = dataset  # a registered name: ade20k | coco_stuff10k | pascal_context59 | cityscapes | camvid | synthetic | custom ...
  # The mmseg layout root (default: where mmseg keeps it, e.g. data/ade/ADEChallengeData2016).
  c.data.root = ml_collections.FieldReference(info.default_root, field_type=str)
  # ArrayRecord shards of the dataset (scripts/write_shards.py), local or gs://: the
  # folder holding <train_split>/ and <val_split>/ with their manifest.json. When
  # set, samples come from there instead of data.root (same samples, same order).
  c.data.shards = ''
  c.data.train_split = 'train'
  c.data.val_split = 'val'
  c.data.img_scale = info.img_scale  # keep-ratio Resize scale, train (base of the random ratio) and test
  c.data.crop_size = info.crop_size  # RandomCrop, then Pad to this size
  # The test pipeline is mmseg's, fixed: keep-ratio resize to img_scale, pad to
  # a multiple of size_divisor (then to a bucket, eval_max_buckets), normalise.
  c.data.size_divisor = 32
  # Training transforms after loading, mmseg style: ('Name', {kwargs}) resolved
  # through the registry of cgrseg_jax/data/transforms.py (@register). Arguments
  # an entry leaves out come from the fields above (img_scale, crop_size) or the
  # dataset (ignore_index); reduce_zero_label is added from the dataset;
  # normalisation runs on the device.
  c.data.train_pipeline = transforms.DEFAULT_TRAIN_PIPELINE
  c.data.workers = 4  # grain worker processes per host (0 = in-process)
  c.data.prefetch = 2  # batches buffered per worker
  c.data.eval_max_images = config_dict.placeholder(int)  # evaluate on the first N val images only
  # Eval images are padded to a multiple of size_divisor (mmseg), then to
  # coarser multiples until at most this many shapes remain (one compile
  # each); 0 keeps mmseg's exact padding. Extra padding is not neutral for a
  # model with global attention: use 0 to reproduce published numbers.
  c.data.eval_max_buckets = 8
  # Read the data shards of an N-process run (N a multiple of the process
  # count): replays a pod run's exact global batches on fewer hosts.
  c.data.emulate_process_count = config_dict.placeholder(int)
  # Synthetic dataset (`dataset='synthetic'`): procedural scenes, no files.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_classes = 8
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_val = 100
  c.data.synthetic.image_size = (512, 683)
  # Your own data (`dataset='custom'`, README "Your own data"): directories
  # relative to data.root, '{split}' replaced by train_split / val_split.
  c.data.custom = ml_collections.ConfigDict()
  c.data.custom.img_dir = config_dict.placeholder(str)  # e.g. 'images/{split}'
  c.data.custom.ann_dir = config_dict.placeholder(str)  # e.g. 'annotations/{split}'
  c.data.custom.img_suffix = '.jpg'
  c.data.custom.seg_map_suffix = '.png'
  c.data.custom.split_file = config_dict.placeholder(str)  # e.g. 'splits/{split}.txt' (one stem per line)
  c.data.custom.class_names = config_dict.placeholder(tuple)  # or num_classes
  c.data.custom.num_classes = config_dict.placeholder(int)
  c.data.custom.palette = config_dict.placeholder(tuple)  # ((r, g, b), ...) per class; default generated
  c.data.custom.reduce_zero_label = False  # label 0 = 'other' -> ignored, ids shift down by one

  c.batch_size = 16  # global: 4 GPUs x 4 upstream
  # Gradient accumulation: one optimizer step per this many batches of batch_size, on
  # their mean gradient (effective batch batch_size x k). total_steps, the schedule and
  # log/eval/checkpoint_every count optimizer steps; checkpoint directories count
  # batches. BatchNorm in train mode normalises, and updates its statistics, per batch.
  c.grad_accum_steps = 1
  c.eval_batch_size = 1  # global; whole-image test uses 1 image per device step
  c.total_steps = 160_000

  # ---- model
  c.model = ml_collections.ConfigDict()
  c.model.name = 'cgrseg_t'  # a registered model: cgrseg_t | cgrseg_b | cgrseg_l | cgrseg_tiny (tests)
  # None: the dataset's class count, filled in when the run starts (custom data).
  c.model.num_classes = ml_collections.FieldReference(None if dataset == 'custom' else info.num_classes, field_type=int)
  c.model.drop_path_rate = config_dict.placeholder(float)  # None: the model's upstream rate
  # Depthwise-conv implementation: 'auto' (shifted sums on CPU, XLA's grouped
  # convolution on GPU/TPU), 'shifts' or 'xla'; same numbers, different speed.
  c.model.depthwise = 'auto'
  # How the backbone's BatchNorms train (CGRSeg): None = the model's default,
  # 'frozen' as upstream (its EfficientFormer keeps them in eval mode: running
  # statistics, never updated; scale and bias learn), or 'batch' (SyncBN, as the head).
  c.model.backbone_bn = config_dict.placeholder(str)
  c.precision = 'float32'  # compute dtype: float32 | bfloat16 (params stay float32)
  # EMA of the weights (params and BatchNorm statistics, float32, in the checkpoint):
  # ema = d * ema + (1 - d) * weights after each optimizer step, from the initial weights.
  # 0 = off. Evaluations then report both (val/ and val_ema/); load them with <run>:ema.
  c.ema_decay = 0.0

  # ---- initialisation: 'scratch', or anything cgrseg_jax/loader.py reads: an
  # ImageNet backbone .pth (backbone only, e.g. eformer_s1_450.pth, as upstream),
  # an upstream full-model .pth, a converted directory, a training workdir or a step dir.
  c.init = 'scratch'

  # ---- optimizer: mmcv AdamW + paramwise_cfg.custom_keys (SPEC §6)
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = config_dict.placeholder(str)  # None: the model family's (optim.OPTIMIZERS)
  c.optimizer.lr = 1.2e-4
  c.optimizer.betas = (0.9, 0.999)
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  # Substring rule on the upstream parameter names: longest key first, ties
  # alphabetical, first match wins; lr = lr * lr_mult, wd = wd * decay_mult.
  c.optimizer.custom_keys = ml_collections.ConfigDict(
    {
      'absolute_pos_embed': {'decay_mult': 0.0},
      'head': {'lr_mult': 10.0},
      'norm': {'decay_mult': 0.0},
    }
  )
  c.optimizer.grad_clip = config_dict.placeholder(float)  # upstream: none
  # SGD only (optimizer 'sgd', the CSFCN recipe): torch SGD momentum, and
  # upstream_frozen=True keeps the parameters upstream never trains (CSFCN's
  # Conv1d weights) at their init, as upstream's optimizer does.
  c.optimizer.momentum = 0.9
  c.optimizer.upstream_frozen = False

  # The decode-head loss (mmseg's loss_decode): a name of losses.LOSSES, or a list of
  # (name, weight) / (name, weight, {options}) entries whose weighted sum is the loss, e.g.
  #   [('cross_entropy', 1.0, {'class_weight': 'auto', 'class_weight_method': 'enet'}), ('dice', 3.0)]
  # Names: cross_entropy, ohem, dice, dice_0x, focal, lovasz (options: losses.py). None: the
  # model family's ('cross_entropy' CGRSeg, 'ohem' CSFCN). class_weight='auto' counts the
  # training labels once and caches the counts in <workdir>/class_histogram.json.
  # From the command line: --config.loss=dice or --config.loss="[('cross_entropy', 1.0), ('dice', 3.0)]".
  c.loss = config_dict.placeholder(object)
  # OHEM cross-entropy (loss 'ohem'): keep pixels with target probability <= max(thresh,
  # the min_kept-th smallest); min_kept counts pixels of the whole global batch.
  c.ohem = ml_collections.ConfigDict()
  c.ohem.thresh = 0.9
  c.ohem.min_kept = 110_000

  # ---- schedule: mmcv poly (power 1, min_lr 0) + linear warmup, per iteration
  c.schedule = ml_collections.ConfigDict()
  c.schedule.power = 1.0
  c.schedule.warmup_steps = 1500
  c.schedule.warmup_ratio = 1e-6  # AdamW (mmcv): warmup starts at lr * warmup_ratio
  c.schedule.warmup_factor = 1.0 / 3.0  # SGD (CSFCN WarmupPolyLR): warmup starts at lr * warmup_factor

  # ---- loop
  c.log_every = 50  # scalars to TensorBoard / metrics.jsonl
  c.eval_every = 4000  # 0 = only at the end, < 0 = never
  c.checkpoint_every = 4000  # also at every eval and at the end
  c.keep_checkpoints = 3  # the last N; the best by mIoU is kept too
  c.progress_bar = True
  # (first, last): a jax.profiler trace of training steps first..last (0-based) to
  # <workdir>/profile (gs:// too), for TensorBoard's profile plugin. () = off.
  c.profile_steps = ()

  # ---- evaluation (training-time and --mode=eval): the evaluator plugin
  # (evaluation.EVALUATORS): 'auto' = 'segmenter' (evaluation/segmenter.py) when
  # TTA or slide is set below, else 'bucketed' (evaluation/bucketed.py, whole image).
  c.eval = ml_collections.ConfigDict()
  c.eval.evaluator = 'auto'
  c.eval.mode = 'whole'  # or 'slide' (mmseg slide_inference)
  c.eval.crop_size = (512, 512)  # slide window (mmseg test_cfg; scripts/predict.py's default too)
  c.eval.stride = (341, 341)  # slide step
  c.eval.tta = ml_collections.ConfigDict()
  c.eval.tta.scales = ()  # ratios of data.img_scale, e.g. 0.5,0.75,1.0,1.25,1.5,1.75
  c.eval.tta.flip = False  # add flipped views (softmax maps averaged)
  # Each evaluation writes <workdir>/eval/<step>/: confusion.json and .png, and the
  # panels of this many lowest-mIoU images with worst.json (0: no panels).
  c.eval.worst_images = 8
  return c


def cpu_demo_data(c, num_classes: int = 5):
  """The CPU demos' synthetic data (configs/synthetic_*.py): `num_classes`
  classes, 4000 train and 100 val scenes of 128x160 (tested at that size),
  loaded in-process."""
  c.data.synthetic.num_classes = num_classes
  c.data.synthetic.num_train = 4000
  c.data.synthetic.num_val = 100
  c.data.synthetic.image_size = (128, 160)
  c.data.img_scale = (160, 128)
  c.data.workers = 0
  c.model.num_classes = num_classes
  return c
