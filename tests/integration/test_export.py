"""scripts/export.py: the serialised eval forward, reloaded in a fresh process,
reproduces the in-process forward to 1e-6 (batch-polymorphic: two batch sizes)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax import convert
from cgrseg_jax.models import build_segmentor

from paths import SCRIPTS

SCRIPT = os.path.join(SCRIPTS, 'export.py')
K, HW = 19, (96, 128)


def _run(*args):
  proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  d = tmp_path_factory.mktemp('export')
  model = ref.randomize_(ref.build_torch_segmentor('tiny', K), seed=3).eval()
  ckpt = str(d / 'tiny.pth')
  torch.save({'meta': {}, 'state_dict': model.state_dict()}, ckpt)
  out = str(d / 'artifact')
  _run(f'--checkpoint={ckpt}', f'--output={out}', f'--height={HW[0]}', f'--width={HW[1]}', '--dataset=cityscapes')
  return ckpt, out, d, model


@pytest.mark.parametrize('batch', [1, 3])
def test_reloaded_export_reproduces_forward(exported, batch):
  ckpt, out, d, _ = exported
  x = np.random.default_rng(batch).standard_normal((batch, *HW, 3)).astype(np.float32)
  np.save(d / f'x{batch}.npy', x)
  _run(f'--check={out}', f'--check-input={d}/x{batch}.npy', f'--check-output={d}/y{batch}.npy')
  got = np.load(d / f'y{batch}.npy')
  variables = convert.load_torch_checkpoint(ckpt)
  model = build_segmentor('tiny', K)
  # The export bakes the weights in as constants, as this closure does.
  want = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(x))
  assert got.shape == (batch, *HW, K)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # With the weights as arguments XLA cannot fold them (e.g. BN scales into
  # conv kernels), so rounding differs by ~1e-6 of logits of size ~1.
  as_args = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  np.testing.assert_allclose(got, as_args, rtol=0, atol=1e-5 * np.abs(as_args).max())


def test_export_matches_torch_reference(exported):
  _, out, d, torch_model = exported
  x = np.random.default_rng(7).standard_normal((2, *HW, 3)).astype(np.float32)
  np.save(d / 'xt.npy', x)
  _run(f'--check={out}', f'--check-input={d}/xt.npy', f'--check-output={d}/yt.npy')
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got = np.load(d / 'yt.npy')
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_meta_and_errors(exported, tmp_path):
  import json

  _, out, _, _ = exported
  meta = json.load(open(os.path.join(out, 'meta.json')))
  assert meta['input_hw'] == list(HW) and meta['batch'] is None and meta['num_classes'] == K
  assert meta['class_names'][0] == 'road'  # cityscapes names
  proc = subprocess.run([sys.executable, SCRIPT, f'--check={tmp_path}'], capture_output=True, text=True)
  assert proc.returncode != 0 and str(tmp_path) in proc.stderr


def test_onnx_export_matches(exported, tmp_path):
  pytest.importorskip('jax2onnx')
  ort = pytest.importorskip('onnxruntime')
  ckpt, _, _, torch_model = exported
  _run(f'--checkpoint={ckpt}', f'--output={tmp_path}', f'--height={HW[0]}', f'--width={HW[1]}', '--batch=1', '--onnx')
  sess = ort.InferenceSession(str(tmp_path / 'forward.onnx'))
  x = np.random.default_rng(9).standard_normal((1, *HW, 3)).astype(np.float32)
  got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
