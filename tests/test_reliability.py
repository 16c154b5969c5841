"""Reliability, round 2 (issue 17): fast unit tests of the new modules.

* :mod:`ghostnet_jax.workdir_lock`: one writer per workdir, stale locks;
* :mod:`ghostnet_jax.train_logging`: a metrics CSV with what crashes leave;
* :mod:`ghostnet_jax.integrity`: bit flips in every kind of checkpoint file
  are found, resume falls back, ``eval.py`` refuses;
* :mod:`ghostnet_jax.interrupts`: SIGINT like SIGTERM, a second one exits.

The runs of real trainers (two at once, kill -9, Ctrl-C) are in
tests/test_faults_reliability.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import train_test_utils
from ghostnet_jax import integrity
from ghostnet_jax import interrupts
from ghostnet_jax import train_logging
from ghostnet_jax import workdir_lock

ROOT = train_test_utils.ROOT


# ------------------------------------------------------------------------------
# Workdir lock
# ------------------------------------------------------------------------------

_HOLDER = r'''
import sys, time
sys.path.insert(0, {root!r})
from ghostnet_jax import workdir_lock
workdir_lock.acquire({workdir!r})
print('HELD', flush=True)
time.sleep(600)
'''


def _holder(workdir) -> subprocess.Popen:
  proc = subprocess.Popen(
      [sys.executable, '-c', _HOLDER.format(root=ROOT, workdir=str(workdir))],
      stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'HELD'
  return proc


def test_live_holder_is_named_then_kill_9_lock_is_taken_over(tmp_path):
  workdir = tmp_path / 'w'
  proc = _holder(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      workdir_lock.acquire(str(workdir))
    msg = str(e.value)
    for words in (f'host {socket.gethostname()}', f'pid {proc.pid}',
                  'started 20', 'force_unlock', 'Nothing in the workdir'):
      assert words in msg, (words, msg)
    assert e.value.holder['pid'] == proc.pid
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The holder died without releasing: its record names a dead pid.
  assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())[
      'pid'] == proc.pid
  lock = workdir_lock.acquire(str(workdir))
  try:
    assert lock.took_over['pid'] == proc.pid
    assert 'no longer running' in lock.took_over['reason']
    assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())[
        'pid'] == os.getpid()
    # Re-entrant within a process (sequential runs in one process).
    assert workdir_lock.acquire(str(workdir)) is lock
  finally:
    lock.release()
  assert (workdir / workdir_lock.LOCK_NAME).read_text() == ''
  again = workdir_lock.acquire(str(workdir))  # a released lock: no takeover
  assert again.took_over is None
  again.release()


def _foreign_lock(workdir, age_s: float) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lock.LOCK_NAME)
  with open(path, 'w') as f:
    json.dump({'host': 'other-host-7', 'pid': 4242,
               'start_time': '2026-01-01T00:00:00Z'}, f)
  t = time.time() - age_s
  os.utime(path, (t, t))


def test_other_host_lock_rule_heartbeat_and_force(tmp_path):
  workdir = str(tmp_path / 'w')
  _foreign_lock(workdir, age_s=10)  # a live heartbeat on another host
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=r'host other-host-7, pid 4242, started '
                     r'2026-01-01T00:00:00Z.*counts as stale 300s'):
    workdir_lock.acquire(workdir)
  forced = workdir_lock.acquire(workdir, force=True)
  assert forced.took_over['host'] == 'other-host-7'
  assert forced.took_over['reason'] == 'forced'
  forced.release()
  _foreign_lock(workdir, age_s=workdir_lock.STALE_AFTER_S + 60)
  stale = workdir_lock.acquire(workdir)
  assert 'heartbeat is' in stale.took_over['reason']
  stale.release()


def test_acquire_for_run_logs_takeover_and_runs_prepare(tmp_path):
  workdir = str(tmp_path / 'w')
  _foreign_lock(workdir, age_s=workdir_lock.STALE_AFTER_S + 60)
  notes, prepared = [], []
  lock = workdir_lock.acquire_for_run(
      workdir, force=False, is_main=True, process_count=1,
      prepare=lambda: prepared.append(1), log=notes.append)
  assert prepared == [1]
  assert notes and 'Took over the lock' in notes[0] and 'other-host-7' in notes[0]
  lock.release()
  # Other processes take no lock.
  assert workdir_lock.acquire_for_run(workdir, force=False, is_main=False,
                                      process_count=1) is None


# ------------------------------------------------------------------------------
# Metrics CSV: what a crash or a second writer leaves
# ------------------------------------------------------------------------------

def _csv_with_damage(path) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, train_logging.CSV_COLUMNS)
    w.writeheader()
    w.writerow({'step': 1, 'train_loss': '2.3', 'learning_rate': '0.1'})
    w.writeheader()  # a second writer's header
    w.writerow({'step': 2, 'train_loss': '2.2', 'learning_rate': '0.1'})
    f.write('3,0.1,2.1')  # a partial last line


def test_plot_and_resume_tolerate_a_second_header_and_partial_line(tmp_path):
  path = str(tmp_path / train_logging.CSV_NAME)
  _csv_with_damage(path)
  rows, skipped = train_logging.read_metrics_rows(path)
  assert [int(r['step']) for r in rows] == [1, 2] and skipped == 2
  png = str(tmp_path / 'm.png')
  report = train_logging.finish_report(path, png)
  assert os.path.getsize(png) > 0
  assert 'skipped 2 malformed line(s)' in report
  # Resuming from step 1 keeps row 1 and one clean header.
  logger = train_logging.MetricsLogger(str(tmp_path), total_steps=4,
                                       start_step=1, progress=False)
  logger.write(2, {'train_loss': 2.0})
  logger.close()
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith('step,') and sum(
      ln.startswith('step,') for ln in lines) == 1
  assert [ln.split(',')[0] for ln in lines[1:]] == ['1', '2']


def test_finish_report_never_raises(tmp_path):
  bad = tmp_path / 'metrics.csv'
  bad.write_bytes(b'\x00\xffgarbage\nnot,a,header\n')
  report = train_logging.finish_report(str(bad), str(tmp_path / 'm.png'))
  assert report.startswith('not drawn') and str(bad) in report
  report = train_logging.finish_report(str(tmp_path / 'missing.csv'),
                                       str(tmp_path / 'm.png'))
  assert report.startswith('not drawn') and 'missing.csv' in report


# ------------------------------------------------------------------------------
# Checkpoint integrity
# ------------------------------------------------------------------------------


def _tiny_state(seed):
  rs = np.random.RandomState(seed)
  params = {'conv': {'kernel': rs.randn(3, 3, 4, 8).astype(np.float32)},
            'head': {'bias': rs.randn(10).astype(np.float32)}}
  stats = {'bn': {'mean': rs.randn(8).astype(np.float32)}}
  return {'step': np.int32(seed), 'params': params, 'batch_stats': stats,
          'opt_state': {'mu': params}, 'ema': None}


def _workdir(tmp_path, steps=(2, 4), async_save=True):
  """A train.py-shaped workdir with tiny states at ``steps``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'model': 'ghostnet_050'}))
  mngr = ckpt_lib.train_checkpoint_manager(
      workdir / ckpt_lib.CHECKPOINT_DIR, keep=5, keep_best=0,
      async_save=async_save)
  for step in steps:
    mngr.save(step, args=ocp.args.Composite(**{
        ckpt_lib.STATE: ocp.args.StandardSave(_tiny_state(step)),
        ckpt_lib.META: ocp.args.JsonSave({'model': 'ghostnet_050',
                                          'num_classes': 10, 'step': step}),
    }))
  mngr.wait_until_finished()
  mngr.close()
  return workdir, workdir / ckpt_lib.CHECKPOINT_DIR


