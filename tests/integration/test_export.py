"""scripts/export.py: the StableHLO export reloaded in a fresh process reproduces the
in-process forward to 1e-6 (batch-polymorphic: two batch sizes); ONNX and TFLite files of
the upstream fixtures agree with JAX (--verify) and with the upstream PyTorch outputs."""

import json
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


def test_reloaded_export_reproduces_forward_and_the_torch_reference(exported):
  # One fresh process runs two batch sizes through the one batch-polymorphic file.
  ckpt, out, d, torch_model = exported
  variables = convert.load_torch_checkpoint(ckpt)
  model = build_segmentor('tiny', K)
  # The export bakes the weights in as constants, as this closure does.
  forward = jax.jit(lambda x: model.apply(variables, x, train=False))
  xs = {b: np.random.default_rng(b).standard_normal((b, *HW, 3)).astype(np.float32) for b in (1, 3)}
  for b, x in xs.items():
    np.save(d / f'x{b}.npy', x)
  _run(
    f'--check={out}',
    f'--check-input={d}/x1.npy,{d}/x3.npy',
    f'--check-output={d}/y1.npy,{d}/y3.npy',
  )
  for b, x in xs.items():
    got = np.load(d / f'y{b}.npy')
    assert got.shape == (b, *HW, K)
    np.testing.assert_allclose(got, np.asarray(forward(x)), rtol=0, atol=1e-6)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(xs[3]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_meta_and_errors(exported, tmp_path):
  _, out, _, _ = exported
  meta = json.load(open(os.path.join(out, 'meta.json')))
  assert meta['input_hw'] == list(HW) and meta['batch'] is None and meta['num_classes'] == K
  assert meta['class_names'][0] == 'road'  # cityscapes names
  proc = subprocess.run([sys.executable, SCRIPT, f'--check={tmp_path}'], capture_output=True, text=True)
  assert proc.returncode != 0 and str(tmp_path) in proc.stderr


# -- ONNX and TFLite on the upstream-built fixtures (../shared/fixtures), verified by the
# script against JAX and checked here against the upstream PyTorch outputs stored with them.
FIXTURES = {
  'cgrseg_t': ('cgrseg_t_512x512', 'ade20k', (512, 512)),
  'csfcn': ('csfcn_c19_256x512', 'cityscapes', (256, 512)),
}


def _upstream_check(name, logits, data):
  """The runtime's logits against the upstream model's stored outputs (NCHW in the .npz)."""
  if name == 'csfcn':
    want = data['logits'].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
  else:
    idx = data['sample_idx']
    want = data['sample_logits']
    np.testing.assert_allclose(logits[idx[:, 0], idx[:, 1], idx[:, 2]], want, rtol=0, atol=1e-4 * np.abs(want).max())
    want = data['argmax']
  agreement = (logits.argmax(-1) == (want.argmax(-1) if name == 'csfcn' else want)).mean()
  assert agreement >= 0.9999, agreement


@pytest.mark.parametrize('name', sorted(FIXTURES))
def test_onnx_and_tflite_of_the_upstream_fixtures(shared_dir, tmp_path, name):
  import onnxruntime
  from ai_edge_litert.interpreter import Interpreter

  stem, dataset, (h, w) = FIXTURES[name]
  fixture = shared_dir / 'fixtures'
  out = tmp_path / name
  stdout = _run(
    f'--checkpoint={fixture / (stem + ".pth")}',
    f'--output={out}',
    f'--dataset={dataset}',
    f'--height={h}',
    f'--width={w}',
    '--format=onnx,tflite',
    '--batch=1',
    '--verify',
    f'--verify-input={fixture / (stem + ".npz")}',
  )
  meta = json.load(open(out / 'meta.json'))
  for fmt in ('onnx', 'tflite'):
    verified = meta['files'][fmt]['verify']
    assert verified['ok'] and verified['max_rel'] <= 1e-4 and verified['argmax_agreement'] >= 0.9999, verified
    assert f'verify {fmt}: max abs' in stdout and ': ok (rtol 0.0001' in stdout
  data = np.load(fixture / (stem + '.npz'))
  x = data['x'].transpose(0, 2, 3, 1).astype(np.float32)
  session = onnxruntime.InferenceSession(str(out / 'forward.onnx'))
  _upstream_check(name, session.run(None, {session.get_inputs()[0].name: x})[0], data)
  interpreter = Interpreter(model_path=str(out / 'forward.tflite'))
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'], x)
  interpreter.invoke()
  _upstream_check(name, interpreter.get_tensor(interpreter.get_output_details()[0]['index']), data)


@pytest.mark.parametrize(
  'args, message',
  [
    (['--format=keras'], "--format='keras'; expected one of stablehlo, onnx, tflite"),
    (['--format=tflite', '--batch=dynamic'], '--format=tflite has a fixed batch: pass --batch=N'),
    (['--format=stablehlo,onnx', '--batch=dynamic'], '--format=onnx has a fixed batch: pass --batch=N'),
    (['--batch=two'], "--batch='two'; expected 'dynamic' or a positive integer"),
  ],
)
def test_bad_export_arguments_are_one_line_errors(exported, tmp_path, args, message):
  ckpt = exported[0]
  proc = subprocess.run(
    [sys.executable, SCRIPT, f'--checkpoint={ckpt}', f'--output={tmp_path}', *args], capture_output=True, text=True
  )
  assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr


def test_verify_input_errors_name_the_file(exported, tmp_path):
  ckpt = exported[0]
  bad = tmp_path / 'wrong.npy'
  np.save(bad, np.zeros((1, 3, 32, 32), np.float32))
  proc = subprocess.run(
    [
      sys.executable,
      SCRIPT,
      f'--checkpoint={ckpt}',
      f'--output={tmp_path}/o',
      f'--height={HW[0]}',
      f'--width={HW[1]}',
      '--verify',
      f'--verify-input={bad}',
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode != 0 and str(bad) in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
