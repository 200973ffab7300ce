"""One loader, every format x every entry point: an upstream mmseg .pth, a bare
state-dict .pth, an ImageNet backbone .pth, a converted directory, a training
workdir and one of its step directories, through `--config.init`,
`--mode=eval`, `Segmenter.from_checkpoint`, scripts/convert_checkpoint.py (both
ways), predict.py and export.py. The loader is the question, not the model: the
toy family (tests/toy_family.py, the synthetic config's 5 classes) compiles in
seconds; parity.py, which compares CGRSeg's stages, reads a CGRSeg tiny .pth."""

import json
import os

import cv2
import jax
import numpy as np
import pytest
import torch

import script_modules
from cgrseg_jax import convert, evaluation, loader, train
from cgrseg_jax.inference import InferenceError, Segmenter
from cgrseg_jax.models import family_of
from cgrseg_jax.torch_reference import cgrseg as ref
from toy_family import ToyTorch
from train_config import toy_config

pytestmark = pytest.mark.usefixtures('toy')

K = 5
FULL = ('mmseg_pth', 'bare_pth', 'converted', 'workdir', 'step')
KIND = {'mmseg_pth': 'torch', 'bare_pth': 'torch', 'converted': 'converted', 'workdir': 'workdir', 'step': 'step'}


@pytest.fixture(scope='module')
def formats(tmp_path_factory):
  d = tmp_path_factory.mktemp('formats')
  torch_model = ref.randomize_(ToyTorch(K, 8), seed=4)
  state = torch_model.state_dict()
  paths = {'mmseg_pth': str(d / 'mmseg.pth'), 'bare_pth': str(d / 'bare.pth'), 'backbone_pth': str(d / 'bb.pth')}
  torch.save({'meta': {'iter': 10}, 'state_dict': state}, paths['mmseg_pth'])
  torch.save(state, paths['bare_pth'])
  backbone = {k: v for k, v in state.items() if k.startswith('stem.')}
  backbone.update({'fc.weight': torch.zeros(1000, 8), 'fc.bias': torch.zeros(1000)})
  torch.save({'model': backbone}, paths['backbone_pth'])
  paths['converted'] = str(d / 'converted')
  assert script_modules.load('convert_checkpoint').main([paths['mmseg_pth'], paths['converted']]) == 0
  # A training run initialised from the .pth (--config.init), lr 0: weights unchanged but BN statistics.
  paths['workdir'] = str(d / 'run')
  config = toy_config(total_steps=1, eval_every=-1, batch_size=2, init=paths['mmseg_pth'], **{'optimizer.lr': 0.0})
  result = train.train_and_evaluate(config, paths['workdir'])
  paths['step'] = os.path.join(paths['workdir'], 'checkpoints', '1')
  upstream, _ = convert.state_dict_to_variables(state)
  trained = jax.device_get(result['state'].variables)
  return d, paths, upstream, trained


def _want(name, upstream, trained):
  return trained if name in ('workdir', 'step') else upstream


def _assert_same(a, b):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_trained_from_pth_init(formats):
  _, _, upstream, trained = formats
  # --config.init=<mmseg .pth> loaded every parameter (lr 0: params unchanged).
  _assert_same(trained['params'], upstream['params'])


@pytest.mark.parametrize('name', FULL)
def test_loader_and_config_init(formats, name):
  _, paths, upstream, trained = formats
  loaded = loader.load(paths[name])
  assert (loaded.kind, loaded.model, loaded.num_classes) == (KIND[name], 'toy_small', K)
  _assert_same(loaded.variables, _want(name, upstream, trained))
  fresh = jax.tree_util.tree_map(np.zeros_like, loaded.variables)
  _assert_same(loader.initial_variables(paths[name], fresh, 'toy_small', K), loaded.variables)
  with pytest.raises(loader.LoadError, match=r'toy_small.*cgrseg_t\b'):
    loader.load(paths[name], model='cgrseg_t')
  with pytest.raises(loader.LoadError, match='5 classes.*150'):
    loader.initial_variables(paths[name], fresh, 'toy_small', 150)


