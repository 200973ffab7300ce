"""Huge pages for XLA CPU's temporaries (cgrseg_jax/host_memory.py)."""

import os
import platform
import subprocess
import sys

import pytest

from cgrseg_jax import host_memory

LINUX_GLIBC = sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'
needs_madvise = pytest.mark.skipif(
  not LINUX_GLIBC or host_memory._thp_mode() != 'madvise', reason='needs glibc and the kernel THP mode madvise'
)

# malloc, touch and free 256 MiB four times; print the page faults it took.
FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  p = libc.malloc(256 << 20)
  ctypes.memset(p, 1, 256 << 20)
  libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _clean_env():
  return {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory._thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert host_memory._thp_mode(str(path)) == 'always'
  assert host_memory._thp_mode(str(tmp_path / 'missing')) is None


@pytest.mark.skipif(not LINUX_GLIBC, reason='glibc only')
def test_tunable_is_added_only_where_it_helps_and_never_overrides():
  env = host_memory.with_huge_pages({'A': '1'}, thp_mode='madvise')
  assert env == {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = host_memory.with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, thp_mode='madvise')
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  mine = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert host_memory.with_huge_pages(mine, thp_mode='madvise') == mine
  for mode in ('always', 'never', ''):  # '': no THP setting to read
    assert host_memory.with_huge_pages({'A': '1'}, thp_mode=mode) == {'A': '1'}


@needs_madvise
def test_the_tunable_cuts_page_faults_of_large_mallocs():
  """The mechanism itself: 4 x 256 MiB through malloc take 4 KiB faults
  without the tunable (~262k) and 2 MiB ones with it (a few thousand)."""
  run = lambda env: int(subprocess.run([sys.executable, '-c', FAULTS], env=env, capture_output=True, text=True).stdout)
  plain = run(_clean_env())
  huge = run(host_memory.with_huge_pages(_clean_env()))
  assert plain > 4 * (256 << 20) // 4096 * 0.9
  assert huge * 20 < plain


@needs_madvise
def test_reexec_restarts_once_with_the_tunable(tmp_path):
  script = tmp_path / 'entry.py'
  script.write_text(
    'import os, sys\n'
    'print("start", flush=True)\n'
    'from cgrseg_jax import host_memory\n'
    'host_memory.reexec_with_huge_pages()\n'
    'print(os.environ["GLIBC_TUNABLES"], sys.argv[1:])\n'
  )
  out = subprocess.run(
    [sys.executable, str(script), '--flag=1'], env=_clean_env(), capture_output=True, text=True, check=True
  ).stdout.split('\n')
  assert out[:3] == ['start', 'start', "glibc.malloc.hugetlb=1 ['--flag=1']"]
