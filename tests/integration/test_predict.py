"""scripts/predict.py end to end: folder + glob + file inputs, PNG outputs,
unreadable files named and skipped with a non-zero exit status."""

import json
import os
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax.data import datasets

from paths import SCRIPTS
import script_modules

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
      '--confidence',
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
    # --confidence: the maps at the image size, the means within their ranges.
    for name in ('confidence', 'entropy'):
      assert cv2.imread(str(out / f'{stem}_{name}.png')).shape == (*hw, 3)
    conf = entry['confidence']
    assert set(conf['per_class']) == {c['name'] for c in entry['classes']}
    assert all(1 / K <= v <= 1 for v in conf['per_class'].values())
    assert 1 / K <= conf['mean_max_prob'] <= 1 and 0 <= conf['mean_entropy'] <= np.log(K)


def test_no_inputs_is_an_error(setup, tmp_path):
  proc = subprocess.run(
    [sys.executable, SCRIPT, f'--checkpoint={setup}/tiny.pth', f'--output={tmp_path}', str(tmp_path / 'nothing_*.jpg')],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1 and 'nothing_*.jpg' in proc.stderr


predict = script_modules.load('predict')


def _clip(path, n, hw):
  """An MPEG-4 clip of `n` frames of a moving pattern (PyAV, as a user's video)."""
  container = av.open(str(path), mode='w')
  stream = container.add_stream('mpeg4', rate=25)
  stream.height, stream.width = hw
  stream.pix_fmt = 'yuv420p'
  base = cv2.resize(np.random.default_rng(5).integers(0, 256, (8, 12, 3), dtype=np.uint8), (hw[1] * 2, hw[0]))
  for i in range(n):
    rgb = np.ascontiguousarray(base[:, i % hw[1] : i % hw[1] + hw[1]])
    for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format='rgb24')):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


def test_stream_a_video_compiles_once(setup, tmp_path):
  clip = tmp_path / 'clip.mp4'
  _clip(clip, 100, (64, 96))
  out = tmp_path / 'out'
  args = [f'--checkpoint={setup}/tiny.pth', f'--output={out}', '--dataset=cityscapes', '--img-scale=128,64']
  assert predict.main([*args, '--stream', str(clip)]) == 0
  record = json.load(open(out / 'stream.json'))
  assert record['frames'] == 100 and record['frame_hw'] == [64, 96] and record['frames_per_s'] > 0
  # One forward and one label compilation for the whole clip (Segmenter's trace counter).
  assert record['compilations'] == 2, record
  frames = json.load(open(out / 'clip_frames.json'))
  assert len(frames) == 100 and all(abs(sum(c['fraction'] for c in f) - 1) < 1e-4 for f in frames)
  with av.open(str(out / 'clip_overlay.mp4')) as video:
    decoded = [f.to_ndarray(format='rgb24') for f in video.decode(video=0)]
  assert len(decoded) == 100 and decoded[0].shape == (64, 96, 3)


def test_stream_a_folder_and_tiled_images(setup, tmp_path):
  out = tmp_path / 'out'
  args = [f'--checkpoint={setup}/tiny.pth', f'--output={out}', '--dataset=cityscapes', '--img-scale=128,64']
  # The folder: its images (one of another size, resized to the first's), then idle for 0.5 s.
  assert predict.main([*args, '--stream', '--stream-idle=0.5', str(setup / 'imgs')]) == 0
  record = json.load(open(out / 'stream.json'))
  assert record['frames'] == 2 and record['compilations'] == 2  # a.png (70x90) and b.jpg (64x130); broken.png named
  for stem, hw in (('a', (70, 90)), ('b', (64, 130))):
    assert cv2.imread(str(out / f'{stem}_color.png')).shape == (*hw, 3)
  # --tiled: the slide windows at the image's own size, band by band; the labels of slide inference.
  tiled = tmp_path / 'tiled'
  crop = ['--crop=64,64', '--stride=48,48']
  assert (
    predict.main([*args, f'--output={tiled}', '--tiled', *crop, '--raw', '--no-progress', str(setup / 'more')]) == 0
  )
  got = cv2.imread(str(tiled / 'c_labels.png'), cv2.IMREAD_UNCHANGED)
  seg = predict.Segmenter.from_checkpoint(
    f'{setup}/tiny.pth', dataset='cityscapes', img_scale=(90, 64), mode='slide', crop_size=(64, 64), stride=(48, 48)
  )
  want = seg.predict(cv2.imread(str(setup / 'more' / 'c.png'))[..., ::-1].copy())
  assert got.shape == (90, 64) and np.mean(got == want) >= 0.999
