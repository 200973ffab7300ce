"""Transparent huge pages for XLA CPU's temporaries, through glibc's malloc.

XLA CPU allocates the temporaries of each run of a compiled program in one
block (6.4 GB for a CGRSeg-T train step at batch 8, 512x512) and frees it at the
end. glibc serves a block that large with a fresh `mmap`, so the kernel faults
in and zeroes every 4 KiB page again on each step: 1.7 million page faults and
1.2-1.4 s of kernel time per step on 2 cores. glibc's `glibc.malloc.hugetlb=1`
tunable makes malloc mark such blocks for transparent huge pages: the same
memory arrives in 2 MiB pages, about 10 thousand faults, and the step takes
2.5 s instead of 3.0.

Only glibc reads the tunable, and only when a process starts. So the training
entry point re-executes itself once with it (`reexec_with_huge_pages`) and the
benchmark starts its JAX worker with it (`with_huge_pages`). It matters where
the kernel's THP mode is `madvise` (the common default); with `always` pages
are huge anyway and with `never` they cannot be. A `glibc.malloc.hugetlb`
setting already in GLIBC_TUNABLES is kept, so `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The bracketed mode in the kernel's THP setting ('always', 'madvise', 'never')."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1 : end] if 0 <= start < end else None


def with_huge_pages(env: Mapping[str, str], thp_mode: str | None = None) -> dict[str, str]:
  """A copy of `env` whose GLIBC_TUNABLES asks malloc for huge pages, where that
  helps. `thp_mode`: the kernel's THP mode (default: read from /sys)."""
  env = dict(env)
  mode = _thp_mode() if thp_mode is None else thp_mode
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc' or mode != 'madvise':
    return env
  tunables = env.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return env
  env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  return env


def reexec_with_huge_pages() -> None:
  """Restart this process (same interpreter, arguments and PID) with
  `with_huge_pages(os.environ)`, unless that changes nothing. Call it first
  thing in an entry point, before any work that a restart would repeat."""
  env = with_huge_pages(os.environ)
  if env != dict(os.environ):
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
