"""A model family registered from tests/ (tests/toy_family.py) goes through every
path of the package with no package change: train (main.py's code path), resume,
evaluate (--mode=eval), convert to and from PyTorch, predict with Segmenter, export."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import script_modules
import toy_family
from cgrseg_jax import convert, evaluation, loader, train
from cgrseg_jax.inference import Segmenter
from cgrseg_jax.models import build_model, registry
from train_config import tiny_config

K = 5  # the synthetic config's classes


@pytest.fixture(scope='module')
def toy():
  registry.register(toy_family.FAMILY)
  yield toy_family
  registry.unregister('toy')


@pytest.fixture(scope='module')
def run(toy, tmp_path_factory):
  """Two steps, then resumed to four in the same workdir."""
  workdir = str(tmp_path_factory.mktemp('toy_run'))
  # backbone_bn: a CGRSeg option the synthetic config sets; the toy family has none
  overrides = {'model.name': 'toy_small', 'model.backbone_bn': None, 'batch_size': 4, 'checkpoint_every': 2}
  first = train.train_and_evaluate(tiny_config(total_steps=2, **overrides), workdir)
  second = train.train_and_evaluate(tiny_config(total_steps=4, **overrides), workdir)
  return workdir, first, second, tiny_config(total_steps=4, **overrides)


def _torch_forward(model_name, state, x_nhwc):
  ref = toy_family.ToyTorch(K, toy_family.WIDTHS[model_name])
  ref.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()}, strict=True)
  with torch.no_grad():
    return ref.eval()(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)


def test_train_resume_and_evaluate(run):
  workdir, first, second, config = run
  assert (first['step'], second['step'], second['status']) == (2, 4, 'done')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  train_steps = [
    r['step'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if r['split'] == 'train'
  ]
  assert train_steps == [1, 2, 3, 4]  # the second run resumed at step 2
  assert 0.0 <= second['val']['aAcc'] <= 1.0 and len(second['val']['per_class']) == K
  # --mode=eval of the workdir gives the end-of-training metrics again.
  metrics = evaluation.run(config, workdir)
  for k in ('mIoU', 'mAcc', 'aAcc'):
    assert metrics[k] == pytest.approx(second['val'][k], abs=1e-12, nan_ok=True)


def test_convert_to_and_from_pytorch(run, tmp_path):
  workdir, _, second, _ = run
  cli = script_modules.load('convert_checkpoint')
  pth, back = str(tmp_path / 'toy.pth'), str(tmp_path / 'converted')
  assert cli.main(['--to-torch', workdir, pth]) == 0
  state = torch.load(pth, map_location='cpu', weights_only=True)['state_dict']
  # The layout is the family's own: the PyTorch network written for the test
  # loads it strictly and computes the same logits.
  x = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
  trained = jax.device_get(second['state'].variables)
  want = np.asarray(build_model('toy_small', K).apply(trained, x))
  np.testing.assert_allclose(_torch_forward('toy_small', state, x), want, rtol=1e-5, atol=1e-5)
  assert cli.main([pth, back]) == 0
  loaded = loader.load(back)
  assert (loaded.kind, loaded.model, loaded.num_classes) == ('converted', 'toy_small', K)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables, trained)


def test_predict_and_export(run, tmp_path):
  workdir, _, second, _ = run
  seg = Segmenter.from_checkpoint(workdir, dataset='synthetic', img_scale=(80, 64))
  assert seg.num_classes == K
  image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  labels = seg.predict(image)
  # Independent check: mmseg's pipeline by hand (resize 50x70 -> 57x80 keeps
  # the ratio, pad to 64x96) through the PyTorch network.
  import cv2

  resized = cv2.resize(image, (80, 57), interpolation=cv2.INTER_LINEAR).astype(np.float32)
  x = np.zeros((1, 64, 96, 3), np.float32)
  x[0, :57, :80] = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  state = convert.variables_to_state_dict(jax.device_get(second['state'].variables), 'toy_small')
  logits = _torch_forward('toy_small', state, x)[:, :57, :80]
  up = torch.nn.functional.interpolate(torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()), (50, 70), mode='bilinear')
  want = up[0].argmax(0).numpy()
  assert labels.shape == (50, 70) and np.mean(labels == want) > 0.99

  export = script_modules.load('export')
  out = str(tmp_path / 'export')
  assert export.main([f'--checkpoint={workdir}', f'--output={out}', '--height=64', '--width=96']) == 0
  exported, meta = export.load(out)
  assert meta['num_classes'] == K
  y = np.asarray(exported.call(x))
  np.testing.assert_allclose(y, _torch_forward('toy_small', state, x), rtol=1e-4, atol=1e-4)
