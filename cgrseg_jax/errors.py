"""Errors a user can act on (bad data, config, checkpoint, conversion).

`main.py` prints their message and exits non-zero without a traceback; any
other exception is a bug and keeps its traceback. Each class also derives from
the builtin it used to be, so `except ValueError` callers keep working.
"""


class UserError(Exception):
  """Base class: the message says what was wrong (file, key or value) and what was expected."""


class ConfigError(UserError, ValueError):
  """A config field has a value the run cannot use."""


class DataError(UserError, ValueError):
  """A dataset file or directory is missing, unreadable or inconsistent."""


class ConversionError(UserError, ValueError):
  """A checkpoint does not fit the model; the message names the key(s)."""


class CheckpointError(UserError, RuntimeError):
  """A run checkpoint cannot be saved or restored."""


class StorageError(UserError, OSError):
  """A path (local or gs://) cannot be read or written."""
