"""Ahead-of-time compilation for TPU slices with libtpu (the tpu extra), no TPU present:
the tiny CGRSeg's real train and eval steps for a single-host and a multi-host
topology, their memory and cost figures checked against independent counts (the
state's bytes from its shapes, the PyTorch reference's multiply-adds), and the
backend choices taken from the target, not from this CPU host."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from cgrseg_jax import aot, cost, train
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.evaluation import bucketed
from cgrseg_jax.models import layers
from cgrseg_jax.torch_reference import cgrseg as ref
from paths import REPO, SCRIPTS, TESTS_DIR
from train_config import tiny_config

K = 150  # the synthetic dataset's classes: tiny_config's model.num_classes


@pytest.fixture(scope='module')
def reports():
  config = tiny_config()
  # The tiny CGRSeg's train step for a multi-host slice (a compile takes about 80 s here); the
  # single-host slice and the eval step compile for the toy model in the main.py test.
  return {'v5e:4x4': aot.run(config, 'v5e:4x4', ('train',), batch_per_device=2)}


def _state_bytes(config, mesh):
  state = train.build_step(config, mesh).abstract_state
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def test_topologies_single_and_multi_host(reports):
  pod = reports['v5e:4x4']
  assert (pod['devices'], pod['hosts'], pod['device_kind']) == (16, 4, 'TPU v5 lite')  # 4 chips per v5e host
  assert pod['hbm_per_device_bytes'] == 16 * 2**30 and pod['peak_tflops'] == 197.0
  one = aot.topology_mesh('v5e:2x2')
  assert one.size == 4 and {d.process_index for d in one.devices.flat} == {0}
  v4 = aot.topology_mesh('v4:2x2x1')  # both TensorCores of each of the 4 chips are devices
  assert v4.size == 8


def test_memory_and_cost_figures_are_plausible(reports):
  topology = 'v5e:4x4'
  config = tiny_config()
  mesh = aot.topology_mesh(topology)
  state = _state_bytes(config, mesh)
  h, w = config.data.crop_size
  # Multiply-adds of the forward, counted on the PyTorch reference (hooks on its layers).
  macs = cost.torch_macs(ref.build_torch_segmentor('tiny', K).eval(), torch.zeros(1, 3, h, w))
  steps = reports[topology]['steps']
  tr = steps['train']
  # Arguments: the replicated state (params, optimizer moments) plus this device's 2 images;
  # TPU layouts pad small dimensions to their tiles, so up to a quarter more.
  batch = 2 * (h * w * 3 + h * w + 2 * 4 + 4)
  assert state <= tr['argument_bytes'] <= 1.25 * state + batch, (tr['argument_bytes'], state)
  assert tr['alias_bytes'] >= 0.9 * state  # the donated state is reused for the new one
  assert tr['fits'] and 0 < tr['temp_bytes'] < 2**30
  # A train step is about 3 forwards (forward, then backward twice its work); eval is one forward.
  assert 2.0 <= tr['flops'] / (2 * macs * 2) <= 8.0, tr['flops'] / (2 * macs * 2)
  for s in steps.values():
    assert s['hbm_bytes'] > s['argument_bytes'] * 0.5 and s['compute_bound_ms'] > 0 and s['memory_bound_ms'] > 0
    assert s['img_per_s_per_slice'] == pytest.approx(s['img_per_s_per_device'] * reports[topology]['devices'], rel=1e-3)
    assert s['bound_by'] in ('memory', 'compute') and s['seconds'] > 0


def test_backend_choices_follow_the_mesh_not_the_host():
  config = tiny_config()
  tpu = train.build_step(config, aot.topology_mesh('v5e:2x2'))
  cpu = train.build_step(config, jax.sharding.Mesh(np.asarray(jax.devices()), ('data',)))
  assert (tpu.platform, cpu.platform) == ('tpu', 'cpu')
  assert tpu.model.decode_head.depthwise == 'xla' and cpu.model.decode_head.depthwise == 'shifts'
  assert tpu.model.backbone.depthwise == 'xla' and cpu.model.backbone.depthwise == 'shifts'
  assert layers.resolve_depthwise('auto', 'gpu') == 'xla' and layers.resolve_depthwise('auto', 'cpu') == 'shifts'


def test_largest_batch_search_finds_the_boundary():
  # A fake compile whose peak grows linearly: the search must land on the last batch that fits.
  made = []

  def compile_at(b):
    made.append(b)
    return aot.Compiled(b, 0.0, 100 * b, 0, 0, 0, 0, 1.0, 1.0)

  best, tries = aot.largest_batch(compile_at, hbm_bytes=100 * 37 + 50)
  assert best == 37 and len(made) == len(tries) <= 13


def test_main_compile_mode_and_one_line_errors(tmp_path):
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([REPO, TESTS_DIR])}
  cmd = [sys.executable, os.path.join(REPO, 'main.py'), '--config=tests/train_config.py:toy', '--mode=compile']
  proc = subprocess.run(
    [*cmd, '--topology=v5e:2x2', f'--workdir={tmp_path}'], capture_output=True, text=True, cwd=REPO, env=env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'toy_small (float32) on v5e:2x2: 4 x TPU v5 lite over 1 host(s)' in proc.stdout
  report = json.loads((tmp_path / 'aot_v5e_2x2.json').read_text())
  assert set(report['steps']) == {'train', 'eval'}
  tr, ev = report['steps']['train'], report['steps']['eval']
  # Train batch 8 over 4 devices; eval batch 1 per device (the toy's counts are dominated by
  # the metric's full-size work, so only their presence is checked here).
  assert tr['fits'] and ev['fits'] and tr['batch_per_device'] == 2 and ev['batch_per_device'] == 1
  assert min(tr['flops'], ev['flops'], ev['hbm_bytes'], ev['memory_bound_ms']) > 0
  bad = subprocess.run(
    [sys.executable, os.path.join(SCRIPTS, 'aot_compile.py'), '--config=configs/synthetic_t.py', '--topology=v9:2x2'],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
  )
  assert bad.returncode == 2 and "--topology='v9:2x2'; expected" in bad.stderr, bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_train_and_eval_steps_lower_for_cuda_without_a_gpu():
  """jax.export lowers for CUDA on this CPU host: the GPU forms of the layers and loss
  (native grouped convolutions, the plain resize + cross-entropy), nothing CPU-only."""
  config = tiny_config()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  parts = train.build_step(config, mesh, platform='gpu')
  assert parts.platform == 'gpu' and parts.model.backbone.depthwise == 'xla' and parts.model.resize_impl == 'matmul'
  batch = train.abstract_train_batch(config, mesh, 2)
  exported = jax.export.export(parts.step_fn, platforms=('cuda',))(parts.abstract_state, batch)
  text = exported.mlir_module()
  assert exported.platforms == ('cuda',)
  # Depthwise convolutions as grouped convolutions (the CPU form is a chain of shifted slices).
  groups = [int(g) for g in re.findall(r'feature_group_count = (\d+)', text)]
  assert groups and max(groups) > 1
  # The banded CPU loss is a loop over bands; the GPU loss has no loop, and no custom call is a CPU one.
  assert 'stablehlo.while' not in text
  targets = set(re.findall(r'stablehlo.custom_call @(\w+)', text))
  assert not {t for t in targets if 'cpu' in t.lower() or 'lapack' in t.lower()}, targets
  info = input_pipeline.dataset_info(config)
  step = bucketed.cached_eval_step(parts.model, mesh, config.model.num_classes, info.ignore_index)
  eval_batch = bucketed.abstract_batch(parts.data_sharding, 2, config.data.crop_size)
  variables = {'params': parts.abstract_state.params, 'batch_stats': parts.abstract_state.batch_stats}
  exported = jax.export.export(step, platforms=('cuda',))(variables, eval_batch)
  assert exported.platforms == ('cuda',) and 'feature_group_count' in exported.mlir_module()
