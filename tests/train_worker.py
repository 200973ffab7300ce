"""Subprocess entry for the sharding and multi-process tests (not a test file).

  python train_worker.py OUT_NPZ WORKDIR OVERRIDES_JSON [COORDINATOR NUM_PROCESSES PROCESS_ID]

Trains the synthetic tiny config with the overrides, then writes the final
params (flattened by upstream name; the EMA weights as `__ema__<path>` when kept), the val metrics, the run's status and
step to OUT_NPZ (OUT_NPZ.<process>.npz with several processes).
SIGTERM_AT=<process>:<step> sends SIGTERM to that process after that step,
SIGKILL_AT=<step>:<saved> SIGKILL (no handler, no cleanup: a lost machine)
after that step, once the checkpoint of step <saved> has been committed.
EVAL_FIXED=1 also evaluates fixed initial weights (the same in every run) and
writes their confusion matrix and per-image mIoU.
The toy family (tests/toy_family.py) is registered: `model.name=toy_small`
compiles in seconds where the question is the run, not the model.
"""

import json
import os
import signal
import sys
import time

import jax  # noqa: E402

if len(sys.argv) > 4:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=sys.argv[4], num_processes=int(sys.argv[5]), process_id=int(sys.argv[6])
  )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402

from cgrseg_jax import evaluation, train  # noqa: E402
from cgrseg_jax.data import input_pipeline  # noqa: E402
from cgrseg_jax.models import registry  # noqa: E402
import toy_family  # noqa: E402
from train_config import tiny_config  # noqa: E402


def main():
  out, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  config = tiny_config(**overrides)
  seen = []
  term_process, term_step = map(int, os.environ.get('SIGTERM_AT', '-1:-1').split(':'))
  kill_step, kill_saved = map(int, os.environ.get('SIGKILL_AT', '-1:-1').split(':'))
  if 'toy' not in [f.name for f in registry.families()]:
    registry.register(toy_family.FAMILY)

  def on_step(step, batch):
    seen.append(batch['index'].tolist())
    if step == term_step and jax.process_index() == term_process:
      os.kill(os.getpid(), signal.SIGTERM)
    if step == kill_step:
      deadline = time.time() + 120  # the save is asynchronous: wait for its commit
      while kill_saved not in ocp.path.step.checkpoint_steps(epath.Path(workdir) / 'checkpoints'):
        if time.time() > deadline:
          raise TimeoutError(f'checkpoint {kill_saved} not committed')
        time.sleep(0.2)
      os.kill(os.getpid(), signal.SIGKILL)

  result = train.train_and_evaluate(config, workdir, on_step=on_step)
  params = jax.device_get(result['state'].params)
  names = jax.tree_util.tree_leaves(registry.param_names(params, config.model.name))
  flat = {n: np.asarray(v) for n, v in zip(names, jax.tree_util.tree_leaves(params))}
  if result['state'].ema is not None:  # config.ema_decay: the EMA weights too, as '__ema__<leaf path>'
    ema = jax.device_get(result['state'].ema)
    flat.update(
      {f'__ema__{jax.tree_util.keystr(k)}': np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(ema)}
    )
  val = result['val'] or {}
  flat['__val__'] = np.array(json.dumps({k: val[k] for k in ('mIoU', 'mAcc', 'aAcc') if k in val}))
  flat['__status__'] = np.array(f'{result["status"]}:{result["step"]}')
  flat['__indices__'] = np.array(json.dumps(seen))
  flat['__devices__'] = np.array(jax.device_count())
  if os.environ.get('EVAL_FIXED'):
    flat.update(_fixed_eval(config))
  path = out if jax.process_count() == 1 else f'{out}.{jax.process_index()}'
  np.savez(path, **flat)


def _fixed_eval(config) -> dict:
  """Evaluation of weights that do not depend on the run (its sharding, its steps)."""
  config = input_pipeline.with_dataset_defaults(config)
  model = registry.build_from_config(config)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  variables = jax.jit(model.init)(jax.random.PRNGKey(7), jnp.zeros((1, 64, 64, 3)))
  metrics = evaluation.make_evaluator(config, model, mesh)(variables)
  scores = sorted(metrics['image_miou'].items())
  return {'__confusion__': metrics['confusion'], '__image_miou__': np.asarray(scores)}


if __name__ == '__main__':
  main()
