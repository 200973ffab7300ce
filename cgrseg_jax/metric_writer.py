"""Scalars of a run to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`."""

from __future__ import annotations

import json
import logging
import os

import jax

log = logging.getLogger(__name__)


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`; process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.tb = None
    if self.active:
      try:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        log.warning('tensorboardX not installed: no TensorBoard event files (metrics.jsonl still written)')
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, record: dict, prefix: str):
    if not self.active:
      return
    for k, v in record.items():
      if self.tb is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        self.tb.add_scalar(f'{prefix}/{k}', v, step)
    self.jsonl.write(json.dumps({'step': int(step), 'split': prefix, **record}) + '\n')
    self.jsonl.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()
