"""One path type for everything a run reads or writes: local paths and `gs://` alike.

Paths are etils `epath.Path`s (what orbax and grain use): a local path keeps
working as before, a `gs://bucket/...` path goes through gcsfs (with
`STORAGE_EMULATOR_HOST` it talks to an emulator). The project's own reads and
writes go through here; orbax/tensorstore and array_record handle `gs://`
themselves.

Object stores have no append and no directory rename, so:
- `AppendFile` keeps appending to local files and, on object storage,
  rewrites the whole (small) object at each flush (`metrics.jsonl`, TensorBoard
  event files);
- `check_writable` proves a directory takes a write before any compile.
"""

from __future__ import annotations

import io
import os
from typing import Union

from etils import epath

from cgrseg_jax import errors

PathLike = Union[str, os.PathLike]


def is_local(p: PathLike) -> bool:
  """False for `scheme://...` paths (gs://, s3://, ...)."""
  return '://' not in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; local paths made absolute (orbax wants absolute paths)."""
  if isinstance(p, epath.Path) and not is_local(p):
    return p
  text = os.fspath(p)
  return epath.Path(text if not is_local(text) else os.path.abspath(text))


def check_writable(directory: PathLike, what: str = 'workdir') -> epath.Path:
  """Create `directory`, write and delete one small file there; StorageError in one line if it fails."""
  d = path(directory)
  probe = d / f'.write_check-{os.getpid()}'
  try:
    d.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok\n')
    probe.unlink()
  except Exception as e:  # any backend's error: permission, missing bucket, no credentials, read-only mount
    raise errors.StorageError(f'{what} {os.fspath(directory)} cannot be written: {_one_line(e)}') from None
  return d


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = ' '.join(f'{type(e).__name__}: {e}'.split())
  return text if len(text) <= limit else text[: limit - 3] + '...'


class AppendFile:
  """A file opened for appending (bytes). Local: a real append-mode file.
  Object storage: earlier content is read once, new bytes are kept in memory
  and the whole object is rewritten at each `flush` (GCS objects cannot grow)."""

  def __init__(self, p: PathLike):
    self.path = path(p)
    self._local = None
    if is_local(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._local = open(os.fspath(self.path), 'ab')
    else:
      self._buffer = io.BytesIO()
      if self.path.exists():
        self._buffer.write(self.path.read_bytes())
      self._dirty = False

  def write(self, data: bytes) -> int:
    if self._local is not None:
      return self._local.write(data)
    self._dirty = True
    return self._buffer.write(data)

  def flush(self) -> None:
    if self._local is not None:
      self._local.flush()
    elif self._dirty:
      self.path.write_bytes(self._buffer.getvalue())
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if self._local is not None:
      self._local.close()


def read_bytes(p: PathLike) -> bytes:
  """The bytes of a file (local: plain `open`, the hot path of folder datasets)."""
  if is_local(p):
    with open(p, 'rb') as f:
      return f.read()
  return path(p).read_bytes()


def read_head(p: PathLike, n: int) -> bytes:
  """The first `n` bytes of a file (a ranged read on object storage)."""
  with open(p, 'rb') if is_local(p) else path(p).open('rb') as f:
    return f.read(n)


def files_under(directory: PathLike, suffix: str) -> list[str]:
  """Files under `directory` (recursively) whose names end with `suffix`, as
  '/'-separated paths relative to it, sorted (mmcv `scandir` order)."""
  found = []
  if is_local(directory):
    for dirpath, _, filenames in os.walk(directory):
      rel = os.path.relpath(dirpath, directory)
      found += [fn if rel == '.' else f'{rel}/{fn}' for fn in filenames if fn.endswith(suffix)]
  else:  # one listing per folder (epath refuses `**` globs on GCS)
    for rel, filenames in _walk_remote(directory):
      found += [f'{rel}/{fn}' if rel else fn for fn in filenames if fn.endswith(suffix)]
  return sorted(found)


def _walk_remote(directory: PathLike):
  """(folder relative to `directory`, file names) for every folder under it."""
  top = path(directory)
  base = os.fspath(top).split('://', 1)[-1].rstrip('/')
  for root, _, filenames in top.walk():
    here = os.fspath(root).split('://', 1)[-1].rstrip('/')  # the backend may drop the scheme
    yield here[len(base) :].lstrip('/'), filenames


def walk_files(directory: PathLike) -> list[str]:
  """Every file under `directory`, as full paths (local or with their scheme), sorted."""
  top = os.fspath(path(directory)).rstrip('/')
  if is_local(top):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(top) for f in fs)
  return sorted(f'{top}/{rel}/{fn}' if rel else f'{top}/{fn}' for rel, fns in _walk_remote(top) for fn in fns)
