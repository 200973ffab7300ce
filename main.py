"""Train or evaluate a registered segmentation model (config.model.name).

  python main.py --config=configs/synthetic_t.py            # workdir runs/synthetic_t
  python main.py --config=configs/ade20k_t.py \\
      --config.data.root=data/ade/ADEChallengeData2016 --config.init=eformer_s1_450.pth
  python main.py --config=configs/ade20k_t.py --mode=eval --config.init=cgrseg_t.pth

--workdir defaults to runs/<config file name without .py> (printed at start).
Training resumes from <workdir>/checkpoints when a checkpoint is there.
Several processes (TPU pod, Slurm, or explicit --coordinator_address/
--num_processes/--process_id) call jax.distributed.initialize() first.

Errors a user can act on (bad config, data, checkpoint, conversion: the types
in cgrseg_jax/errors.py) print one line and exit with status 2; --verbose adds
the traceback. Anything else is a bug and keeps its traceback.
"""

import json
import logging
import os
import sys

from cgrseg_jax import host_memory

if __name__ == '__main__':
  # Restart with huge pages for XLA's temporaries (17% faster CPU training steps,
  # see host_memory.py) before anything heavy is imported: the restart repeats it.
  host_memory.reexec_with_huge_pages()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cgrseg_jax import aot, errors, evaluation, storage, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/synthetic_t.py', 'Training configuration.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics (default runs/<config name>).')
flags.DEFINE_enum(
  'mode', 'train', ['train', 'eval', 'compile'], 'train (resumes automatically), eval, or compile (for --topology).'
)
flags.DEFINE_string('topology', None, '--mode=compile: the TPU slice to compile for, e.g. v5e:2x2 (aot.py).')
flags.DEFINE_integer('per_chip_batch', None, '--mode=compile: batch per device (default: batch_size / devices).')
flags.DEFINE_bool('find_max_batch', False, '--mode=compile: also search the largest batch per device that fits.')
flags.DEFINE_enum(
  'distributed',
  'auto',
  ['auto', 'on', 'off'],
  'jax.distributed.initialize(): auto = when Slurm/TPU-pod/explicit flags say there are several processes.',
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process without Slurm/TPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process (0-based).')
flags.DEFINE_bool('verbose', False, 'Print the full traceback of expected errors (config, data, checkpoint) too.')

USER_ERROR_EXIT = 2


def _want_distributed() -> bool:
  if FLAGS.distributed != 'auto':
    return FLAGS.distributed == 'on'
  if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
    return True
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  # Multi-host TPU slices expose their worker list.
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def _drop_traceback(record: logging.LogRecord) -> bool:
  record.exc_info, record.exc_text = None, None
  return True


def default_workdir(config_path: str) -> str:
  """mmseg's work_dirs/<config>: runs/<config file stem>."""
  return os.path.join('runs', os.path.splitext(os.path.basename(config_path.split(':')[0]))[0])


def main(argv):
  del argv
  if FLAGS.mode == 'compile' and 'JAX_PLATFORMS' not in os.environ:
    jax.config.update('jax_platforms', 'cpu')  # the host only compiles; libtpu is for the target
  if _want_distributed():
    # Cross-process collectives on CPU need gloo; no effect on GPU/TPU backends.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
    )
  logging.basicConfig(level=logging.INFO, format=f'%(asctime)s [p{jax.process_index()}] %(message)s', stream=sys.stderr)
  for noisy in ('absl', 'orbax', 'jax._src'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
    if not FLAGS.verbose:  # orbax logs a failed background write with its traceback; the error says it in one line
      logging.getLogger(noisy).addFilter(_drop_traceback)
  if FLAGS.verbose:  # also what the abandoned reads of a damaged checkpoint report (checkpointing.py)
    logging.getLogger('cgrseg_jax.checkpointing').setLevel(logging.DEBUG)

  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']))
  logging.info('workdir: %s', workdir)
  try:
    if FLAGS.mode == 'compile':
      if not FLAGS.topology:
        raise errors.ConfigError('--mode=compile needs --topology (e.g. --topology=v5e:2x2)')
      report = aot.run(FLAGS.config, FLAGS.topology, ('train', 'eval'), FLAGS.per_chip_batch, FLAGS.find_max_batch)
      print(aot.format_report(report))
      storage.path(workdir).mkdir(parents=True, exist_ok=True)
      (storage.path(workdir) / f'aot_{FLAGS.topology.replace(":", "_")}.json').write_text(json.dumps(report, indent=2))
    elif FLAGS.mode == 'eval':
      evaluation.run(FLAGS.config, workdir)
    else:
      result = train.train_and_evaluate(FLAGS.config, workdir)
      logging.info('finished at step %d (%s)', result['step'], result['status'])
  except errors.UserError as e:
    if FLAGS.verbose:
      raise
    print(f'error ({type(e).__name__}): {e}', file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


if __name__ == '__main__':
  app.run(main)
