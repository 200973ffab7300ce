"""Training curves of one or more runs (mmseg's analyze_logs.py): loss, learning
rate and validation mIoU / mAcc against step, the runs overlaid.

Reads `<RUN>/metrics.jsonl` (local or gs://; a path to the file itself works
too) and writes loss.png, lr.png and val.png to --out.

    python scripts/plot_metrics.py runs/a runs/b --out=plots [--labels=base,ours]
"""

from __future__ import annotations

import argparse
import json
import sys

from matplotlib.figure import Figure

from cgrseg_jax import storage

# (file, title, [(split, key, line style)], y label)
PLOTS = [
  ('loss.png', 'training loss', [('train', 'loss', '-')], 'loss'),
  ('lr.png', 'learning rate', [('train', 'lr', '-')], 'lr'),
  ('val.png', 'validation', [('val', 'mIoU', '-'), ('val', 'mAcc', '--')], 'mIoU (solid), mAcc (dashed)'),
]


class MetricsError(Exception):
  pass


def read_run(run: str) -> list[dict]:
  p = storage.path(run)
  if p.name != 'metrics.jsonl':
    p = p / 'metrics.jsonl'
  if not p.exists():
    raise MetricsError(f'{p}: no such file (expected a run directory with metrics.jsonl)')
  records = []
  for n, line in enumerate(p.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise MetricsError(f'{p}:{n}: not a JSON line ({e.msg})') from None
    if 'step' not in rec or 'split' not in rec:
      raise MetricsError(f'{p}:{n}: a record without "step" and "split"')
    records.append(rec)
  return records


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` in the `split` records; a resumed run's repeated steps keep the last value."""
  by_step = {r['step']: float(r[key]) for r in records if r['split'] == split and key in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def run_label(run: str) -> str:
  p = storage.path(run)
  return p.parent.name if p.name == 'metrics.jsonl' else p.name


def plot(runs: list[tuple[str, list[dict]]], out) -> list[str]:
  """PLOTS of (label, records) runs into `out`; returns the written paths."""
  out = storage.path(out)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name, title, lines, ylabel in PLOTS:
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.subplots()
    drawn = 0
    for i, (label, records) in enumerate(runs):
      color = f'C{i % 10}'
      for split, key, style in lines:
        steps, values = series(records, split, key)
        if steps:
          marker = 'o' if len(steps) < 30 else None
          ax.plot(steps, values, style, color=color, marker=marker, ms=3, label=f'{label} {key}')
          drawn += 1
    if not drawn:
      continue  # e.g. no evaluation in these runs
    if name == 'lr.png':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with (out / name).open('wb') as f:
      fig.savefig(f, format='png')
    written.append(str(out / name))
  return written


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('runs', nargs='+', help='run directories (or metrics.jsonl files), local or gs://')
  p.add_argument('--out', default='plots', help='directory for the PNGs')
  p.add_argument('--labels', help='comma-separated legend names, one per run (default: the directory names)')
  args = p.parse_args(argv)
  labels = args.labels.split(',') if args.labels else [run_label(r) for r in args.runs]
  if len(labels) != len(args.runs):
    p.error(f'--labels has {len(labels)} names for {len(args.runs)} runs')
  try:
    runs = [(label, read_run(r)) for label, r in zip(labels, args.runs)]
  except MetricsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for path in plot(runs, args.out):
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
