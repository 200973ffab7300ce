"""Checkpoints of a training run (initial weights from any format are `cgrseg_jax.loader`).

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with two items:
`state` (step, params, batch_stats, optimizer state, RNG: one pytree) and
`data` (the grain iterator state, one JSON file per process). orbax writes a
step into a temporary directory and renames it when every process has
finished (all processes call `save`; array shards are written by their owners,
the rest is written by process 0): that rename is the commit, and only
committed steps are listed, so resuming after a crash mid-save picks the
previous one. Saves are asynchronous: `save` returns once the arrays are
copied off the devices, the writing overlaps the next training steps, and a
failed write surfaces at the next `save` or `wait`.

Retention: the last `keep` checkpoints, plus the best by validation mIoU
(saves made right after an evaluation carry its metrics). Old steps leave in
two moves: an atomic rename into `.deleting/` (orbax's `todelete_subdir`,
done only after a newer save committed), then removal; a kill between the two
leaves only trash, never a half-deleted step among the kept ones.

Damage after the commit (a truncated or lost file, broken metadata) is found
when restoring: `RunCheckpoints.restore_latest` falls back to the next older
step, and renames the damaged ones to `<step>.damaged-<reason>` (kept for
inspection, invisible to orbax's step listing and retention). It says so in one
warning line; the thousands of reports the abandoned reads of that step leave
behind (see `_quiet_abandoned_reads`) are dropped unless the checkpointing
logger is at DEBUG (main.py --verbose).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
from typing import Any, Mapping, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from cgrseg_jax import errors, storage

log = logging.getLogger(__name__)

TRASH = '.deleting'
DAMAGED = '.damaged-'
# Write failures a person fixes outside the program (space, quota, permissions, read-only mount).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def _size(nbytes: float) -> str:
  """'512 KiB', '43 MiB', '1.2 GiB': the unit that gives a number people read."""
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20)):
    if nbytes >= scale:
      return f'{nbytes / scale:.1f} {unit}' if nbytes < 10 * scale else f'{nbytes / scale:.0f} {unit}'
  return f'{nbytes / 2**10:.0f} KiB'


def make_manager(directory, keep: int, best_metric: str = 'mIoU') -> ocp.CheckpointManager:
  """Manager keeping the latest `keep` steps and the best one by `best_metric`."""
  policies = ocp.checkpoint_managers
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=keep),
      policies.BestN(
        get_metric_fn=lambda m: m[best_metric], n=1, reverse=False, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=preservation,
    enable_async_checkpointing=True,
    create=True,
    cleanup_tmp_directories=True,
    todelete_subdir=TRASH,
  )
  return ocp.CheckpointManager(storage.path(directory), item_names=('state', 'data'), options=options)


def _restore_args(abstract_state: Any, data_iterator: Any):
  return ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
  )


def state_nbytes(state: Any) -> int:
  """Bytes of one copy of `state` (what a checkpoint of it needs on disk, before compression)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state)))


def _all_processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process (a no-op with one process)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _check_step_files(step_dir) -> None:
  """Cheap checks before reading arrays: the items and the JSON metadata orbax needs."""
  for item in ('state', 'data'):
    if not (step_dir / item).is_dir():
      raise FileNotFoundError(f'{item}/ is missing')
  data_file = f'data/process_{jax.process_index()}-of-{jax.process_count()}.json'
  for name in ('_CHECKPOINT_METADATA', 'state/_METADATA', data_file):
    try:
      json.loads((step_dir / name).read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f'{name} is missing') from None
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f'{name} is not valid JSON ({e})') from None


def _chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
  return out


def _reason_slug(e: BaseException) -> str:
  text = ' '.join(f'{type(x).__name__} {x}' for x in _chain(e))
  if 'FileNotFoundError' in text or 'NOT_FOUND' in text or 'is missing' in text:
    return 'missing-file'
  if 'JSON' in text or '_METADATA' in text:
    return 'bad-metadata'
  if 'Error reading' in text:  # TensorStore: a data file cut short, lost or corrupted
    return 'unreadable-data'
  return 'unreadable'


_READ_ERROR = 'Encountered error while reading array index'
_quiet = {'installed': False, 'dropped': 0}


