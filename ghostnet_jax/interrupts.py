"""Ctrl-C (SIGINT) and SIGTERM: stop at a step boundary, keep the work.

In the training loop (:class:`Interrupts`, single process) both signals
set a flag the loop polls after each step: it saves a checkpoint of that
step and returns (``train.py`` then exits 0 after SIGTERM, 130 after
SIGINT). A signal that arrives while a step compiles or runs, or while the
loop evaluates, takes effect when that step (or evaluation) is done: no
Python exception is raised inside XLA, so there is no traceback and no
``Fatal Python error``. A **second** SIGINT exits at once (status 130)
without saving; the checkpoints committed before are intact, and a
half-written one is ignored and removed by the next run.

``train.py`` installs :func:`install_cli_handler` first: a Ctrl-C during
start-up (data, model, restore) is remembered and honoured at the first step
boundary. ``eval.py`` uses :func:`exit_on_interrupt`: nothing to save, so
it exits at once, cleanly.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

_pending: dict = {'signal': None}


def _say(text: str) -> None:
  """Writes to stderr from a signal handler (no buffered-IO reentrancy)."""
  try:
    os.write(2, (text + '\n').encode())
  except OSError:
    pass


def exit_now(what: str = 'the run') -> None:
  """Flushes stdout/stderr and leaves without Python's teardown (XLA
  threads may still be running; tearing them down is what segfaulted)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  _say(f'Interrupted again: {what} exits now without saving (the '
       'checkpoints committed before are intact; rerun the same command to '
       'resume from the latest one).')
  os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access


def _cli_handler(signum, frame):
  del signum, frame
  if _pending['signal'] is not None:
    exit_now('train.py')
  _pending['signal'] = 'SIGINT'
  _say('Interrupted (Ctrl-C): training will save a checkpoint at the first '
       'step boundary and exit; press Ctrl-C again to exit at once without '
       'saving.')


def install_cli_handler() -> None:
  """``train.py``: a Ctrl-C before the loop starts is kept for the loop."""
  try:
    signal.signal(signal.SIGINT, _cli_handler)
  except ValueError:  # not the main thread
    pass


class Interrupts:
  """SIGTERM and SIGINT -> a flag the training loop polls.

  Attributes:
    requested: a stop was asked for (by a signal, or a Ctrl-C during
      start-up when :func:`install_cli_handler` was installed).
    signal_name: ``'SIGINT'`` or ``'SIGTERM'`` (None until requested).

  Only installed for a single process: with several, JAX's preemption sync
  point makes every process stop at the same step, and a handler of our own
  would let processes disagree.
  """

  def __init__(self, enable: bool):
    self.requested = False
    self.signal_name = None
    self._previous = {}
    if not enable:
      return
    if _pending['signal'] is not None:  # a Ctrl-C during start-up
      self.requested, self.signal_name = True, _pending['signal']
      _pending['signal'] = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      exit_now()
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      _say('Interrupted (Ctrl-C): saving a checkpoint when this step is done, '
           'then exiting; press Ctrl-C again to exit at once without saving.')

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def message(self, step: int, directory) -> str:
    """What the loop prints after the save of ``step``."""
    if self.signal_name == 'SIGINT':
      return (f'Interrupted (Ctrl-C) at step {step}: checkpoint saved in '
              f'{directory}; rerun the same command to resume.')
    return (f'Preempted at step {step}: checkpoint saved in {directory}; '
            'rerun the same command to resume.')


def exit_code(final: dict) -> int:
  """``train.py``'s exit status for ``train_and_evaluate``'s result."""
  return EXIT_INTERRUPTED if final.get('interrupted_by') == 'SIGINT' else 0


def exit_on_interrupt(what: str) -> None:
  """``eval.py``: Ctrl-C prints one line and exits 130 at once."""

  def handler(signum, frame):
    del signum, frame
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    _say(f'Interrupted (Ctrl-C): {what} stopped; nothing was written.')
    os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access

  try:
    signal.signal(signal.SIGINT, handler)
  except ValueError:
    pass
