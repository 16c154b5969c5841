"""One writer per workdir: the lock ``train.py`` takes before it writes.

``workdir/train.lock`` is a small JSON file naming its holder (host, pid,
start time). Taking it:

1. ``fcntl.flock`` on the file, non-blocking. The kernel drops a flock when
   its process dies (also on ``kill -9``), so on one host a held flock means
   a live holder: the trainer is refused with :class:`WorkdirLockedError`
   naming the holder.
2. With the flock taken, the file's content says whether the last holder
   left cleanly (empty file) or died holding it:

   * **same host**: the recorded pid is checked (``/proc/<pid>/stat`` start
     time, so a reused pid does not count). A dead holder's lock is stale
     and taken over with a note; a live one (on a filesystem where flock is
     a no-op) is refused.
   * **another host** (shared filesystem; flock across hosts is not
     trusted): the holder refreshes the file's mtime every
     :data:`HEARTBEAT_S` seconds. A lock whose mtime is older than
     :data:`STALE_AFTER_S` is stale (the host is gone) and taken over;
     a fresher one is refused, saying when it will count as stale.

3. ``force=True`` (``--config.force_unlock=True``) takes the lock whatever
   the checks say, with a warning: for a holder you know is gone sooner
   than the heartbeat rule can tell.

The holder keeps the file open for its life; on a clean exit (``atexit``)
the file is emptied and unlocked. It is never deleted (deleting a flocked
file lets two processes hold locks on two different inodes). Evaluation
(``eval.py``, :func:`ghostnet_jax.checkpoint.restore_workdir`) only reads
and takes no lock.

In a process that already holds a workdir's lock, :func:`acquire` returns
the same lock (sequential runs in one process, e.g. tests).
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import socket
import threading
import time

LOCK_NAME = 'train.lock'
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # not POSIX: only the content rules apply
  fcntl = None


class WorkdirLockedError(RuntimeError):
  """Another live process writes into this workdir; names the holder."""

  def __init__(self, message: str, holder: dict | None = None):
    super().__init__(message)
    self.holder = holder or {}


def _proc_start_ticks(pid: int) -> int | None:
  """Start time of ``pid`` in clock ticks since boot (Linux), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces: split after its ')'.
  fields = stat.rsplit(')', 1)[-1].split()
  try:
    return int(fields[19])  # field 22 overall
  except (IndexError, ValueError):
    return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  if start_ticks is not None:
    now = _proc_start_ticks(pid)
    if now is not None and now != start_ticks:
      return False  # the pid was reused by another process
  return True


def describe(holder: dict) -> str:
  """``host myhost, pid 123, started 2026-01-01T10:00:00Z``."""
  return (f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, '
          f'started {holder.get("start_time", "?")}')


class WorkdirLock:
  """A held lock (see the module docstring). ``release()`` gives it back."""

  def __init__(self, path: str, fd: int, info: dict):
    self.path, self._fd, self.info = path, fd, info
    self.took_over: dict | None = None  # the stale holder replaced, if any
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name='workdir-lock-heartbeat')
    self._thread.start()

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self._fd if os.utime in os.supports_fd else self.path)
      except OSError:
        pass  # the next beat tries again; a missed beat only ages the lock

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    """Empties the file and unlocks it (idempotent)."""
    if self._fd is None:
      return
    self._stop.set()
    try:
      os.ftruncate(self._fd, 0)
      if fcntl is not None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None
      _HELD.pop(self.path, None)


_HELD: dict[str, WorkdirLock] = {}


