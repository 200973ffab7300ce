"""`config.profile_steps = (first, last)`: a jax.profiler trace of those training steps.

The trace (TensorBoard's profile plugin, or Perfetto) goes to
`<workdir>/profile/`, gs:// included: it is written to a local folder and
copied there when the trace ends (the profiler writes local files). Each step
is a `StepTraceAnnotation`, so the viewer splits the timeline by step. Process
0 only: one host's trace shows the step of all (the program is the same).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Optional, Sequence

import jax

from cgrseg_jax import errors, storage

log = logging.getLogger(__name__)


class StepProfile:
  """Start the trace before step `first` (0-based: the step that makes `first + 1`), stop after `last`."""

  def __init__(self, steps: Optional[Sequence[int]], workdir):
    self.active = bool(steps) and jax.process_index() == 0
    self.running = False
    if not steps:
      return
    if len(steps) != 2 or not 0 <= int(steps[0]) <= int(steps[1]):
      raise errors.ConfigError(f'config.profile_steps={tuple(steps)}; expected (first, last) with 0 <= first <= last')
    self.first, self.last = int(steps[0]), int(steps[1])
    self.target = storage.path(workdir) / 'profile'
    self._local = None

  def before(self, step: int) -> None:
    if self.active and not self.running and step == self.first:
      self._local = (
        os.fspath(self.target) if storage.is_local(self.target) else tempfile.mkdtemp(prefix='cgrseg-profile-')
      )
      jax.profiler.start_trace(self._local)
      self.running = True
      log.info('profiling steps %d..%d into %s', self.first, self.last, self.target)

  def annotate(self, step: int):
    if self.running:
      return jax.profiler.StepTraceAnnotation('train', step_num=step)
    return contextlib.nullcontext()

  def after(self, done: int, outputs) -> None:
    if self.running and done > self.last:
      jax.block_until_ready(outputs)  # the last step's device work inside the trace
      self.close()

  def close(self) -> None:
    if not self.running:
      return
    self.running = False
    jax.profiler.stop_trace()
    if not storage.is_local(self.target):
      for root, _, files in os.walk(self._local):
        for name in files:
          src = os.path.join(root, name)
          dst = self.target / os.path.relpath(src, self._local)
          dst.parent.mkdir(parents=True, exist_ok=True)
          with open(src, 'rb') as f, dst.open('wb') as g:
            shutil.copyfileobj(f, g, 1 << 22)
      shutil.rmtree(self._local, ignore_errors=True)
    log.info('profile written to %s', self.target)
