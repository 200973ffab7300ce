"""What an evaluation writes beside its metrics, to `<workdir>/eval/<step>/` (local or gs://):

  confusion.json   class names, `counts` (K x K; rows ground truth, columns
                   prediction, ignore pixels left out), `rates` (each row
                   divided by its ground-truth pixels), the most confused pairs
  confusion.png    heatmap of the rates: every class for up to MAX_CLASSES_SHOWN
                   classes, else the classes of the most confused pairs, on a
                   log colour scale, beside a bar chart of those pairs
  worst.json       the N images of lowest mIoU (over the classes in their label
                   or prediction): rank, sample index, id, mIoU
  worst_<rank>_<index>.png   image | ground truth | prediction | errors

Only process 0 writes. The panels' predictions are recomputed with
`inference.Segmenter` by the evaluator (`predict_records`).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Optional, Sequence

import cv2
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from cgrseg_jax import inference, storage

MAX_CLASSES_SHOWN = 30
TOP_PAIRS = 20
# Error map: wrong pixels in red over the darkened image, ignore pixels white.
WRONG_RGB = (230, 25, 25)
IGNORE_RGB = (255, 255, 255)
PANEL_HEIGHT = 256


def row_rates(counts: np.ndarray) -> np.ndarray:
  """Each row of `counts` over its sum (0 for a class with no ground-truth pixel)."""
  rows = counts.sum(1, keepdims=True)
  return np.divide(counts, rows, out=np.zeros(counts.shape, np.float64), where=rows > 0)


def top_confusions(counts: np.ndarray, class_names: Sequence[str], n: int = TOP_PAIRS) -> list[dict]:
  """The `n` largest off-diagonal rates (ground truth -> predicted), largest first."""
  rates = row_rates(counts)
  off = rates.copy()
  np.fill_diagonal(off, 0.0)
  order = np.argsort(-off, axis=None, kind='stable')[:n]
  pairs = []
  for flat in order:
    t, p = divmod(int(flat), len(counts))
    if off[t, p] <= 0:
      break
    pairs.append(
      {'label': class_names[t], 'predicted': class_names[p], 'rate': float(off[t, p]), 'pixels': int(counts[t, p])}
    )
  return pairs


def confusion_figure(counts: np.ndarray, class_names: Sequence[str]) -> bytes:
  """PNG bytes of the heatmap and the top-pairs chart."""
  k = len(counts)
  rates = row_rates(counts)
  pairs = top_confusions(counts, class_names)
  if k <= MAX_CLASSES_SHOWN:
    shown = list(range(k))
    title = 'confusion (rows: ground truth, share of its pixels)'
  else:  # the classes of the top pairs, in class order
    index = {n: i for i, n in enumerate(class_names)}
    shown = sorted({index[p[key]] for p in pairs for key in ('label', 'predicted')})[:MAX_CLASSES_SHOWN]
    title = f'confusion of the {len(shown)} classes in the top pairs (of {k})'
  sub = rates[np.ix_(shown, shown)]
  names = [class_names[i] for i in shown]
  m = max(len(shown), 1)
  side = min(max(4.0, 0.32 * m + 2.0), 14.0)
  fig = Figure(figsize=(side + 6.5, side), dpi=100)
  ax, bars = fig.subplots(1, 2, gridspec_kw={'width_ratios': [side, 4.5]})
  floor = 1e-4
  im = ax.imshow(np.maximum(sub, floor), cmap='viridis', norm=LogNorm(vmin=floor, vmax=1.0), interpolation='nearest')
  ax.set_xticks(range(len(shown)), names, rotation=90, fontsize=7)
  ax.set_yticks(range(len(shown)), names, fontsize=7)
  ax.set_xlabel('predicted')
  ax.set_ylabel('ground truth')
  ax.set_title(title, fontsize=9)
  if len(shown) <= 12:
    for i in range(len(shown)):
      for j in range(len(shown)):
        ax.text(j, i, f'{100 * sub[i, j]:.0f}', ha='center', va='center', fontsize=7, color='w')
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label='rate (log scale)')
  if pairs:
    labels = [f'{p["label"]} -> {p["predicted"]}' for p in pairs][::-1]
    bars.barh(range(len(pairs)), [100 * p['rate'] for p in pairs][::-1], color='tab:red')
    bars.set_yticks(range(len(pairs)), labels, fontsize=7)
    bars.set_xlabel('% of the ground-truth class')
  bars.set_title(f'top {len(pairs)} confusions', fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()


def write_confusion(outdir, counts: np.ndarray, class_names: Sequence[str]) -> None:
  outdir = storage.path(outdir)
  counts = np.asarray(counts, np.int64)
  record = {
    'class_names': list(class_names),
    'counts': counts.tolist(),
    'rates': np.round(row_rates(counts), 6).tolist(),
    'top_confusions': top_confusions(counts, class_names),
  }
  (outdir / 'confusion.json').write_text(json.dumps(record))
  (outdir / 'confusion.png').write_bytes(confusion_figure(counts, class_names))


def worst_images(image_miou: dict, n: int) -> list[tuple[int, float]]:
  """The `n` (index, mIoU) of lowest mIoU, lowest first (ties: lower index
  first); images without a valid pixel (NaN) are left out."""
  scored = [(i, s) for i, s in image_miou.items() if not math.isnan(s)]
  return sorted(scored, key=lambda t: (t[1], t[0]))[:n]


def sample_id(source, index: int) -> str:
  """The image file name of a folder source's sample, else its index."""
  while not hasattr(source, 'image_paths') and hasattr(source, 'source'):
    source = source.source  # a wrapper (first n images, checked source)
  paths = getattr(source, 'image_paths', None)
  return os.path.basename(paths[index]) if paths else str(index)


