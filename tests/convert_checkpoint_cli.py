"""Imports scripts/convert_checkpoint.py as a module for the tests."""

import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'convert_checkpoint.py')
_spec = importlib.util.spec_from_file_location('convert_checkpoint', _path)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
main = _module.main
