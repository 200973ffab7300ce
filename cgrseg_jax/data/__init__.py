"""Input pipeline: the dataset registry (datasets.py), readers of the data
(sources.py: directory layouts, custom, TFDS, synthetic), mmseg 0.27
transforms registered by name (transforms.py, torchvision_transforms.py),
test-time buckets (buckets.py), grain train/eval pipelines (pipeline.py),
config -> pipelines (input_pipeline.py, what training and evaluation call)
and dataset converters (converters.py)."""

from . import torchvision_transforms  # noqa: F401  (registers CSFCN's transforms by name)
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
