"""Scalars of a run to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`, local or gs://."""

from __future__ import annotations

import json

import jax
from tensorboardX import SummaryWriter, record_writer

from cgrseg_jax import storage


class _ObjectStoreEvents:
  """tensorboardX's writer factory for object stores: event files through `storage.AppendFile`
  (its own gs:// writer needs google-cloud-storage credentials of its own)."""

  def open(self, path):
    return storage.AppendFile(path)

  def directory_check(self, path):
    del path  # object stores have no directories to create


record_writer.register_writer_factory('gs', _ObjectStoreEvents())


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`; process 0 only."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if self.active:
      workdir = storage.path(workdir)
      self.tb = SummaryWriter(str(workdir / 'tb'))
      self.jsonl = storage.AppendFile(workdir / 'metrics.jsonl')

  def write(self, step: int, record: dict, prefix: str):
    if not self.active:
      return
    for k, v in record.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.tb.add_scalar(f'{prefix}/{k}', v, step)
    self.jsonl.write((json.dumps({'step': int(step), 'split': prefix, **record}) + '\n').encode())
    self.jsonl.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()