def _read_holder(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  data = b''
  while chunk := os.read(fd, 65536):
    data += chunk
  if not data.strip():
    return None
  try:
    holder = json.loads(data)
  except ValueError:
    return {'unreadable': data[:200].decode('utf-8', 'replace')}
  return holder if isinstance(holder, dict) else {'unreadable': repr(holder)}


def _my_info() -> dict:
  return {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'pid_start_ticks': _proc_start_ticks(os.getpid()),
      'start_time': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%dT%H:%M:%SZ'),
  }


def _stale_reason(holder: dict, mtime: float, now: float) -> str | None:
  """Why a recorded holder is gone, or None if it may be alive."""
  if 'unreadable' in holder:
    return 'its content is unreadable'
  if holder.get('host') == socket.gethostname():
    pid = holder.get('pid')
    if not isinstance(pid, int) or not _pid_alive(
        pid, holder.get('pid_start_ticks')):
      return f'process {pid} is no longer running on this host'
    return None
  age = now - mtime
  if age > STALE_AFTER_S:
    return (f'its heartbeat is {age:.0f}s old (> {STALE_AFTER_S:.0f}s: the '
            'host is gone)')
  return None


def acquire(workdir: str, *, force: bool = False) -> WorkdirLock:
  """Takes ``workdir/train.lock`` (creating ``workdir``).

  Args:
    workdir: the run directory.
    force: take the lock even if it looks held (``config.force_unlock``).

  Returns:
    The held :class:`WorkdirLock`; ``took_over`` names a stale holder it
    replaced.

  Raises:
    WorkdirLockedError: another live process holds it; the message names
      host, pid and start time, and how to override.
  """
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  held = _HELD.get(path)
  if held is not None and held.held:
    return held
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    flocked = True
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        flocked = False
    holder = _read_holder(fd)
    if not flocked:
      reason = None  # the kernel says a live process holds it
    elif holder is None:
      reason = 'released'
    else:
      reason = _stale_reason(holder, os.fstat(fd).st_mtime, time.time())
    if reason is None and not force:
      holder = holder or {}
      extra = ''
      if holder.get('host') not in (None, socket.gethostname()):
        extra = (f' It counts as stale {STALE_AFTER_S:.0f}s after its last '
                 'heartbeat if that host is gone.')
      raise WorkdirLockedError(
          f'workdir {workdir} is in use by another training process '
          f'({describe(holder)}; lock file {path}). Two trainers in one '
          'workdir would overwrite each other\'s checkpoints and metrics: '
          'wait for it to finish or stop it, or use another --workdir.'
          + extra + ' If you are sure it is gone, pass '
          '--config.force_unlock=True. Nothing in the workdir was changed.',
          holder)
    info = _my_info()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info, sort_keys=True) + '\n').encode())
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    raise
  lock = WorkdirLock(path, fd, info)
  if holder is not None and reason != 'released':
    lock.took_over = {**holder, 'reason': reason or 'forced'}
  _HELD[path] = lock
  return lock


def acquire_for_run(workdir: str, *, force: bool, is_main: bool,
                    process_count: int, check=None, prepare=None,
                    log=print) -> WorkdirLock | None:
  """The trainer's lock: taken by process 0 only; every process raises if
  it could not be taken (so no process waits forever at a barrier).

  On process 0, ``check()`` runs first (the trainer proves the workdir
  writable there, so an unusable one gets its own clear error), and
  ``prepare()`` once the lock is held, before the other processes go on
  (the trainer sets bad checkpoints aside there).

  Args:
    workdir: the run directory.
    force: ``config.force_unlock``.
    is_main: this is process 0.
    process_count: ``jax.process_count()``.
    check, prepare: optional, see above; an exception in them is raised on
      every process.
    log: where the note about a stale lock taken over goes.

  Returns:
    The lock on process 0, None elsewhere.

  Raises:
    WorkdirLockedError: on every process, naming the holder.
  """
  lock, error = None, None
  if is_main:
    try:
      if check is not None:
        check()
      lock = acquire(workdir, force=force)
      if lock.took_over is not None:
        held = lock.took_over
        log(f'Took over the lock of {workdir} from {describe(held)}: '
            f'{held["reason"]}.')
      if prepare is not None:
        prepare()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  if process_count > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(multihost_utils.broadcast_one_to_all(
        np.int32(error is not None)))
    if failed and error is None:
      raise WorkdirLockedError(
          f'workdir {workdir}: process 0 could not take its lock or check '
          'its checkpoints (its error names the cause).')
  if error is not None:
    raise error
  return lock


@atexit.register
def _release_all() -> None:
  for lock in list(_HELD.values()):
    lock.release()
