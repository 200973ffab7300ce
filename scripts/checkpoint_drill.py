"""Kill drill: SIGKILL a short training run at random moments, resume it each
time, and check that the final weights are bit-identical to a run that was
never interrupted (issue 12; run by hand, not part of the tests).

  python scripts/checkpoint_drill.py --kills=10 --workdir=/tmp/drill

Each attempt runs main.py on the same workdir and is killed at a random
moment: every third kill anywhere in start-up (restore, compilation), the
others after training resumed, at a delay drawn from [0, the training time
still to go), so they land in steps and asynchronous saves (and the
deletions of old checkpoints, keep_checkpoints=2). After the last kill the run
is left to finish. Compilation is cached on disk to keep attempts short.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  '--config=configs/synthetic_t.py',
  '--config.model.name=cgrseg_tiny',
  '--config.data.synthetic.image_size=(64,80)',
  '--config.data.synthetic.num_train=64',
  '--config.data.synthetic.num_val=8',
  '--config.data.img_scale=(80,64)',
  '--config.data.crop_size=(64,64)',
  '--config.batch_size=2',
  '--config.eval_every=-1',
  '--config.log_every=1',
  '--config.progress_bar=False',
  '--config.schedule.warmup_steps=0',
  '--config.optimizer.lr=1e-4',
]


def run(workdir, args, env, log, kill=None):
  """main.py on `workdir`. kill=(after_training_started, delay): SIGKILL `delay` seconds after
  start, or after the first training step was logged. Returns (exit code, seconds to the first step, seconds)."""
  cmd = [sys.executable, 'main.py', f'--workdir={workdir}', *FLAGS, *args]
  t = time.time()
  first_step = None
  with open(log, 'w') as f:
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    while p.poll() is None:
      time.sleep(0.05)
      now = time.time()
      if first_step is None and re.search(r'\] step \d+/', open(log).read()):
        first_step = now - t
      if kill is not None:
        after_start, delay = kill
        start = first_step if after_start else 0.0
        if start is not None and now - t >= start + delay:
          p.send_signal(signal.SIGKILL)
          p.wait()
          return -signal.SIGKILL, first_step, now - t
    return p.returncode, first_step, time.time() - t


def final_state(workdir, step):
  import orbax.checkpoint as ocp

  import jax

  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--kills', type=int, default=10)
  ap.add_argument('--steps', type=int, default=12)
  ap.add_argument('--checkpoint_every', type=int, default=2)
  ap.add_argument('--seed', type=int, default=0)
  a = ap.parse_args()
  rng = random.Random(a.seed)
  shutil.rmtree(a.workdir, ignore_errors=True)
  os.makedirs(a.workdir)
  env = dict(
    os.environ,
    PYTHONPATH=REPO,
    JAX_COMPILATION_CACHE_DIR=os.path.join(a.workdir, 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  args = [f'--config.total_steps={a.steps}', f'--config.checkpoint_every={a.checkpoint_every}']
  ref, drill = os.path.join(a.workdir, 'straight'), os.path.join(a.workdir, 'killed')
  run(ref, args, env, os.path.join(a.workdir, 'warmup.log'))  # fills the compilation cache
  shutil.rmtree(ref)
  code, startup, duration = run(ref, args, env, os.path.join(a.workdir, 'straight.log'))
  assert code == 0, f'uninterrupted run failed, see {a.workdir}/straight.log'
  print(f'uninterrupted run: {duration:.1f}s, first step logged at {startup:.1f}s')

  kills, attempt, records, steps = 0, 0, [], []
  while True:
    attempt += 1
    kill = None
    if kills < a.kills:
      after_start = kills % 3 != 0
      left = (duration - startup) * (a.steps - max(steps, default=0)) / a.steps  # training time still to go
      kill = (after_start, rng.uniform(0, left if after_start else startup))
    log = os.path.join(a.workdir, f'attempt{attempt}.log')
    code, _, took = run(drill, args, env, log, kill=kill)
    text = open(log).read()
    resumed = [l.split('checkpoints/')[-1].strip() for l in text.splitlines() if 'resumed from' in l]
    steps = (
      [int(s) for s in os.listdir(os.path.join(drill, 'checkpoints')) if s.isdigit()]
      if os.path.isdir(os.path.join(drill, 'checkpoints'))
      else []
    )
    rec = dict(
      attempt=attempt,
      kill=kill and ('after first step' if kill[0] else 'after start', round(kill[1], 2)),
      exit=code,
      resumed_from=resumed[0] if resumed else None,
      steps_on_disk=sorted(steps),
      damaged='damaged' in text,
    )
    records.append(rec)
    print(json.dumps(rec))
    if code == 0:
      break
    assert code == -signal.SIGKILL, f'attempt {attempt} failed by itself (exit {code}), see {log}'
    kills += 1
  want, got = final_state(ref, a.steps), final_state(drill, a.steps)
  same = want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  print(
    f'{kills} kills, {attempt} attempts; final state (params, batch_stats, optimizer, step, rng) bit-identical: {same}'
  )
  sys.exit(0 if same else 1)


if __name__ == '__main__':
  main()
