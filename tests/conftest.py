"""Shared pytest setup. Helper modules of this directory (``train_config``,
``flax_torch``, ...) and ``configs`` are importable through pytest's
``pythonpath`` setting (pyproject.toml)."""

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SHARED_DIR = REPO_ROOT.parent / 'shared'


@pytest.fixture(scope='session')
def shared_dir() -> Path:
  """``<repo root>/../shared`` (fixtures, spec); skips the test if absent."""
  if not SHARED_DIR.is_dir():
    pytest.skip(f'shared directory not found at {SHARED_DIR}')
  return SHARED_DIR
