"""Label files read as mmseg reads them (Pillow 'unchanged'): palette PNGs give
their indices, grey PNGs their values, 1-bit PNGs 0/1, 16-bit PNGs their
values; files are written by a PNG writer made from the specification."""

import numpy as np
import pytest

from cgrseg_jax import errors
from cgrseg_jax.data import sources
from png_files import write_png

# A VOC-like palette: index i has a colour unrelated to i.
PALETTE = np.random.default_rng(0).integers(0, 256, size=(256, 3)).astype(np.uint8)


def _ids(shape=(7, 13), high=21, seed=1):
  ids = np.random.default_rng(seed).integers(0, high, size=shape)
  ids[0, :3] = 255  # the ignore value, as VOC stores its borders
  return ids


@pytest.mark.parametrize('sub_filter', [False, True])
def test_palette_png_gives_its_indices(tmp_path, sub_filter):
  ids = _ids()
  path = str(tmp_path / 'p.png')
  write_png(path, ids, palette=PALETTE, sub_filter=sub_filter)
  label = sources.read_label(path)
  assert label.dtype == np.uint8 and label.shape == ids.shape
  np.testing.assert_array_equal(label, ids)


def test_palette_png_with_short_palette_and_transparency(tmp_path):
  # 4-bit palette with 12 entries and a tRNS chunk (alpha per entry).
  ids = np.random.default_rng(2).integers(0, 12, size=(5, 9))
  path = str(tmp_path / 'p4.png')
  write_png(path, ids, palette=PALETTE[:12], bit_depth=4, transparency=bytes(range(0, 240, 20)))
  np.testing.assert_array_equal(sources.read_label(path), ids)


def test_grey_and_one_bit_pngs(tmp_path):
  ids = _ids(high=150)
  write_png(str(tmp_path / 'g.png'), ids)
  np.testing.assert_array_equal(sources.read_label(str(tmp_path / 'g.png')), ids)
  mask = np.random.default_rng(3).integers(0, 2, size=(6, 11))
  write_png(str(tmp_path / 'b.png'), mask, bit_depth=1)
  np.testing.assert_array_equal(sources.read_label(str(tmp_path / 'b.png')), mask)


def test_16_bit_png_read_as_is_and_out_of_range_named(tmp_path):
  ids = _ids(high=40)
  write_png(str(tmp_path / 'w.png'), ids, bit_depth=16)
  np.testing.assert_array_equal(sources.read_label(str(tmp_path / 'w.png')), ids)
  ids[2, 2] = 300
  write_png(str(tmp_path / 'big.png'), ids, bit_depth=16)
  with pytest.raises(errors.DataError, match=r'big.png: uint16 label has ids up to 300'):
    sources.read_label(str(tmp_path / 'big.png'))


def test_palette_index_beyond_classes_is_named(tmp_path):
  (tmp_path / 'img').mkdir()
  (tmp_path / 'ann').mkdir()
  import cv2

  cv2.imwrite(str(tmp_path / 'img' / 'a.png'), np.zeros((7, 13, 3), np.uint8))
  ids = _ids(high=4)
  ids[3, 3] = 9
  write_png(str(tmp_path / 'ann' / 'a.png'), ids, palette=PALETTE[:16])
  src, _ = sources.custom_source(str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=4, img_suffix='.png')
  with pytest.raises(errors.DataError, match=r'ann/a.png: label ids \[9\] are outside'):
    src[0]


def test_camvid_void_becomes_ignore(tmp_path):
  import cv2

  for split in ('train', 'trainannot'):
    (tmp_path / split).mkdir()
  cv2.imwrite(str(tmp_path / 'train' / '0001TP_006690.png'), np.zeros((6, 8, 3), np.uint8))
  raw = np.arange(48).reshape(6, 8) % 12  # 0..10 classes, 11 void
  write_png(str(tmp_path / 'trainannot' / '0001TP_006690.png'), raw)
  src, info = sources.make_source('camvid', str(tmp_path), 'train')
  assert info.num_classes == 11 and info.class_names[0] == 'sky' and info.ignore_index == 255
  label = src[0]['label']
  np.testing.assert_array_equal(label, np.where(raw == 11, 255, raw))
