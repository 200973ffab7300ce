"""Scalars of a run to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`."""

from __future__ import annotations

import json
import os

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`; process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, record: dict, prefix: str):
    if not self.active:
      return
    for k, v in record.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.tb.add_scalar(f'{prefix}/{k}', v, step)
    self.jsonl.write(json.dumps({'step': int(step), 'split': prefix, **record}) + '\n')
    self.jsonl.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()
