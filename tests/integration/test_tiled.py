"""Tiled inference (cgrseg_jax/tiled.py): the labels of mmseg slide inference
(`Segmenter` in slide mode at the image's own scale) with one compiled window
shape for every image size, and a peak host memory that grows with the width
of the image, not its area (measured in fresh processes). The windows are the
question, not the model: the toy family (tests/toy_family.py), whose
convolutions see the window borders as a real model's do."""

import json
import os
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax.inference import InferenceError, Segmenter
from cgrseg_jax.models import build_model
from cgrseg_jax.tiled import TiledSegmenter
from paths import REPO, TESTS_DIR

K = 7
CROP, STRIDE = (64, 64), (48, 40)


def _image(hw, seed):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3)).astype(np.uint8)
  return cv2.resize(small, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope='module')
def segmenter(toy):
  model = build_model('toy_small', K)
  variables = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 3)))
  return Segmenter(model, variables, dataset='synthetic', crop_size=CROP, stride=STRIDE)


def test_tiled_equals_slide_inference_with_one_compiled_window_shape(segmenter):
  tiles = TiledSegmenter(segmenter, CROP, STRIDE, window_batch=4)
  for hw, seed in [((150, 230), 0), ((97, 64), 1), ((200, 180), 2)]:
    img = _image(hw, seed)
    # The image's own scale: mmseg's keep-ratio resize by a factor of 1.
    slide = Segmenter(
      segmenter.model, segmenter.variables, dataset='synthetic', img_scale=(max(hw), min(hw)), mode='slide',
      crop_size=CROP, stride=STRIDE,
    ).predict(img)  # fmt: skip
    got = tiles.predict(img)
    assert got.shape == hw and len(np.unique(slide)) > 1
    # Windows batched by 4 here, all at once there: XLA may round a near-tie the other way.
    assert np.mean(got == slide) >= 0.999, (hw, np.mean(got == slide))
    bands = list(tiles.bands(img))
    assert [y for y, _ in bands] == sorted(y for y, _ in bands) and sum(len(b) for _, b in bands) == hw[0]
    assert len(bands) > 1  # labels handed out band by band, not at the end
  assert [k for k in tiles.traces if k[0] == 'tiled'] == [('tiled', 4, *CROP, 3)]
  with pytest.raises(InferenceError, match='smaller than the window'):
    tiles.predict(_image((20, 200), 3))  # padded to 32 rows
  with pytest.raises(InferenceError, match='expected 0 < stride <= crop'):
    TiledSegmenter(segmenter, CROP, (80, 40))


MEASURE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from cgrseg_jax.inference import Segmenter
from cgrseg_jax.models import build_model, registry
from cgrseg_jax.tiled import TiledSegmenter
import toy_family

def status(key):
  for line in open('/proc/self/status'):
    if line.startswith(key):
      return int(line.split()[1]) * 1024

side = int(sys.argv[1])
registry.register(toy_family.FAMILY)  # the band's memory is the question, not the model
model = build_model('toy_small', 19)
variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
tiles = TiledSegmenter(Segmenter(model, variables, dataset='cityscapes'), (128, 128), (96, 96), window_batch=4)
tiles.predict(np.zeros((128, 128, 3), np.uint8))  # compiles the one window shape
image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = status('VmRSS')
out = np.zeros((side, side), np.uint8)
for y0, rows in tiles.bands(image):
  out[y0 : y0 + len(rows)] = rows
print(json.dumps({'side': side, 'peak_increase': status('VmHWM') - base}))
"""


def test_peak_host_memory_does_not_grow_with_the_image_area():
  peaks = {}
  for side in (768, 1536):  # 4x the pixels
    run = subprocess.run(
      [sys.executable, '-c', MEASURE, str(side)],
      capture_output=True,
      text=True,
      timeout=600,
      # A fixed mmap threshold: glibc's moving one keeps freed large blocks in the heap, and the peak
      # RSS would then depend on fragmentation instead of on what is alive.
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR]), MALLOC_MMAP_THRESHOLD_='1048576'),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    peaks[side] = json.loads(run.stdout.strip().splitlines()[-1])['peak_increase']
  # Slide inference would hold (H, W, 19) float32 logits: 45 MB, then 180 MB.
  full_logits = {s: s * s * 19 * 4 for s in peaks}
  # The band grows with the width (2x); the area grew 4x.
  assert peaks[1536] < 2 * peaks[768], peaks
  assert peaks[1536] < full_logits[1536] / 3, (peaks, full_logits)
