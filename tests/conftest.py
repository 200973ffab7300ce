"""Shared pytest setup. Helper modules of this directory (``train_config``,
``flax_torch``, ...) and ``configs`` are importable through pytest's
``pythonpath`` setting (pyproject.toml).

One JAX persistent compilation cache serves the whole session: the pytest
workers and every process a test starts (main.py runs, multi-process
workers) inherit its directory through the environment, so a program that
several tests or processes compile (the tiny model's train and eval steps) is
compiled once. The cache holds only compiled executables keyed by their
program; it changes no result.
"""

import os
import shutil
import tempfile
from pathlib import Path

# The tests run on the CPU. With libtpu installed (the tpu extra, for the AOT tests) JAX would
# otherwise try a TPU first; subprocesses inherit this.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402
import toy_family  # noqa: E402
from cgrseg_jax.models import registry  # noqa: E402
from train_config import TOY  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SHARED_DIR = REPO_ROOT.parent / 'shared'
_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def pytest_configure(config):
  # In the controller, before the xdist workers start (they inherit the environment).
  if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='cgrseg_jax_test_cache_')
    os.environ['CGRSEG_TEST_CACHE_OWNER'] = str(os.getpid())
  # Programs that compile in under a second are not worth a disk round trip.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')


def pytest_unconfigure(config):
  if os.environ.get('CGRSEG_TEST_CACHE_OWNER') == str(os.getpid()):
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope='session')
def shared_dir() -> Path:
  """``<repo root>/../shared`` (fixtures, spec); skips the test if absent."""
  if not SHARED_DIR.is_dir():
    pytest.skip(f'shared directory not found at {SHARED_DIR}')
  return SHARED_DIR


@pytest.fixture(scope='module')
def toy():
  """The toy family (tests/toy_family.py) registered for a module's tests; its config values."""
  registry.register(toy_family.FAMILY, replace=True)
  yield TOY
  registry.unregister('toy')