def _kinds(step_dir) -> dict[str, str]:
  """One file of each kind: array data, orbax metadata, meta JSON, step
  metadata."""
  data = [os.path.join(dp, f) for dp, _, fs in os.walk(step_dir / 'state')
          for f in fs if os.sep + 'd' + os.sep in os.path.join(dp, f)]
  return {'array data': max(data, key=os.path.getsize),
          'array metadata': str(step_dir / 'state' / '_METADATA'),
          'meta JSON': str(step_dir / 'meta' / 'metadata'),
          'step metadata': str(step_dir / '_CHECKPOINT_METADATA')}


def _flip(path, offset=None) -> None:
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    f.seek(0)
    f.write(data)


@pytest.mark.parametrize('async_save', [True, False])
def test_manifest_written_with_every_save(tmp_path, async_save):
  _, ckpt_dir = _workdir(tmp_path, async_save=async_save)
  for step in (2, 4):
    d = ckpt_dir / str(step)
    assert integrity.has_manifest(str(d))
    assert integrity.verify_step(str(d)) > 0
    listed = json.loads((d / integrity.MANIFEST_NAME).read_text())['files']
    assert set(_kinds(d).values()) <= {str(d / k) for k in listed}
  if async_save:  # committed with the step: no temporary dirs left behind
    assert not [n for n in os.listdir(ckpt_dir) if integrity.TMP_MARK in n]


