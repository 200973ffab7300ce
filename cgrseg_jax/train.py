"""Training and evaluation loop (upstream mmseg 0.27 recipe, SPEC §6).

Reads top to bottom: mesh, data, model and optimizer, sharding, step,
checkpoint, loop. One `jax.jit` train step: the state is replicated, the
global batch is one array sharded over the mesh axis 'data' (all devices of
all processes), so BatchNorm's batch statistics are those of the global
batch (SyncBN) and gradients are global means, with no explicit collectives.
With `config.grad_accum_steps = k` each call is one batch and the optimizer
(optax `MultiSteps`) steps every k of them; `config.ema_decay` keeps an EMA of
the weights in the state, evaluated beside them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cgrseg_jax import (
  checkpointing,
  errors,
  evaluation,
  loader,
  losses,
  metric_writer,
  optim,
  platforms,
  preemption,
  profiling,
  storage,
)
from cgrseg_jax.data import input_pipeline
from cgrseg_jax.data import pipeline as dp
from cgrseg_jax.models import registry

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # batches trained on: grad_accum_steps per optimizer step
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; per-batch keys are folded in from `step`
  ema: Any = None  # {'params', 'batch_stats'} float32 moving average; None when config.ema_decay == 0

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def train_step(state: TrainState, batch, *, model, tx, dtype, method: str, loss, ema_decay: float = 0.0, platform=None):
  """One batch: forward, backward and `tx` (an optimizer step, or one micro-batch of
  an `optax.MultiSteps` accumulation); returns (new state, scalar metrics).
  `method` is the model family's loss logits (`ModelFamily.loss_method`),
  `loss(logits, labels)` resizes them to the labels. With `ema_decay`, the EMA
  moves towards the new weights when an optimizer step was applied. `platform`:
  the target, for the normalisation's form (`dp.normalize_image`)."""
  rng = jax.random.fold_in(state.rng, state.step)  # dropout / drop-path
  x = dp.normalize_image(batch['image'], batch['valid_hw'], dtype=dtype, platform=platform)

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      x,
      train=True,
      method=method,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    return loss(logits, batch['label']), updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema_decay:
    stepped = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
    d = jnp.float32(ema_decay)
    ema = jax.tree_util.tree_map(
      lambda e, w: jnp.where(stepped, d * e + (1 - d) * w.astype(jnp.float32), e),
      ema,
      {'params': params, 'batch_stats': batch_stats},
    )
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
  return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


@dataclasses.dataclass(frozen=True)
class StepParts:
  """The compiled pieces of a run for one mesh; `_train` and the AOT compile
  (aot.py, `main.py --mode=compile`) build them with the same function."""

  model: Any
  tx: optax.GradientTransformation
  accum: int  # batches per optimizer step
  make_state: Callable  # variables -> TrainState
  abstract_state: Any  # TrainState of ShapeDtypeStructs, replicated
  step_fn: Callable  # jit(state, batch) -> (state, metrics), the run's shardings
  repl: NamedSharding
  data_sharding: NamedSharding
  platform: str  # what the step is built and compiled for: the mesh's devices'


def build_step(config, mesh: Mesh, workdir=None, platform: Optional[str] = None) -> StepParts:
  """Model, optimizer, state shardings and the jitted train step of `config` for
  `mesh`. Backend-specific layer and loss forms follow the mesh's platform (not
  the host's: an AOT compile for TPU from a CPU host gets the TPU forms), or
  `platform` when given (a `jax.export` lowering for another platform, e.g. 'gpu')."""
  platform = platform or platforms.mesh_platform(mesh)
  repl, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  model = registry.build_from_config(config, platform=platform)
  family = registry.family_of(config.model.name)
  dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  abstract_vars = jax.eval_shape(model.init, jax.random.PRNGKey(config.seed), dummy)
  tx = optim.build_optimizer_from_config(abstract_vars['params'], config)
  accum = optim.accumulation_steps(config)
  ema_decay = float(config.get('ema_decay', 0.0))
  if not 0.0 <= ema_decay < 1.0:
    raise errors.ConfigError(f'config.ema_decay={ema_decay}; expected 0 (off) or a decay in (0, 1)')

  def make_state(variables):
    as_f32 = lambda t: jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), t)
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']),
      rng=jax.random.PRNGKey(config.seed + 1),
      ema=as_f32({'params': variables['params'], 'batch_stats': variables['batch_stats']}) if ema_decay else None,
    )

  # state replicated, batch split over 'data'
  abstract = jax.eval_shape(make_state, abstract_vars)
  abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)
  loss_fn = losses.build_loss(
    registry.recipe_value(config, 'loss'),
    config,
    input_pipeline.dataset_info(config).ignore_index,
    workdir=workdir,
    platform=platform,
  )
  step_fn = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      dtype=registry.DTYPES[config.precision],
      method=family.loss_method,
      loss=loss_fn,
      ema_decay=ema_decay,
      platform=platform,
    ),
    in_shardings=(repl, data_sharding),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )
  return StepParts(model, tx, accum, make_state, abstract, step_fn, repl, data_sharding, platform)


