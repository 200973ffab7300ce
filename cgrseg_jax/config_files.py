"""Load a config file (`configs/<name>.py`, whose `get_config()` builds an
`ml_collections.ConfigDict`) by path, as `main.py --config=...` does.

Config files import their siblings as a package (`from configs import default`),
so the file's directory is registered as that package first; nothing is added
to the module search path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from cgrseg_jax import errors


def register_package(path: str) -> None:
  """Register the directory of the config file at `path` as the package its siblings are imported from."""
  directory = os.path.dirname(os.path.abspath(path))
  package = os.path.basename(directory)
  if package not in sys.modules and os.path.exists(os.path.join(directory, '__init__.py')):
    spec = importlib.util.spec_from_file_location(
      package, os.path.join(directory, '__init__.py'), submodule_search_locations=[directory]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)


def load(path: str):
  """`get_config()` of the config file at `path`; `file.py:arg` calls `get_config('arg')`,
  as `main.py --config=file.py:arg` (ml_collections' config flags) does."""
  arg = None
  stem_path, sep, tail = path.rpartition(':')
  if sep and stem_path.endswith('.py'):
    path, arg = stem_path, tail
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise errors.ConfigError(f'{path}: no such config file')
  register_package(path)
  package = os.path.basename(os.path.dirname(path))
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'{package}.{stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
