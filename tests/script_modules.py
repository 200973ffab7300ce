"""Import a script of scripts/ as a module (tests call its `main(argv)` in this
process, e.g. with a model family registered by the test); not a test file."""

import importlib.util
import os

from paths import SCRIPTS


def load(name: str):
  spec = importlib.util.spec_from_file_location(f'scripts_{name}', os.path.join(SCRIPTS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