def test_bit_flip_in_each_kind_of_file_is_detected_and_eval_refuses(
    tmp_path, capsys):
  from ghostnet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import eval_lib  # pylint: disable=g-import-not-at-top
  workdir, ckpt_dir = _workdir(tmp_path)
  pristine = {p: open(p, 'rb').read() for p in _kinds(ckpt_dir / '4').values()}
  detected = 0
  for kind, path in _kinds(ckpt_dir / '4').items():
    _flip(path)
    with pytest.raises(integrity.CheckpointIntegrityError) as e:
      ckpt_lib.restore_workdir(workdir, 'latest')
    msg = str(e.value)
    assert path in msg and 'step 4' in msg and 'Intact steps: [2]' in msg, (
        kind, msg)
    # eval.py: exit 2, the file and the intact steps named, no traceback.
    assert eval_lib.main(['--checkpoint', str(workdir), '--which',
                          'latest']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and path in err and '[2]' in err
    assert 'Traceback' not in err
    with open(path, 'wb') as f:
      f.write(pristine[path])
    detected += 1
  assert detected == 4
  restored = ckpt_lib.restore_workdir(workdir, 'latest')  # repaired: loads
  assert restored['step'] == 4
  np.testing.assert_array_equal(restored['variables']['params']['head']['bias'],
                                _tiny_state(4)['params']['head']['bias'])
  print('FAULTS integrity: 4 kinds of file flipped, 4 detected by '
        'restore_workdir and eval.py (exit 2)')


def test_resume_falls_back_to_newest_intact_step_and_keeps_bad_ones(tmp_path):
  _, ckpt_dir = _workdir(tmp_path, steps=(2, 4, 6))
  _flip(_kinds(ckpt_dir / '6')['array data'])
  os.remove(ckpt_dir / '4' / integrity.MANIFEST_NAME)  # save never sealed
  notes = []
  assert integrity.select_resume_step(str(ckpt_dir), log=notes.append) == 2
  assert integrity.committed_steps(str(ckpt_dir)) == [2]
  assert 'step 6 failed its integrity check' in notes[0]
  assert 'corrupted' in notes[0] and 'resuming from the newest intact' in notes[0]
  assert 'step 4' in notes[1] and 'no integrity manifest' in notes[1]
  aside = tmp_path / 'run' / integrity.ASIDE_DIR
  kept = sorted(n for n in os.listdir(aside) if not n.endswith('.txt'))
  assert [n.split('.')[0] for n in kept] == ['4', '6']  # moved, not deleted
  assert all((aside / n / 'state').is_dir() for n in kept)


def test_legacy_checkpoints_without_manifests_are_used(tmp_path):
  _, ckpt_dir = _workdir(tmp_path)
  for step in (2, 4):
    os.remove(ckpt_dir / str(step) / integrity.MANIFEST_NAME)
  notes = []
  assert integrity.select_resume_step(str(ckpt_dir), log=notes.append) == 4
  assert 'predate integrity manifests' in notes[0]


def test_converted_checkpoint_is_verified_before_init_from(tmp_path):
  from ghostnet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'conv'
  ckpt_lib.save_converted(path, {'params': _tiny_state(1)['params'],
                                 'batch_stats': {}},
                          {'model': 'ghostnet_050', 'num_classes': 10})
  variables, _ = ckpt_lib.restore_converted(path)
  assert 'conv' in variables['params']
  data = [os.path.join(dp, f) for dp, _, fs in os.walk(path / '0')
          for f in fs if os.sep + 'd' + os.sep in os.path.join(dp, f)]
  _flip(max(data, key=os.path.getsize))
  with pytest.raises(integrity.CheckpointIntegrityError, match='corrupted'):
    ckpt_lib.restore_converted(path)


def test_nan_hint_only_right_after_a_restore():
  assert 'checkpoint itself may be bad' in integrity.after_restore_hint(
      41, 40, '/w/checkpoints')
  assert integrity.after_restore_hint(42, 40, '/w/checkpoints') == ''
  assert integrity.after_restore_hint(1, None, '/w/checkpoints') == ''


def test_write_error_names_the_real_cause():
  import errno  # pylint: disable=g-import-not-at-top
  race = integrity.write_error_cause(OSError(errno.ENOENT, 'No such file'))
  assert 'another process' in race and 'disk full' not in race
  assert 'disk full' in integrity.write_error_cause(
      OSError(errno.ENOSPC, 'No space left on device'))


# ------------------------------------------------------------------------------
# Interrupts
# ------------------------------------------------------------------------------


def test_sigint_sets_the_flag_like_sigterm():
  stop = interrupts.Interrupts(enable=True)
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs between bytecodes
    assert stop.requested and stop.signal_name == 'SIGINT'
    assert 'Interrupted (Ctrl-C) at step 7' in stop.message(7, '/w/c')
    assert interrupts.exit_code({'interrupted_by': 'SIGINT'}) == 130
    assert interrupts.exit_code({'interrupted_by': 'SIGTERM'}) == 0
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_TWICE = r'''
import os, signal, sys, time
sys.path.insert(0, {root!r})
from ghostnet_jax import interrupts
stop = interrupts.Interrupts(enable=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.05)
print('FIRST', stop.requested, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print('NOT REACHED', flush=True)
'''


def test_second_sigint_exits_at_once_with_130():
  proc = subprocess.run([sys.executable, '-c', _TWICE.format(root=ROOT)],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 130
  assert proc.stdout.strip() == 'FIRST True'
  assert 'exits now without saving' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_resume_with_a_garbage_csv_keeps_it_aside_and_starts_anew(tmp_path):
  path = tmp_path / train_logging.CSV_NAME
  path.write_bytes(b'\x00\x01garbage\n12,')
  logger = train_logging.MetricsLogger(str(tmp_path), total_steps=4,
                                       start_step=2, progress=False)
  logger.write(3, {'train_loss': 2.0})
  logger.close()
  aside = [n for n in os.listdir(tmp_path) if '.malformed.' in n]
  assert len(aside) == 1
  assert (tmp_path / aside[0]).read_bytes() == b'\x00\x01garbage\n12,'
  rows, skipped = train_logging.read_metrics_rows(str(path))
  assert [r['step'] for r in rows] == ['3'] and skipped == 0


def test_seal_pending_seals_only_the_step_being_finalized(tmp_path):
  """The next save's temporary directory (still being written) is left
  alone: only the oldest one is complete."""
  for step in (3, 4):
    d = tmp_path / f'{step}{integrity.TMP_MARK}'
    (d / 'state').mkdir(parents=True)
    (d / 'state' / 'x').write_bytes(b'data')
  assert integrity.seal_pending(str(tmp_path)) == str(
      tmp_path / f'3{integrity.TMP_MARK}')
  assert integrity.has_manifest(str(tmp_path / f'3{integrity.TMP_MARK}'))
  assert not integrity.has_manifest(str(tmp_path / f'4{integrity.TMP_MARK}'))


# ------------------------------------------------------------------------------
# Peer watchdog (multi-process)
# ------------------------------------------------------------------------------


def test_peer_watchdog_names_a_lost_peer(tmp_path, monkeypatch):
  import threading  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import peer_watchdog  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(peer_watchdog, 'HEARTBEAT_S', 0.05)
  monkeypatch.setattr(peer_watchdog, 'PEER_TIMEOUT_S', 0.5)
  lost = []
  fired = threading.Event()
  dog = peer_watchdog.PeerWatchdog(
      str(tmp_path), 0, 2, on_lost=lambda d, w: (lost.append(d), fired.set()))
  peer = tmp_path / 'peers' / 'process_1'
  peer.write_text('alive 1\n')
  assert dog.lost_peer() is None
  peer.write_text('done\n')
  assert dog.lost_peer(now=time.time() + 100) is None  # finished: not waited
  peer.write_text('exited\n')
  assert 'process 1 exited with an error' in dog.lost_peer()
  peer.write_text('alive 1\n')  # then its heartbeat stops: the thread fires
  t0 = time.monotonic()
  assert fired.wait(10)
  assert time.monotonic() - t0 < 2
  assert 'process 1 stopped responding' in lost[0]
  dog.done()
  assert (tmp_path / 'peers' / 'process_0').read_text() == 'done\n'
  assert peer_watchdog.start(str(tmp_path), 0, 1) is None  # single process


_EVAL_CTRL_C = r'''
import os, signal, sys, time
sys.path.insert(0, {root!r})
from ghostnet_jax import interrupts
interrupts.exit_on_interrupt('eval.py')  # what eval.py installs first
print('READY', flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print('NOT REACHED', flush=True)
'''


def test_eval_ctrl_c_exits_130_without_traceback():
  proc = subprocess.run([sys.executable, '-c', _EVAL_CTRL_C.format(root=ROOT)],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 130
  assert proc.stdout.strip() == 'READY'
  assert 'Interrupted (Ctrl-C): eval.py stopped' in proc.stderr
  assert 'Traceback' not in proc.stderr and 'KeyboardInterrupt' not in proc.stderr
  with open(os.path.join(ROOT, 'eval.py')) as f:
    assert 'eval_cli.run()' in f.read()  # eval.py's entry point installs it
  with open(os.path.join(ROOT, 'ghostnet_jax', 'eval_cli.py')) as f:
    assert "interrupts.exit_on_interrupt('eval.py')" in f.read()
