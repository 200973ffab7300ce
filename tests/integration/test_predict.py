"""scripts/predict.py end to end: folder + glob + file inputs, PNG outputs,
unreadable files named and skipped with a non-zero exit status."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.data import datasets

from paths import SCRIPTS

SCRIPT = os.path.join(SCRIPTS, 'predict.py')
K = 19  # cityscapes classes and palette


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp('predict')
  model = ref.randomize_(ref.build_torch_segmentor('tiny', K), seed=1)
  torch.save({'meta': {}, 'state_dict': model.state_dict()}, d / 'tiny.pth')
  rng = np.random.default_rng(0)
  (d / 'imgs').mkdir()
  (d / 'more').mkdir()
  for name, hw in [('imgs/a.png', (70, 90)), ('imgs/b.jpg', (64, 130)), ('more/c.png', (90, 64))]:
    small = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    cv2.imwrite(str(d / name), cv2.resize(small, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC))
  (d / 'imgs' / 'broken.png').write_bytes(b'not a png')
  return d


def test_predict_cli(setup):
  d = setup
  out = d / 'out'
  proc = subprocess.run(
    [
      sys.executable,
      SCRIPT,
      f'--checkpoint={d}/tiny.pth',
      f'--output={out}',
      '--dataset=cityscapes',
      '--img-scale=128,64',
      '--opacity=0.25',
      '--raw',
      '--no-progress',
      str(d / 'imgs'),
      str(d / 'more' / '*.png'),
      str(d / 'missing.png'),
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  # Two failures (the corrupt file and the missing one), both named; the rest done.
  assert proc.returncode == 1, proc.stderr
  assert 'broken.png' in proc.stderr and 'missing.png' in proc.stderr
  palette = datasets.get('cityscapes').palette
  summary = json.load(open(out / 'predictions.json'))['images']
  assert len(summary) == 3
  for stem, hw in [('a', (70, 90)), ('b', (64, 130)), ('c', (90, 64))]:
    image = cv2.imread(
      str(
        next(
          (d / sub / f'{stem}{ext}')
          for sub in ('imgs', 'more')
          for ext in ('.png', '.jpg')
          if (d / sub / f'{stem}{ext}').exists()
        )
      )
    )[..., ::-1]
    labels = cv2.imread(str(out / f'{stem}_labels.png'), cv2.IMREAD_UNCHANGED)
    color = cv2.imread(str(out / f'{stem}_color.png'))[..., ::-1]
    overlay = cv2.imread(str(out / f'{stem}_overlay.png'))[..., ::-1]
    assert labels.shape == hw and labels.dtype == np.uint8 and labels.max() < K
    np.testing.assert_array_equal(color, palette[labels])
    want = np.floor(0.75 * image.astype(np.float64) + 0.25 * palette[labels] + 0.5)
    assert np.abs(overlay - want).max() <= 1
    assert os.path.exists(out / f'{stem}_legend.png')
    entry = next(v for k, v in summary.items() if v['output'] == stem)
    ids = sorted(c['id'] for c in entry['classes'])
    assert ids == sorted(np.unique(labels).tolist())
    assert abs(sum(c['fraction'] for c in entry['classes']) - 1) < 1e-4


def test_no_inputs_is_an_error(setup, tmp_path):
  proc = subprocess.run(
    [sys.executable, SCRIPT, f'--checkpoint={setup}/tiny.pth', f'--output={tmp_path}', str(tmp_path / 'nothing_*.jpg')],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1 and 'nothing_*.jpg' in proc.stderr