def test_backbone_pth(formats):
  _, paths, upstream, _ = formats
  loaded = loader.load(paths['backbone_pth'])
  assert (loaded.kind, loaded.model) == ('backbone', 'toy_small')
  assert loaded.report.skipped['fc.weight'] == 'ImageNet classifier'
  fresh = family_of('toy_small').variable_shapes('toy_small', K)
  fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, np.float32), fresh)
  init = loader.initial_variables(paths['backbone_pth'], fresh, 'toy_small', K)
  for stem in ('stem_0', 'stem_1'):
    _assert_same(init['params'][stem], upstream['params'][stem])
  _assert_same(init['params']['classifier'], fresh['params']['classifier'])  # the head keeps its init
  with pytest.raises(InferenceError, match='bb.pth: not a torch checkpoint'):
    Segmenter.from_checkpoint(paths['backbone_pth'])
  cli = script_modules.load('convert_checkpoint')
  assert cli.main(['--backbone', paths['backbone_pth'], '--variant', 'small']) == 0
  assert cli.main(['--to-torch', paths['backbone_pth'], os.path.join(formats[0], 'x.pth')]) == 2


@pytest.mark.parametrize('name', FULL)
def test_segmenter_and_convert_both_ways(formats, name, tmp_path):
  _, paths, upstream, trained = formats
  want = _want(name, upstream, trained)
  seg = Segmenter.from_checkpoint(paths[name], dataset='synthetic')
  assert seg.num_classes == K
  _assert_same(seg.variables, want)
  with pytest.raises(InferenceError, match="variant 'b'"):
    Segmenter.from_checkpoint(paths[name], variant='b')
  cli = script_modules.load('convert_checkpoint')
  assert cli.main(['--to-torch', paths[name], str(tmp_path / 'out.pth')]) == 0
  out = torch.load(tmp_path / 'out.pth', map_location='cpu', weights_only=True)['state_dict']
  torch_model = ToyTorch(K, 8)
  torch_model.load_state_dict(out, strict=True)  # the upstream layout
  back, _ = convert.state_dict_to_variables(out)
  _assert_same(back, want)
  assert cli.main([paths[name], str(tmp_path / 'conv'), '--model', 'toy_small']) == 0
  _assert_same(loader.load(str(tmp_path / 'conv')).variables, want)


def test_mode_eval(formats):
  _, paths, _, _ = formats
  config = toy_config()
  metrics = {}
  for name in ('mmseg_pth', 'converted', 'step'):
    with config.unlocked():
      config.init = paths[name]
    metrics[name] = evaluation.run(config, str(formats[0] / 'eval'))
  assert metrics['converted']['per_class'] == metrics['mmseg_pth']['per_class']
  with config.unlocked():
    config.init = paths['backbone_pth']
  with pytest.raises(loader.LoadError, match='bb.pth: not a torch checkpoint'):
    evaluation.run(config, str(formats[0] / 'eval'))
  # The workdir itself when config.init is 'scratch'.
  assert evaluation.run(toy_config(), paths['workdir'])['per_class'] == metrics['step']['per_class']


def test_predict_and_export_scripts(formats, tmp_path):
  d, paths, upstream, _ = formats
  image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
  cv2.imwrite(str(tmp_path / 'a.png'), image)
  predict = script_modules.load('predict')
  labels = {}
  for name in ('bare_pth', 'step'):
    out = tmp_path / name
    args = [f'--checkpoint={paths[name]}', f'--output={out}', '--dataset=synthetic', '--img-scale=64,48', '--raw']
    assert predict.main([*args, '--no-progress', str(tmp_path / 'a.png')]) == 0
    labels[name] = cv2.imread(str(out / 'a_labels.png'), cv2.IMREAD_UNCHANGED)
  seg = Segmenter.from_checkpoint(paths['converted'], dataset='synthetic', img_scale=(64, 48))
  np.testing.assert_array_equal(labels['bare_pth'], seg.predict(image[..., ::-1]))  # cv2 wrote BGR
  assert labels['step'].shape == (40, 56)

  export = script_modules.load('export')
  out = str(tmp_path / 'export')
  assert export.main([f'--checkpoint={paths["converted"]}', f'--output={out}', '--height=64', '--width=64']) == 0
  exported, meta = export.load(out)
  assert meta['num_classes'] == K
  x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
  torch_model = ToyTorch(K, 8).eval()
  torch_model.load_state_dict(torch.load(paths['mmseg_pth'], weights_only=True)['state_dict'])
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(exported.call(x)), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_parity_script(tmp_path):
  pth = str(tmp_path / 'tiny.pth')
  torch.save({'meta': {}, 'state_dict': ref.randomize_(ref.build_torch_segmentor('tiny', K), seed=4).state_dict()}, pth)
  parity = script_modules.load('parity')
  report = tmp_path / 'parity.json'
  assert parity.main([f'--checkpoint={pth}', '--size=64,64', f'--json={report}']) == 0
  rows = json.load(open(report))['stages']
  assert len(rows) == 6 and max(r['max_rel'] for r in rows) < 1e-4
