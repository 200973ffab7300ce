"""Input pipeline: the dataset registry (datasets.py), sources (directory
layouts, custom, TFDS, synthetic), mmseg 0.27 transforms registered by name
(transforms.py), grain train/eval pipelines and dataset converters. See
pipeline.py for the API the training code uses."""

from .datasets import DATASETS, DatasetInfo, Layout, register
from .pipeline import (
  EvalData,
  make_eval_dataset,
  make_global_batch,
  make_train_dataset,
  make_train_iterator,
  normalize_image,
)
from .sources import DataError, make_source
from . import torchvision_transforms  # noqa: F401  (registers CSFCN's transforms by name)

__all__ = [
  'DATASETS',
  'DataError',
  'DatasetInfo',
  'EvalData',
  'Layout',
  'make_eval_dataset',
  'make_global_batch',
  'make_source',
  'make_train_dataset',
  'make_train_iterator',
  'normalize_image',
  'register',
]
