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

Only one process writes a workdir (:mod:`ghostnet_jax.workdir_lock`), so
rows never interleave. Readers (:func:`read_metrics_rows`, the resume
truncation, :func:`plot_metrics`) still tolerate what a crashed or older run
leaves: a partial last line, a repeated header, rows that do not parse are
skipped and counted. Nothing here may turn a finished run into a failure:
:func:`finish_report` and :meth:`MetricsLogger.close` report problems instead
of raising.
"""

from __future__ import annotations

import csv
import os
import sys
import time
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
    try:
      rows, skipped = read_metrics_rows(self.csv_path)
    except ValueError as e:  # not a metrics CSV at all: keep it, start anew
      aside = f'{self.csv_path}.malformed.{int(time.time())}'
      os.replace(self.csv_path, aside)
      self.print(f'{e} It was moved to {aside}; a new {CSV_NAME} starts.')
      return
    rows = [r for r in rows if int(r['step']) <= start_step]
    if skipped:
      self.print(f'{self.csv_path}: dropped {skipped} malformed line(s) '
                 '(a partial line or a repeated header left by an earlier run).')
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
    """Flushes and closes everything; a failure is printed, never raised
    (the run's work is done when this is called)."""
    if not self.enabled:
      return
    for name, closer in (('progress bar', self._bar),
                         ('TensorBoard writer', self._tb),
                         ('metrics CSV', self._csv_file)):
      if closer is None:
        continue
      try:
        closer.close()
      except Exception as e:  # pylint: disable=broad-except
        print(f'warning: could not close the {name} in {self.workdir}: '
              f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    self._bar = self._tb = None


def _fmt(v: float) -> str:
  if isinstance(v, int):
    return str(v)
  return f'{float(v):.6g}'


def _parse_row(row: dict) -> dict | None:
  """``row`` with a valid int step and float values, or None."""
  if None in row or any(v is None for v in row.values()):
    return None  # too many or too few fields: a partial or foreign line
  try:
    int(row['step'])
    for k, v in row.items():
      if k != 'step' and v:
        float(v)
  except (KeyError, TypeError, ValueError):
    return None
  return row


def read_metrics_rows(csv_path: str) -> tuple[list[dict], int]:
  """The good rows of a ``metrics.csv`` and how many lines were skipped.

  Skips what a crashed or concurrent run can leave: a partial last line, a
  second header, a row with a non-numeric value. Rows keep file order.

  Raises:
    OSError: the file cannot be read.
    ValueError: the first line is not the header this module writes.
  """
  with open(csv_path, newline='', errors='replace') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      return [], 0
    if not header or header[0] != 'step':
      raise ValueError(f'{csv_path} does not start with a metrics header '
                       f'(first line: {",".join(header)[:80]!r}).')
    rows, skipped = [], 0
    for fields in reader:
      if not fields:
        continue
      row = _parse_row(dict(zip(header, fields)) if len(fields) == len(
          header) else {None: fields})
      if row is None:
        skipped += 1
      else:
        rows.append(row)
  return rows, skipped


def plot_metrics(csv_path: str, png_path: str) -> str:
  """Draws the loss, top-1 and learning-rate curves of ``csv_path``.

  Malformed lines are skipped (:func:`read_metrics_rows`).

  Returns:
    ``png_path``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows, _ = read_metrics_rows(csv_path)

  def series(name):
    pts = [(int(r['step']), float(r[name])) for r in rows if r.get(name)]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (('loss (train: augmented, label-smoothed)',
             ('train_loss', 'eval_loss')),
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


def finish_report(csv_path: str, png_path: str) -> str:
  """Draws the plot after a finished run; never raises.

  Returns:
    What to print after ``plot:``: ``png_path``, with a note if malformed
    lines were skipped, or why no plot was drawn (the run's results stand).
  """
  try:
    _, skipped = read_metrics_rows(csv_path)
    plot_metrics(csv_path, png_path)
  except Exception as e:  # pylint: disable=broad-except
    return (f'not drawn: {csv_path} could not be plotted '
            f'({type(e).__name__}: {e}); the run itself finished and its '
            'checkpoints and final metrics are saved.')
  if skipped:
    return (f'{png_path} (skipped {skipped} malformed line(s) of {csv_path})')
  return png_path
