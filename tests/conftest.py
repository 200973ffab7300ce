"""Shared pytest setup: tests import helper modules (e.g. ``torch_reference``)
directly from this directory, without a ``tests/__init__.py``."""

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
  sys.path.insert(0, str(TESTS_DIR))

REPO_ROOT = TESTS_DIR.parent
SHARED_DIR = REPO_ROOT.parent / 'shared'


@pytest.fixture(scope='session')
def shared_dir() -> Path:
  """``<repo root>/../shared`` (fixtures, spec); skips the test if absent."""
  if not SHARED_DIR.is_dir():
    pytest.skip(f'shared directory not found at {SHARED_DIR}')
  return SHARED_DIR