def _caption(width: int, text: str) -> np.ndarray:
  strip = np.full((22, width, 3), 255, np.uint8)
  cv2.putText(strip, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
  return strip


def panel(
  image_rgb: np.ndarray, label: np.ndarray, pred: np.ndarray, palette: np.ndarray, ignore_index: int, title: str
) -> np.ndarray:
  """RGB uint8 image | ground truth | prediction | errors, each PANEL_HEIGHT rows, with captions."""
  ignore = label == ignore_index
  gt = inference.colorize(np.where(ignore, 0, label), palette)
  gt[ignore] = IGNORE_RGB
  errors = (0.35 * image_rgb.astype(np.float32)).astype(np.uint8)
  errors[(pred != label) & ~ignore] = WRONG_RGB
  errors[ignore] = IGNORE_RGB
  parts = [image_rgb, gt, inference.colorize(pred, palette), errors]
  h, w = label.shape
  size = (max(1, round(w * PANEL_HEIGHT / h)), PANEL_HEIGHT)
  parts = [cv2.resize(p, size, interpolation=cv2.INTER_NEAREST if i else cv2.INTER_AREA) for i, p in enumerate(parts)]
  heads = ['image', 'ground truth', 'prediction', 'errors (red; white: ignored)']
  columns = [np.concatenate([_caption(size[0], t), p]) for t, p in zip(heads, parts)]
  body = np.concatenate(columns, axis=1)
  return np.concatenate([_caption(body.shape[1], title), body])


def write_worst(
  outdir, entries: list[dict], predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]], palette, ignore_index
) -> None:
  """worst.json of `entries` ({rank, index, id, mIoU}) and a panel per entry
  from its (RGB image, label, prediction)."""
  outdir = storage.path(outdir)
  (outdir / 'worst.json').write_text(json.dumps(entries, indent=1))
  for e, (image, label, pred) in zip(entries, predictions):
    name = f'sample {e["index"]}' + (f' ({e["id"]})' if e['id'] != str(e['index']) else '')
    title = f'#{e["rank"]}  {name}  mIoU {100 * e["mIoU"]:.2f}'
    rgb = panel(image, label, pred, np.asarray(palette, np.uint8), ignore_index, title)
    ok, data = cv2.imencode('.png', rgb[..., ::-1])
    if not ok:
      raise RuntimeError(f'cannot encode the panel of sample {e["index"]}')
    (outdir / f'worst_{e["rank"]:02d}_{e["index"]}.png').write_bytes(data.tobytes())


def write_report(outdir, metrics: dict, evaluator, variables, num_worst: int, class_names: Optional[Sequence[str]]):
  """Confusion and worst images of one evaluation (`metrics` from an evaluator,
  with `confusion` and `image_miou`) into `outdir`."""
  outdir = storage.path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  counts = metrics['confusion']
  names = list(class_names) if class_names else [str(i) for i in range(len(counts))]
  write_confusion(outdir, counts, names)
  if num_worst <= 0:
    return
  worst = worst_images(metrics['image_miou'], num_worst)
  data = evaluator.data
  entries = [
    {'rank': r + 1, 'index': int(i), 'id': sample_id(data.source, i), 'mIoU': float(s)}
    for r, (i, s) in enumerate(worst)
  ]
  predictions = evaluator.predict_records(variables, [e['index'] for e in entries])
  write_worst(outdir, entries, predictions, data.info.palette, data.info.ignore_index)