def abstract_train_batch(config, mesh: Mesh, batch_size: Optional[int] = None) -> dict:
  """The global train batch the pipeline feeds (`batch_size`, default
  config.batch_size, at config.data.crop_size) as ShapeDtypeStructs sharded over 'data'."""
  b = int(batch_size or config.batch_size)
  h, w = (int(v) for v in config.data.crop_size)
  sharding = NamedSharding(mesh, P('data'))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {
    'image': spec((b, h, w, 3), jnp.uint8),
    'label': spec((b, h, w), jnp.uint8),
    'valid_hw': spec((b, 2), jnp.int32),
    'index': spec((b,), jnp.int32),
  }


def _replicate(tree, sharding):
  """Host values (identical on every process) -> arrays with `sharding`."""
  return jax.tree_util.tree_map(
    lambda v: jax.make_array_from_callback(np.shape(v), sharding, lambda idx, v=v: np.asarray(v)[idx]), tree
  )


def _save_config(config, workdir):
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, on_step: Optional[Callable[[int, dict], None]] = None
) -> dict:
  """Train per `config`, resuming from `<workdir>/checkpoints` if present.

  `on_step(step, local_batch)` is called after each step is dispatched (tests
  use it to record the batches and to send SIGTERM). Returns a summary dict:
  `step` reached, `status` ('done' | 'preempted'), last `val` metrics.
  Raises FloatingPointError on a non-finite loss (no checkpoint is written
  after it, so the last good one stays the latest). A SIGTERM at any moment
  (set-up, compilation, a step, evaluation) stops every process at one point
  (preemption.py); the last finished step is saved if it is new.
  """
  with preemption.Preemption() as stop:
    return _train(config, workdir, on_step, stop)


