"""scripts/plot_metrics.py and scripts/browse_dataset.py: the curves read what
metrics.jsonl holds (a resumed run's repeated steps once), bad input is one
line; the browser's grid shows the configured pipeline's own samples with the
overlay formula and the ignore pixels hatched."""

import json

import cv2
import numpy as np
import pytest

from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data import datasets
import script_modules
from train_config import tiny_config

plot_metrics = script_modules.load('plot_metrics')
browse_dataset = script_modules.load('browse_dataset')


def _write_run(d, records):
  d.mkdir()
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_plot_metrics_overlays_runs_and_keeps_a_resumed_step_once(tmp_path, capsys):
  a = [{'step': s, 'split': 'train', 'loss': 2.0 / s, 'lr': 1e-3 * (1 - s / 10)} for s in range(1, 7)]
  a += [{'step': 4, 'split': 'train', 'loss': 0.25, 'lr': 5e-4}]  # resumed from step 3: step 4 again
  a += [{'step': 5, 'split': 'val', 'mIoU': 0.3, 'mAcc': 0.4, 'per_class': {}}]
  _write_run(tmp_path / 'a', a)
  _write_run(tmp_path / 'b', [{'step': s, 'split': 'train', 'loss': 1.0, 'lr': 1e-3} for s in (2, 4)])
  steps, loss = plot_metrics.series(plot_metrics.read_run(str(tmp_path / 'a')), 'train', 'loss')
  assert steps == [1, 2, 3, 4, 5, 6] and loss[3] == 0.25 and loss[4] == pytest.approx(0.4)
  out = tmp_path / 'plots'
  assert plot_metrics.main([str(tmp_path / 'a'), str(tmp_path / 'b' / 'metrics.jsonl'), f'--out={out}']) == 0
  for name in ('loss.png', 'lr.png', 'val.png'):
    png = cv2.imread(str(out / name))
    assert png.shape == (420, 700, 3) and png.std() > 10, name
  # Nothing to draw (no evaluation in b): no val.png, not an empty one.
  assert plot_metrics.main([str(tmp_path / 'b'), f'--out={tmp_path / "only_b"}']) == 0
  assert sorted(p.name for p in (tmp_path / 'only_b').iterdir()) == ['loss.png', 'lr.png']
  capsys.readouterr()
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'metrics.jsonl').write_text('{"step": 1, "split": "train"}\nnot json\n')
  assert plot_metrics.main([str(tmp_path / 'bad')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'metrics.jsonl:2: not a JSON line' in err[0]
  assert plot_metrics.main([str(tmp_path / 'missing')]) == 1
  assert 'missing/metrics.jsonl: no such file' in capsys.readouterr().err


def test_overlay_blends_the_palette_and_hatches_ignore_pixels():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  label = rng.integers(0, 3, (16, 16))
  label[:4] = 255
  palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
  got = browse_dataset.overlay(image, label, palette, 255, 0.5)
  want = (image[4:] * 0.5 + palette[label[4:]] * 0.5 + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(got[4:], want)
  hatched = got[:4][((np.arange(4)[:, None] + np.arange(16)[None, :]) % 8) < 2]
  assert (hatched == browse_dataset.HATCH_RGB).all()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_browse_shows_the_pipelines_first_samples(split):
  config = tiny_config()
  info = datasets.synthetic_info(config.model.num_classes)
  grid = browse_dataset.browse(config, 3, split, 0.5, tile_height=64)
  if split == 'train':  # 64x64 crops: 2 columns, 2 rows, one empty (white)
    batch = next(input_pipeline.train_iterator(input_pipeline.with_dataset_defaults(config)))
    assert grid.shape == (2 * (20 + 64), 2 * 64, 3)
    first = browse_dataset.overlay(batch['image'][0][..., ::-1], batch['label'][0], info.palette, 255, 0.5)
    np.testing.assert_array_equal(grid[20:84, :64], first)
    assert (grid[84:, 64:] == 255).all()
  else:  # the test scale of the 64x80 images: 80 wide, resized to 64 rows: 80 columns per tile
    assert grid.shape == (2 * (20 + 64), 2 * 80, 3)
