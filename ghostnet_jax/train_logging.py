"""Where training metrics go: stdout (tqdm), TensorBoard, a CSV and a plot.

Only process 0 writes; on every other process :class:`MetricsLogger` does
nothing. Files in the workdir:

* ``metrics.csv``: one row per logged step, columns :data:`CSV_COLUMNS`
  (empty where a value was not measured at that step);
* ``tensorboard/``: event files (``tensorboardX``), one scalar per column;
* ``metrics.png``: loss, top-1 and learning-rate curves, drawn at the end.

On resume from step ``s`` rows and events after ``s`` (written by a run that
was stopped after its last checkpoint) are dropped, so the files describe the
run as if it had not been interrupted.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Mapping

CSV_NAME = 'metrics.csv'
PLOT_NAME = 'metrics.png'
TENSORBOARD_DIR = 'tensorboard'
CSV_COLUMNS = ('step', 'epoch', 'train_loss', 'train_top1', 'learning_rate',
               'grad_norm', 'img_per_sec', 'step_time', 'eval_loss',
               'eval_top1', 'eval_top5')


class MetricsLogger:
  """Writes metrics to stdout, TensorBoard and CSV on process 0.

  Args:
    workdir: run directory.
    total_steps: steps of the whole run (progress bar length).
    start_step: first step of this process's run (resume point).
    enabled: False on processes other than 0.
    progress: show a tqdm progress bar (stdout lines are written either way).
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               enabled: bool = True, progress: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self.csv_path = os.path.join(workdir, CSV_NAME)
    self._bar = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_csv(start_step)
    new_file = not os.path.exists(self.csv_path)
    self._csv_file = open(self.csv_path, 'a', newline='')
    self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS)
    if new_file:
      self._csv.writeheader()
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                             purge_step=start_step if start_step else None)
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step',
                       dynamic_ncols=True, file=sys.stdout, leave=True)

  def _truncate_csv(self, start_step: int) -> None:
    if not os.path.exists(self.csv_path):
      return
    with open(self.csv_path, newline='') as f:
      rows = [r for r in csv.DictReader(f) if int(r['step']) <= start_step]
    with open(self.csv_path, 'w', newline='') as f:
      writer = csv.DictWriter(f, CSV_COLUMNS)
      writer.writeheader()
      writer.writerows(rows)

  def write(self, step: int, metrics: Mapping[str, float],
            echo: bool = True) -> None:
    """Records ``metrics`` (names from :data:`CSV_COLUMNS`) at ``step``."""
    if not self.enabled:
      return
    unknown = set(metrics) - set(CSV_COLUMNS)
    if unknown:
      raise KeyError(f'Unknown metric names {sorted(unknown)}.')
    row = {'step': step, **{k: _fmt(v) for k, v in metrics.items()}}
    self._csv.writerow(row)
    self._csv_file.flush()
    for k, v in metrics.items():
      if k != 'epoch':
        self._tb.add_scalar(k, float(v), step)
    if echo:
      self.print(f'step {step}: ' + ', '.join(
          f'{k} {_fmt(v)}' for k, v in metrics.items()))

  def update(self, n: int = 1, **postfix: float) -> None:
    """Advances the progress bar by ``n`` steps."""
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()},
                              refresh=False)
      self._bar.update(n)

  def print(self, text: str) -> None:
    """A line on stdout that does not break the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._csv_file.close()


def _fmt(v: float) -> str:
  if isinstance(v, int):
    return str(v)
  return f'{float(v):.6g}'


def plot_metrics(csv_path: str, png_path: str) -> str:
  """Draws the loss, top-1 and learning-rate curves of ``csv_path``.

  Returns:
    ``png_path``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))

  def series(name):
    pts = [(int(r['step']), float(r[name])) for r in rows if r.get(name)]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (('loss', ('train_loss', 'eval_loss')),
            ('top-1 (%)', ('train_top1', 'eval_top1', 'eval_top5')),
            ('learning rate', ('learning_rate',)))
  for ax, (title, names) in zip(axes, panels):
    for name in names:
      x, y = series(name)
      if x:
        if 'top' in name:
          y = [100 * v for v in y]
        ax.plot(x, y, marker='o' if name.startswith('eval') else None,
                markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return png_path
