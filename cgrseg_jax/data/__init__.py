"""Input pipeline: sources (directory layouts, TFDS, synthetic), mmseg 0.27
transforms and grain train/eval pipelines. See pipeline.py for the API the
training code uses."""

from .pipeline import (
  EvalData,
  iterator_restore_args,
  iterator_save_args,
  make_eval_dataset,
  make_global_batch,
  make_train_dataset,
  make_train_iterator,
  normalize_image,
)
from .sources import DATASETS, DataError, DatasetInfo, make_source

__all__ = [
  'DATASETS',
  'DataError',
  'DatasetInfo',
  'EvalData',
  'iterator_restore_args',
  'iterator_save_args',
  'make_eval_dataset',
  'make_global_batch',
  'make_source',
  'make_train_dataset',
  'make_train_iterator',
  'normalize_image',
]