def _train(config, workdir, on_step, stop: preemption.Preemption) -> dict:
  config = input_pipeline.with_dataset_defaults(config)  # model.num_classes from the dataset when unset
  # A workdir that cannot be written fails here, in one line, not at the first save hours later.
  workdir = storage.check_writable(workdir)
  _save_config(config, workdir)

  # ---- mesh: every device of every process on one data axis
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  repl = NamedSharding(mesh, P())
  if config.batch_size % mesh.size:
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of the {mesh.size} devices')
  log.info('mesh: %d devices over %d processes; global batch %d', mesh.size, jax.process_count(), config.batch_size)

  # ---- data
  train_it = input_pipeline.train_iterator(config)

  # ---- model and optimizer, sharding, step (built for the mesh's platform)
  parts = build_step(config, mesh, workdir)
  model, accum, make_state, abstract, step_fn = (
    parts.model,
    parts.accum,
    parts.make_state,
    parts.abstract_state,
    parts.step_fn,
  )
  evaluator = evaluation.make_evaluator(config, model, mesh)

  # ---- checkpoint: resume from workdir (the newest step that restores), else config.init
  ckpts = checkpointing.RunCheckpoints(workdir / 'checkpoints', config.keep_checkpoints)
  try:
    state, latest = ckpts.restore_latest(abstract, train_it)
    if latest is not None:
      log.info('resumed from %s/checkpoints/%d', workdir, latest)
    else:  # a fresh run: random init (compiled only here, not on a resume), then config.init
      dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
      init_vars = jax.device_get(registry.init_variables(model, jax.random.PRNGKey(config.seed), dummy))
      host_vars = loader.initial_variables(config.init, init_vars, config.model.name, config.model.num_classes)
      state = jax.jit(make_state, out_shardings=repl)(_replicate(host_vars, repl))
  except BaseException:
    # Stop orbax's background threads first: left running, they log errors at
    # interpreter exit, after the one-line message main.py prints.
    ckpts.close()
    raise
  # The loop counts batches; with accumulation, k of them make an optimizer step, and
  # logs, evaluations and scheduled checkpoints happen at optimizer steps.
  start = int(jax.device_get(state.step))
  if start % accum:
    log.info('resuming inside an accumulation: %d of %d batches done', start % accum, accum)

  # ---- loop
  writer = metric_writer.MetricWriter(workdir)
  total = config.total_steps * accum
  summary = {'status': 'done', 'val': None}
  bar = None
  if config.progress_bar and jax.process_index() == 0 and sys.stderr.isatty():
    bar = tqdm(total=total, initial=start, unit='it', dynamic_ncols=True, smoothing=0.1)
  last_saved = latest
  pending = None  # (step, metrics) of the previous step: checked one step late to keep the device busy
  t_last, n_last = time.time(), 0
  finished = False
  compiled_step = None

  def check(pending_item):
    step_done, m = pending_item
    loss = float(m['loss'])
    if not (np.isfinite(loss) and np.isfinite(float(m['grad_norm']))):
      raise FloatingPointError(
        f'loss is {loss} at step {step_done} (iteration {step_done - 1}); stopping. '
        f'Last good checkpoint: step {ckpts.latest_step()} in {workdir}/checkpoints'
      )
    return loss

  def save(step, metrics=None, force=False):
    nonlocal last_saved
    if last_saved == step:
      return
    ckpts.save(step, state, train_it, metrics=metrics, force=force)
    last_saved = step

  def stopped(where: str):
    summary['status'] = 'preempted'
    if pending is not None:
      check(pending)
      save(pending[0], force=True)
      log.warning('SIGTERM %s: saved step %d, exiting', where, pending[0])
    else:
      log.warning('SIGTERM %s: nothing new to save (step %d is the latest), exiting', where, start)

  profile = profiling.StepProfile(config.get('profile_steps'), workdir)
  try:
    try:
      for step in range(start, total):
        local = next(train_it)
        batch = dp.make_global_batch(local, mesh)
        if compiled_step is None:
          compiled_step = stop.compile(lambda: step_fn.lower(state, batch).compile(), 'train step')
        profile.before(step)
        with profile.annotate(step):
          state, metrics = compiled_step(state, batch)
        done = step + 1
        opt_done, at_step = divmod(done, accum)
        at_step = at_step == 0  # an optimizer step was applied
        profile.after(done, metrics)
        if on_step is not None:
          on_step(done, local)
        if pending is not None:
          check(pending)
        if bar is not None:
          bar.update(1)
        pending = (done, metrics)
        n_last += 1

        if at_step and (opt_done % config.log_every == 0 or done == total):
          loss = check(pending)
          dt = time.time() - t_last
          rec = {
            'loss': loss,
            'grad_norm': float(metrics['grad_norm']),
            'lr': optim.learning_rate(config, opt_done - 1),
            'images_per_sec': n_last * config.batch_size / max(dt, 1e-9),
          }
          writer.write(opt_done, rec, 'train')
          if bar is not None:
            bar.set_postfix(loss=f'{loss:.4f}', lr=f'{rec["lr"]:.2e}', img_s=f'{rec["images_per_sec"]:.1f}')
          else:  # not a terminal: one log line per log interval, with an ETA
            eta = (total - done) * config.batch_size / max(rec['images_per_sec'], 1e-9)
            log.info(
              'step %d/%d loss %.4f lr %.3g %.1f img/s ETA %s',
              opt_done,
              config.total_steps,
              loss,
              rec['lr'],
              rec['images_per_sec'],
              time.strftime('%H:%M:%S', time.gmtime(eta)),
            )
          t_last, n_last = time.time(), 0

        eval_now = at_step and (
          config.eval_every >= 0 and (done == total or (config.eval_every > 0 and opt_done % config.eval_every == 0))
        )
        ckpt_now = at_step and (
          done == total or bool(config.checkpoint_every and opt_done % config.checkpoint_every == 0)
        )
        if eval_now or ckpt_now:
          check(pending)  # never checkpoint a non-finite state
        val = None
        if eval_now:
          val = evaluation.evaluate_and_report(
            evaluator, state.variables, config, workdir, opt_done, writer, stop.check
          )
          summary['val'] = val
          if state.ema is not None:
            summary['val_ema'] = evaluation.evaluate_and_report(
              evaluator, state.ema, config, workdir, opt_done, writer, stop.check, split='val_ema'
            )
          if bar is not None:
            bar.write(f'step {opt_done}: mIoU {val["mIoU"]:.4f} mAcc {val["mAcc"]:.4f} aAcc {val["aAcc"]:.4f}')
        if eval_now or ckpt_now:
          save(done, {'mIoU': val['mIoU']} if val else None)

        stop.check()
      if pending is not None:
        check(pending)
    except preemption.Stopped:
      stopped('during compilation' if compiled_step is None else 'at a step or during evaluation')
    finally:
      profile.close()
    ckpts.wait()  # a failed background write raises here
    finished = True
  finally:
    if not finished:  # already failing: finish the pending write, report the first error
      try:
        ckpts.manager.wait_until_finished()
      except Exception as e:
        log.warning('the pending checkpoint write failed too: %s', e)
    ckpts.close()
    writer.close()
    if bar is not None:
      bar.close()
  summary['batches'] = int(jax.device_get(state.step))
  summary['step'] = summary['batches'] // accum  # optimizer steps
  summary['state'] = state
  return summary