def _abandoned_read(exc: Optional[BaseException], obj: Any = None) -> bool:
  """An error of orbax's reads of a step that failed to restore: a coroutine of its
  serialization module, a TensorStore read error, or a callback into the event
  loop orbax has closed since."""
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  code = getattr(obj, 'cr_code', None)
  if code is not None and 'orbax' in code.co_filename:
    return True
  return exc is not None and any(_READ_ERROR in str(x) for x in _chain(exc))


class _DropAbandonedReads(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    message = record.getMessage()
    # The task's coroutine is named in the message: orbax's own (its reads of the step).
    orbax_task = 'coro=<' in message and f'{os.sep}orbax{os.sep}' in message
    if 'exception was never retrieved' in message and (
      exc is None or _abandoned_read(exc) or _READ_ERROR in message or orbax_task
    ):
      return _keep()
    return True


def _keep() -> bool:
  """Whether to show a dropped report after all (the checkpointing logger at DEBUG)."""
  if log.isEnabledFor(logging.DEBUG):
    return True
  _quiet['dropped'] += 1
  return False


def _quiet_abandoned_reads() -> None:
  """After a step fails to restore, orbax's other reads of it are abandoned. Each
  ends in an error Python reports on its own: a coroutine finalised with its read
  error (an unraisable exception with a TensorStore spec dump), a TensorStore
  callback into the closed event loop ('Event loop is closed', unraisable or printed
  through sys.excepthook), a gathered future
  asyncio logs as never retrieved. A damaged 30 MB step printed 88,000 lines of
  them after the one warning that says what happened. Drop exactly those, for
  the rest of the process (they arrive as the failure unwinds and later, as the
  abandoned reads are collected), and pass everything else on. Installed before
  a restore is tried: a read that succeeds abandons nothing."""
  if _quiet['installed']:
    return
  _quiet['installed'] = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if _abandoned_read(unraisable.exc_value, unraisable.object) and not _keep():
      return
    previous(unraisable)

  sys.unraisablehook = hook
  # TensorStore's callbacks into the closed loop run on its own threads; their error is printed
  # through sys.excepthook, as an uncaught one would be.
  previous_except = sys.excepthook

  def excepthook(kind, value, tb):
    if isinstance(value, RuntimeError) and _abandoned_read(value) and not _keep():
      return
    previous_except(kind, value, tb)

  sys.excepthook = excepthook
  logging.getLogger('asyncio').addFilter(_DropAbandonedReads())


def _short(e: BaseException, limit: int = 300) -> str:
  """The root cause's message on one line (orbax's wrappers repeat the TensorStore spec)."""
  root = _chain(e)[-1]
  text = ' '.join(f'{type(root).__name__}: {root}'.split())
  return text if len(text) <= limit else text[: limit - 3] + '...'


class RunCheckpoints:
  """The checkpoints of one run: restore with fallback, save, surface write failures.

  Every process makes one and calls each method (orbax's contract); the file
  system is shared, process 0 does the renames and deletions.
  """

  def __init__(self, directory, keep: int, best_metric: str = 'mIoU'):
    self.directory = storage.path(directory)
    self.manager = make_manager(self.directory, keep, best_metric)
    self._pending: Optional[tuple[int, int]] = None  # (step, state bytes) of the save that may still be writing
    self._empty_trash()

  # ---- restore

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def damaged(self) -> list[str]:
    return sorted(d.name for d in self.directory.iterdir() if DAMAGED in d.name) if self.directory.exists() else []

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, Optional[int]]:
    """(state, step) of the newest step that restores on every process, or (None, None) if there is none.

    Steps that fail are logged with their reason; once an older one restored,
    the newer failures are renamed `<step>.damaged-<reason>`. If every step
    fails (which a config that no longer matches the checkpoints also causes),
    nothing is renamed and CheckpointError lists what was tried.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      if self.damaged():
        raise errors.CheckpointError(
          f'{self.directory} holds only damaged checkpoints ({", ".join(self.damaged())}); '
          'move them away to start from scratch, or restore a good copy'
        )
      return None, None
    # orbax's manager.restore ends with a barrier of all processes; a local
    # checkpointer lets one process fail without leaving the others waiting,
    # and the processes agree on the outcome afterwards.
    local = ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(),
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
      ),
    )
    failed: list[tuple[int, str, str]] = []  # (step, slug, reason)
    # Before the first read: a failed read's other reads report as the failure unwinds.
    _quiet_abandoned_reads()
    try:
      for step in steps:
        step_dir = self.directory / str(step)
        state, why = None, None
        try:
          _check_step_files(step_dir)
          state = local.restore(step_dir, args=_restore_args(abstract_state, data_iterator))['state']
        except Exception as e:  # any failure to read this step: try the older one
          why = e
        if _all_processes_agree(why is None):
          self._quarantine(failed)
          return state, step
        reason = _short(why) if why is not None else 'another process could not restore it'
        slug = _reason_slug(why) if why is not None else 'other-process'
        log.warning('checkpoint %s cannot be restored (%s); trying the previous one', step_dir, reason)
        failed.append((step, slug, reason))
    finally:
      local.close()
    tried = '; '.join(f'step {s}: {r}' for s, _, r in failed)
    raise errors.CheckpointError(
      f'no checkpoint in {self.directory} can be restored (tried {len(failed)}: {tried}). '
      'If the config changed since these were written, run with the original config or another --workdir.'
    )

  def _quarantine(self, failed: list[tuple[int, str, str]]) -> None:
    if not failed:
      return
    if jax.process_index() == 0:
      for step, slug, reason in failed:
        src = self.directory / str(step)
        dst, n = self.directory / f'{step}{DAMAGED}{slug}', 1
        while dst.exists():
          n += 1
          dst = self.directory / f'{step}{DAMAGED}{slug}-{n}'
        src.rename(dst)  # on object storage a copy and delete, as every rename there
        (dst / 'DAMAGED.txt').write_text(reason + '\n')
        log.warning('moved damaged checkpoint %s to %s (kept for inspection)', src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('cgrseg_quarantine_damaged_checkpoints')
    self.manager.reload()

  # ---- save

  def save(
    self, step: int, state: Any, data_iterator: Any, metrics: Optional[Mapping[str, float]] = None, force: bool = False
  ) -> bool:
    """Start an async save of (state, data iterator) at `step`.

    Raises CheckpointError if this save, or the previous one still being
    written, fails for lack of space or permission.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator))
    nbytes = state_nbytes(state)
    with self._disk_errors(step, nbytes):
      saved = self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=force)
    self._pending = (step, nbytes)
    self._empty_trash()
    return saved

  def wait(self) -> None:
    """Block until the pending save committed; CheckpointError if it failed for lack of space or permission."""
    step, nbytes = self._pending or (None, 0)
    with self._disk_errors(step, nbytes):
      self.manager.wait_until_finished()
    self._pending = None
    self._empty_trash()

  def close(self) -> None:
    self.manager.close()

  @contextlib.contextmanager
  def _disk_errors(self, step: Optional[int], nbytes: int):
    """An OSError with a disk errno (anywhere in the exception chain) -> CheckpointError.

    The failing save is the pending one if any (its background write failed),
    else the one being started."""
    try:
      yield
    except Exception as e:
      os_error = _find_disk_error(e)
      if os_error is None:
        raise
      failed_step, need = self._pending or (step, nbytes)
      raise self._disk_error(failed_step, need, os_error) from e

  def _disk_error(self, step: Optional[int], nbytes: int, os_error: OSError) -> errors.CheckpointError:
    try:
      free = f'{_size(shutil.disk_usage(os.fspath(self.directory)).free)} free there now'
    except (OSError, TypeError):
      free = 'free space unknown'
    self.manager.reload()
    good = self.manager.latest_step()
    previous = f'step {good} is intact and a rerun resumes from it' if good is not None else 'no earlier checkpoint'
    return errors.CheckpointError(
      f'saving the checkpoint of step {step} to {self.directory} failed: {os.strerror(os_error.errno)} '
      f'({os_error}). A checkpoint needs about {_size(nbytes)} ({free}); {previous}. '
      'Free space (or fix the permissions/quota) and rerun the same command.'
    )

  def _empty_trash(self) -> None:
    """Remove the steps retention moved to `.deleting/` (process 0; the rename already took them out of use)."""
    trash = self.directory / TRASH
    if jax.process_index() != 0 or not trash.is_dir():
      return
    for item in trash.iterdir():
      try:
        item.rmtree()
      except OSError:  # gone already, or still being moved in: the next call finishes it
        pass


def _find_disk_error(exc: BaseException) -> Optional[OSError]:
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return e
    for code in _DISK_ERRNOS:  # TensorStore reports the errno's text inside its own exception types
      if os.strerror(code) in str(e):
        return OSError(code, str(e))
  return None
