"""SIGTERM at any moment of a run: before the first step, while compiling, during evaluation.

A preempted pod host gets SIGTERM and some seconds to save. Every process
installs the handler at the start of the run; what the signal interrupts:

- **set-up and compilation**: `compile` runs the compile in a thread and
  waits for it and for the other processes in a loop that watches the flag;
  a signal there abandons the compile (nothing new to save: the state is the
  restored checkpoint or the initial weights).
- **training steps and evaluation batches**: `check()` at each boundary,
  which every process passes in the same order (each train step, each eval
  batch). It raises `Stopped` where all processes stop together, after which
  the loop saves the last finished step.

With several processes they must stop at the same boundary without waiting
for each other on the host (a process blocked there would hold back the
others' collectives). A signalled process proposes `its boundary + MARGIN` in
the key-value store of JAX's coordination service (the first proposal wins:
keys are never overwritten); every process reads it at each boundary (one
small RPC, no device work) and stops there. MARGIN = 2 is enough: at boundary
d a process has read the result of step (or eval batch) d - 1, whose
collectives needed every other process to dispatch it, so nobody is more than
2 boundaries past the proposer when the key appears.

Compilation has no boundaries: a process that is signalled before it has
announced its compile as done writes `ABANDON` instead and never announces;
so if that key exists, not every process can have finished, and all abandon.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
from jax._src import distributed

log = logging.getLogger(__name__)

DIR = 'cgrseg_preemption/'
STOP_AT = DIR + 'stop_at'
ABANDON = DIR + 'abandon_compile'
COMPILED = 'cgrseg_compiled/'
MARGIN = 2
# Long enough for a pod's slowest host to finish compiling the step.
COMPILE_WAIT_S = 60 * 60
POLL_S = 0.2


class Stopped(Exception):
  """Raised by `Preemption.check` where every process stops; `boundary` is where."""

  def __init__(self, boundary: int):
    super().__init__(f'preempted at boundary {boundary}')
    self.boundary = boundary


class Preemption:
  """SIGTERM -> a stop agreed by every process; a context manager around the whole run."""

  def __init__(self):
    self.flag = False
    self.boundary = 0
    self._previous = None
    self._client = None
    self._stop_at: Optional[int] = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handler)
    if jax.process_count() > 1:
      self._client = distributed.global_state.client
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def _propose(self, key: str, value: str) -> None:
    try:
      self._client.key_value_set(key, value)
    except Exception:  # another process proposed first: its value stands
      pass

  def _get(self, key: str) -> Optional[str]:
    found = dict(self._client.key_value_dir_get(DIR))
    return found.get(key)

  # ---- boundaries: train steps and eval batches

  def should_stop(self) -> bool:
    """Count one boundary; True where every process stops."""
    self.boundary += 1
    if self._client is None:
      return self.flag
    if self._stop_at is None:
      if self.flag:
        self._propose(STOP_AT, str(self.boundary + MARGIN))
      value = self._get(STOP_AT)
      if value is not None:
        self._stop_at = int(value)
        log.warning('preemption notice: all processes stop at boundary %d', self._stop_at)
    return self._stop_at is not None and self.boundary >= self._stop_at

  def check(self) -> None:
    """`should_stop`, raising `Stopped` (what evaluators call between batches)."""
    if self.should_stop():
      raise Stopped(self.boundary)

  # ---- compilation

  def compile(self, fn: Callable[[], Any], name: str = 'step') -> Any:
    """`fn()` (a compile), then a wait for every process to finish theirs; raises
    `Stopped` if a SIGTERM came first, here or on another process."""
    result: dict = {}

    def run():
      try:
        result['value'] = fn()
      except BaseException as e:  # re-raised in the caller's thread
        result['error'] = e

    # A daemon thread: an abandoned compile must not keep the process alive.
    worker = threading.Thread(target=run, name=f'compile-{name}', daemon=True)
    worker.start()
    announced = False
    deadline = time.time() + COMPILE_WAIT_S
    while True:
      if not announced and self.flag:
        if self._client is not None:
          self._propose(ABANDON, str(jax.process_index()))
        log.warning('SIGTERM while compiling the %s: abandoned', name)
        raise Stopped(self.boundary)
      if not worker.is_alive() and not announced:
        if 'error' in result:
          raise result['error']
        if self._client is None:
          return result['value']
        self._client.key_value_set(f'{COMPILED}{name}/{jax.process_index()}', '1')
        announced = True
      if announced:
        if len(self._client.key_value_dir_get(f'{COMPILED}{name}/')) == jax.process_count():
          return result['value']
      if self._client is not None and self._get(ABANDON) is not None:
        log.warning('another process was preempted while compiling the %s: stopping', name)
        raise Stopped(self.boundary)
      if time.time() > deadline:
        raise TimeoutError(f'the other processes did not finish compiling the {name} within {COMPILE_WAIT_S} s')
      worker.join(POLL_S)
