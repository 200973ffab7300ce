"""A minimal PNG writer for tests (palette, grey, 16-bit, low bit depths),
written from the PNG specification so label files in the formats other tools
produce can be made without Pillow; not a test file."""

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, payload: bytes) -> bytes:
  return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))


def _pack_rows(values: np.ndarray, bit_depth: int) -> list[bytes]:
  if bit_depth == 16:
    return [row.astype('>u2').tobytes() for row in values]
  if bit_depth == 8:
    return [row.astype(np.uint8).tobytes() for row in values]
  per_byte = 8 // bit_depth
  rows = []
  for row in values:
    padded = np.zeros(-(-len(row) // per_byte) * per_byte, np.uint8)
    padded[: len(row)] = row
    groups = padded.reshape(-1, per_byte)
    shifts = bit_depth * np.arange(per_byte - 1, -1, -1)
    rows.append((groups.astype(np.uint16) << shifts).sum(1).astype(np.uint8).tobytes())
  return rows


def write_png(
  path: str,
  values: np.ndarray,
  *,
  palette=None,
  bit_depth: int = 8,
  transparency: bytes | None = None,
  sub_filter: bool = False,
) -> None:
  """values: (H, W) ints. With ``palette`` ((N, 3) RGB) a colour-type-3 PNG
  whose pixels are palette indices, otherwise grey (colour type 0).
  ``sub_filter`` writes every row with PNG filter 1 (Sub) instead of 0."""
  values = np.asarray(values)
  h, w = values.shape
  colour_type = 3 if palette is not None else 0
  raw = b''
  for row in _pack_rows(values, bit_depth):
    if sub_filter:
      bpp = max(1, bit_depth // 8)
      data = np.frombuffer(row, np.uint8).astype(np.int32)
      prev = np.concatenate([np.zeros(bpp, np.int32), data[:-bpp]])
      raw += b'\x01' + ((data - prev) % 256).astype(np.uint8).tobytes()
    else:
      raw += b'\x00' + row
  out = b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, bit_depth, colour_type, 0, 0, 0))
  if palette is not None:
    out += _chunk(b'PLTE', np.asarray(palette, np.uint8).tobytes())
    if transparency is not None:
      out += _chunk(b'tRNS', transparency)
  out += _chunk(b'IDAT', zlib.compress(raw)) + _chunk(b'IEND', b'')
  with open(path, 'wb') as f:
    f.write(out)
