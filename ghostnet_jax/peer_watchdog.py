"""A lost peer process ends a multi-process run in bounded time.

When one process of a multi-process job dies (kill -9, a lost host), the
others block inside a collective (gloo / ICI all-reduce) that never
completes: no Python code runs in the main thread, so no error can be
raised there. :class:`PeerWatchdog` runs a daemon thread on every process:

* every :data:`HEARTBEAT_S` seconds it touches
  ``workdir/peers/process_<i>`` (the workdir is shared by the processes of
  a job, as its checkpoints are);
* it reads the other processes' files: a file not touched for
  :data:`PEER_TIMEOUT_S` seconds, or one saying ``exited`` (the process
  left with an error), means the peer is lost. The watchdog prints
  ``error: lost peer process <j> ...`` naming it and how to resume, and
  exits the process with status :data:`EXIT_PEER_LOST` (``os._exit``: the
  main thread is stuck in the collective).

So a survivor exits at most ``PEER_TIMEOUT_S + HEARTBEAT_S`` seconds after
its peer died (75 s by default; ``GHOSTNET_PEER_TIMEOUT_S`` and
``GHOSTNET_PEER_HEARTBEAT_S`` override). A process that finished its run
writes ``done`` and is not waited for. Restarting every process resumes
from the last checkpoint as usual. Single-process runs start no watchdog;
nor do workdirs that are not local paths (``gs://...``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

HEARTBEAT_S = float(os.environ.get('GHOSTNET_PEER_HEARTBEAT_S', 5))
PEER_TIMEOUT_S = float(os.environ.get('GHOSTNET_PEER_TIMEOUT_S', 60))
EXIT_PEER_LOST = 75
PEERS_DIR = 'peers'


def _path(workdir: str, index: int) -> str:
  return os.path.join(workdir, PEERS_DIR, f'process_{index}')


def _write(path: str, text: str) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class PeerWatchdog:
  """See the module docstring. ``done()`` when this process's run ended."""

  def __init__(self, workdir: str, index: int, count: int,
               on_lost=None):
    self.workdir, self.index, self.count = workdir, index, count
    self._on_lost = on_lost or _exit_lost
    self._stop = threading.Event()
    self._start = time.time()
    os.makedirs(os.path.join(workdir, PEERS_DIR), exist_ok=True)
    _write(_path(workdir, index), f'alive {os.getpid()}\n')
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='peer-watchdog')
    self._thread.start()
    atexit.register(self._at_exit)

  def lost_peer(self, now: float | None = None) -> str | None:
    """A description of a lost peer, or None if all look alive."""
    now = time.time() if now is None else now
    for j in range(self.count):
      if j == self.index:
        continue
      p = _path(self.workdir, j)
      try:
        with open(p) as f:
          state = f.read().strip()
        mtime = os.path.getmtime(p)
      except OSError:
        state, mtime = 'absent', 0.0
      if mtime < self._start - 2 * HEARTBEAT_S:
        # Not (re)started yet, or a file of an earlier run: give it the
        # timeout from our own start.
        state, mtime = 'absent', self._start
      age = now - mtime
      if state.startswith('done'):
        continue
      if state.startswith('exited'):
        return f'process {j} exited with an error ({p})'
      if age > PEER_TIMEOUT_S:
        return (f'process {j} stopped responding: no heartbeat for '
                f'{age:.0f}s (> {PEER_TIMEOUT_S:.0f}s; {p}, {state})')
    return None

  def _run(self):
    me = _path(self.workdir, self.index)
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(me)
      except OSError:
        pass
      lost = self.lost_peer()
      if lost is not None and not self._stop.is_set():
        self._on_lost(lost, self.workdir)
        return

  def done(self) -> None:
    """This process finished its run: peers stop watching it."""
    self._stop.set()
    try:
      _write(_path(self.workdir, self.index), 'done\n')
    except OSError:
      pass

  def _at_exit(self) -> None:
    if not self._stop.is_set():  # leaving without done(): an error
      self._stop.set()
      try:
        _write(_path(self.workdir, self.index), 'exited\n')
      except OSError:
        pass


def _exit_lost(description: str, workdir: str) -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  msg = (f'error: lost peer process: {description}. This process cannot '
         'go on alone (it would wait in a collective forever) and exits. '
         f'Restart every process of the job with the same command to resume '
         f'from the last checkpoint in {workdir}.\n')
  os.write(2, msg.encode())
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


def start(workdir: str, index: int, count: int) -> PeerWatchdog | None:
  """A watchdog for multi-process runs on a local workdir; else None."""
  if count <= 1 or '://' in workdir:
    return None
  return PeerWatchdog(workdir, index, count)
