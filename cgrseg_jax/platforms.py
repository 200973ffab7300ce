"""The platform a computation is built for, which decides the backend-specific
forms (depthwise convolution, banded loss, the normalisation lookup).

It is the target's platform, not the host's: an AOT compile for a TPU topology
from a CPU host, or a `jax.export` lowering for CUDA, gets the accelerator forms.
"""

from __future__ import annotations

from typing import Optional

import jax


def target_platform(platform: Optional[str] = None) -> str:
  """`platform` when given (the mesh's devices, e.g. 'tpu' for an AOT compile
  from a CPU host), else this process's devices, where it will then run."""
  return platform if platform is not None else jax.devices()[0].platform


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
  """The platform of `mesh`'s devices (abstract TPU devices included)."""
  return mesh.devices.flat[0].platform
