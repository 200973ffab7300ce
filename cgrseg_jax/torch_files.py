"""PyTorch `.pth` files: the state dict inside any upstream layout, and mmseg's layout on writing.

The loader (`cgrseg_jax/loader.py`) reads every `.pth` through here, and
`convert.load_torch_checkpoint` / `convert.save_torch_checkpoint` use it for
the same files. Needs PyTorch (the `torch` extra).
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Optional

import numpy as np

from cgrseg_jax import errors, storage


def read_state_dict(path: str) -> dict:
  """The state dict inside a `.pth` file: under `state_dict`, `model`, or bare;
  a DataParallel `module.` prefix is dropped."""
  import torch  # the `torch` extra: only .pth files need PyTorch

  try:
    source = path if storage.is_local(path) else io.BytesIO(storage.path(path).read_bytes())  # gs:// and the like
    ckpt = torch.load(source, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # a pickle with arbitrary objects, or not a checkpoint at all
    raise errors.ConversionError(f'{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})') from None
  if not isinstance(ckpt, Mapping):
    raise errors.ConversionError(f'{path}: expected a dict, got {type(ckpt).__name__}')
  for key in ('state_dict', 'model'):
    if key in ckpt and isinstance(ckpt[key], Mapping):
      ckpt = ckpt[key]
      break
  state = {k[len('module.') :] if k.startswith('module.') else k: v for k, v in ckpt.items()}
  bad = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if bad:
    raise errors.ConversionError(f'{path}: entries {bad[:5]} are not tensors; expected a state dict')
  return state


def write_mmseg_checkpoint(path: str, state: Mapping[str, Any], meta: Optional[dict] = None):
  """Write numpy arrays as an mmseg checkpoint `{'meta': meta, 'state_dict': tensors}`."""
  import torch  # the `torch` extra: only .pth files need PyTorch

  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  checkpoint = {'meta': dict(meta or {}), 'state_dict': tensors}
  if storage.is_local(path):
    torch.save(checkpoint, path)
  else:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    storage.path(path).write_bytes(buffer.getvalue())
