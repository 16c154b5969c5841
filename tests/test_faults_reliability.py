"""Fault injection, round 2 (issue 17): real trainers in subprocesses.

* two trainers on one workdir: the second is refused naming the first
  (host, pid, start time), the first finishes, the CSV is intact;
* kill -9: the dead trainer's lock is stale and taken over, resume works;
* Ctrl-C mid-step and mid-compile: a checkpoint of the interrupted step,
  exit 130, no traceback or segfault message, and the resumed run ends
  equal to an uninterrupted one;
* a malformed metrics CSV at the end of a run: reported, the run succeeds;
* a bit flip in the newest checkpoint: training resumes from the newest
  intact step, the bad one is kept aside.

Each prints ``FAULTS <kind>: {...}`` (``pytest -s``). Fast unit tests of
the same modules are in tests/test_reliability.py.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import socket
import time
import types

import chex
import numpy as np
import pytest

import fake_input
import train_test_utils
from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import integrity
from ghostnet_jax import train_lib
from ghostnet_jax import train_logging
from ghostnet_jax import workdir_lock
from test_faults import _Worker, _resumed_from, _steps_on_disk

pytestmark = pytest.mark.slow


def _hashes(root, skip=()) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      rel = os.path.relpath(p, root)
      if not rel.startswith(skip):
        with open(p, 'rb') as fh:
          out[rel] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _csv_is_clean(path) -> list[int]:
  """Steps of a metrics CSV with one header and no malformed line."""
  with open(path) as f:
    lines = f.read().splitlines()
  assert sum(ln.startswith('step,') for ln in lines) == 1, lines
  rows, skipped = train_logging.read_metrics_rows(path)
  assert skipped == 0, lines
  return [int(r['step']) for r in rows]


def _wait_committed(workdir, step: int, worker) -> None:
  deadline = time.monotonic() + 120
  while not (workdir / ckpt_lib.CHECKPOINT_DIR / str(step)).is_dir():
    assert time.monotonic() < deadline, worker.text
    time.sleep(0.05)


def _wait_stopped(pid: int) -> None:
  """Until every thread of ``pid`` is stopped (state T)."""
  deadline = time.monotonic() + 30
  while True:
    states = []
    for tid in os.listdir(f'/proc/{pid}/task'):
      with open(f'/proc/{pid}/task/{tid}/stat') as f:
        states.append(f.read().rsplit(')', 1)[1].split()[0])
    if all(st in ('T', 't') for st in states):
      return
    assert time.monotonic() < deadline, states
    time.sleep(0.05)


def test_second_trainer_is_refused_first_finishes_csv_intact(
    tmp_path, compilation_cache):
  workdir = tmp_path / 'w'
  config = dict(num_train_steps=6, checkpoint_every_steps=2,
                log_every_steps=1, eval_every_steps=-1)
  base = {'devices': 1, 'fake_input': True,
          'compilation_cache': compilation_cache}
  first = _Worker({**base, 'announce': True,
                   'runs': [{'workdir': str(workdir), 'config': config}]})
  first.wait_for(r'SAVE_STARTED 2')
  first.wait_for(r'BATCH 3')
  _wait_committed(workdir, 2, first)
  first.proc.send_signal(signal.SIGSTOP)  # hold it mid-run, lock held
  try:
    _wait_stopped(first.proc.pid)
    before = _hashes(workdir)
    second = _Worker({**base, 'runs': [{'workdir': str(workdir),
                                        'config': config}]})
    rc = second.finish()
    after = _hashes(workdir)  # before the first trainer runs on
  finally:
    first.proc.send_signal(signal.SIGCONT)
  assert rc == 1, second.text
  for words in ('WorkdirLockedError', 'is in use by another training process',
                f'host {socket.gethostname()}', f'pid {first.proc.pid}',
                'started 20', 'force_unlock'):
    assert words in second.text, (words, second.text[-3000:])
  assert after == before  # the refused trainer wrote nothing
  assert first.finish() == 0, first.text
  assert train_test_utils.parse_result(first.text)[0]['step'] == 6
  assert _csv_is_clean(workdir / train_logging.CSV_NAME) == [1, 2, 3, 4, 5, 6]
  assert (workdir / train_logging.PLOT_NAME).stat().st_size > 0
  print('FAULTS concurrent: second trainer started 1x while the first held '
        'the workdir: refused naming it, first finished, CSV intact')


def test_kill_9_leaves_a_stale_lock_and_resume_just_works(
    tmp_path, compilation_cache):
  workdir = tmp_path / 'w'
  config = dict(num_train_steps=6, checkpoint_every_steps=2,
                log_every_steps=2, eval_every_steps=-1)
  base = {'devices': 1, 'fake_input': True,
          'compilation_cache': compilation_cache}
  runs = [{'workdir': str(workdir), 'config': config}]
  worker = _Worker({**base, 'announce': True, 'runs': runs})
  worker.wait_for(r'SAVE_STARTED 2')
  worker.wait_for(r'BATCH 4')
  _wait_committed(workdir, 2, worker)
  worker.proc.send_signal(signal.SIGKILL)
  assert worker.finish() == -signal.SIGKILL
  holder = json.loads((workdir / workdir_lock.LOCK_NAME).read_text())
  assert holder['pid'] == worker.proc.pid  # left behind by the dead trainer
  rerun = _Worker({**base, 'runs': runs})
  assert rerun.finish() == 0, rerun.text
  assert (f'Took over the lock of {workdir} from host {socket.gethostname()}, '
          f'pid {worker.proc.pid}') in rerun.text
  assert 'no longer running' in rerun.text
  assert _resumed_from(rerun.text) in (2, 4)
  assert train_test_utils.parse_result(rerun.text)[0]['step'] == 6
  assert (workdir / workdir_lock.LOCK_NAME).read_text() == ''  # released
  print('FAULTS stale lock: kill -9 1x, stale lock taken over, resumed')


def test_ctrl_c_mid_compile_and_mid_step_saves_and_resumes_exactly(tmp_path):
  """SIGINT 1 s into the first step (compiling: no compilation cache) and
  SIGINT between steps 3 and 4: each saves the interrupted step, exits 130
  without a traceback, and resuming ends equal to a straight run."""
  config = dict(num_train_steps=6, checkpoint_every_steps=3,
                log_every_steps=3, eval_every_steps=-1, ema_decay=0.9,
                dropout=0.2)
  base = {'devices': 1, 'fake_input': True}
  straight_dir = tmp_path / 'straight'
  [straight] = train_test_utils.run_worker(
      {**base, 'runs': [{'workdir': str(straight_dir), 'config': config}]})
  log = collections.Counter()
  for kind, wait in (('mid-compile', r'BATCH 1'), ('mid-step', r'BATCH 4')):
    workdir = tmp_path / kind
    runs = [{'workdir': str(workdir), 'config': config}]
    worker = _Worker({**base, 'announce': True, 'runs': runs,
                      'batch_pause_s': 0.0 if kind == 'mid-compile' else 0.3})
    if kind == 'mid-step':
      worker.wait_for(r'BATCH 1')
    worker.wait_for(wait)
    time.sleep(1.0 if kind == 'mid-compile' else 0.1)
    worker.proc.send_signal(signal.SIGINT)
    rc = worker.finish()
    text = worker.text
    assert rc == 130, text
    assert 'Traceback' not in text and 'Fatal Python error' not in text, text
    step = 1 if kind == 'mid-compile' else 4
    if kind == 'mid-compile':
      took = float(re.search(r'First step \(with compilation\) took '
                             r'([\d.]+)s', text).group(1))
      assert took > 1.0, text  # the signal came while the step compiled
    assert f'Interrupted (Ctrl-C) at step {step}: checkpoint saved' in text
    assert _steps_on_disk(workdir / ckpt_lib.CHECKPOINT_DIR)[0][-1] == step
    log[f'SIGINT {kind} -> checkpoint at step {step}, exit 130'] += 1
    resumed = _Worker({**base, 'runs': runs})
    assert resumed.finish() == 0, resumed.text
    assert _resumed_from(resumed.text) == step
    [final] = train_test_utils.parse_result(resumed.text)
    assert final['step'] == 6
    np.testing.assert_allclose(final['train_loss'], straight['train_loss'],
                               rtol=1e-6)
    a = ckpt_lib.restore_workdir(straight_dir, 'latest')
    b = ckpt_lib.restore_workdir(workdir, 'latest')
    chex.assert_trees_all_close(a['variables'], b['variables'], rtol=1e-6,
                                atol=1e-7)
    chex.assert_trees_all_close(a['ema_variables'], b['ema_variables'],
                                rtol=1e-6, atol=1e-7)
  print('FAULTS sigint:', dict(log))


def _damaging(base, csv_path, at_step):
  """``base`` pipeline that appends what a second writer and a crash leave
  (a second header, a cut row) to the metrics CSV while fetching the batch
  of ``at_step``."""

  def train_iterator(**kwargs):
    step = kwargs['start_step']
    for batch in base.train_iterator(**kwargs):
      step += 1
      if step == at_step:
        with open(csv_path, 'a') as f:
          f.write(','.join(train_logging.CSV_COLUMNS) + '\n12,0.5\n')
      yield batch

  return types.SimpleNamespace(
      get_dataset_info=base.get_dataset_info,
      eval_iterator=base.eval_iterator, train_iterator=train_iterator)


def test_malformed_csv_at_the_end_then_bit_flip_falls_back(
    tmp_path, monkeypatch, capsys):
  workdir = tmp_path / 'w'
  ckpt_dir = workdir / ckpt_lib.CHECKPOINT_DIR
  csv_path = str(workdir / train_logging.CSV_NAME)
  monkeypatch.setattr(train_lib, 'input_pipeline',
                      _damaging(fake_input, csv_path, 4))
  config = train_test_utils.tiny_config(num_train_steps=4,
                                        checkpoint_every_steps=2,
                                        eval_every_steps=-1)
  final = train_lib.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert final['step'] == 4 and np.isfinite(final['train_loss'])
  png = str(workdir / train_logging.PLOT_NAME)
  assert (f'plot:        {png} (skipped 2 malformed line(s) of {csv_path})'
          in out), out
  assert os.path.getsize(png) > 0
  assert (workdir / train_lib.FINAL_METRICS_NAME).exists()
  assert _steps_on_disk(ckpt_dir)[0] == [2, 4]

  # A bit flips in the newest step's largest array file: the next run warns,
  # keeps it aside and resumes from step 2.
  data = [os.path.join(dp, f) for dp, _, fs in os.walk(ckpt_dir / '4')
          for f in fs if os.sep + 'd' + os.sep in os.path.join(dp, f)]
  bad = max(data, key=os.path.getsize)
  with open(bad, 'r+b') as f:
    f.seek(os.path.getsize(bad) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  monkeypatch.setattr(train_lib, 'input_pipeline', fake_input)
  config.num_train_steps = 6
  final = train_lib.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert 'warning: checkpoint step 4 failed its integrity check' in out, out
  assert bad in out and 'resuming from step 2' in out
  assert final['step'] == 6
  aside = os.listdir(workdir / integrity.ASIDE_DIR)
  assert any(n.startswith('4.') and not n.endswith('.txt') for n in aside)
  assert _steps_on_disk(ckpt_dir)[0][-2:] == [4, 6]  # 4 rewritten by the rerun
  assert f'{csv_path}: dropped 2 malformed line(s)' in out
  assert _csv_is_clean(csv_path) == [1, 2, 3, 4, 5, 6]
  assert integrity.verify_dir(str(ckpt_dir))['bad'] == {}
  print('FAULTS end of run: malformed CSV 1x -> reported, run succeeded; '
        'bit flip in array data 1x -> resumed from step 2, bad step kept aside')


def _truncating(base, shard, at_step):
  """``base`` pipeline that truncates ``shard`` to half while fetching the
  batch of ``at_step`` (a disk or a copy going wrong mid-run)."""

  def train_iterator(**kwargs):
    step = kwargs['start_step']
    for batch in base.train_iterator(**kwargs):
      step += 1
      if step == at_step:
        with open(shard, 'r+b') as f:
          f.truncate(os.path.getsize(shard) // 2)
      yield batch

  return types.SimpleNamespace(
      get_dataset_info=base.get_dataset_info,
      eval_iterator=base.eval_iterator, train_iterator=train_iterator)


def test_shard_truncated_mid_run_is_named(tmp_path, tmp_path_factory,
                                          monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'tfds'
  shutil.copytree(train_test_utils.digits_dir(tmp_path_factory), data_dir)
  [shard] = [os.path.join(dp, f) for dp, _, fs in os.walk(data_dir)
             for f in fs if '-train.array_record' in f and '/32/' in dp]
  monkeypatch.setattr(train_lib, 'input_pipeline',
                      _truncating(train_lib.input_pipeline, shard, 2))
  config = train_test_utils.tiny_config(
      dataset='digits', data_dir=str(data_dir), num_train_steps=12,
      checkpoint_every_steps=12, eval_every_steps=-1, worker_count=0)
  from ghostnet_jax import data_faults  # pylint: disable=g-import-not-at-top
  with pytest.raises(data_faults.InputDataError) as e:
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  msg = str(e.value)
  assert shard in msg and ('truncated?' in msg or 'unreadable' in msg), msg
  print('FAULTS data: train shard truncated 1x mid-run -> error naming it:',
        msg[:300])


class _EnvWorker(_Worker):
  """A :class:`_Worker` with extra environment variables."""

  def __init__(self, spec, env):
    import queue  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.proc = subprocess.Popen(
        train_test_utils.worker_cmd(spec),
        env={**train_test_utils.worker_env(), **env},
        cwd=train_test_utils.ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()


PEER_TIMEOUT_S, PEER_HEARTBEAT_S = 20, 2


def test_killed_peer_process_ends_the_other_in_bounded_time_then_resume(
    tmp_path, compilation_cache):
  """Two processes (gloo, localhost); process 1 is killed mid-run. Process 0
  must exit within PEER_TIMEOUT_S + PEER_HEARTBEAT_S (+ slack for a loaded
  machine) naming the lost peer; restarting both resumes and finishes."""
  workdir = tmp_path / 'w'
  config = dict(num_train_steps=10, checkpoint_every_steps=2,
                log_every_steps=2, eval_every_steps=-1, batch_size=16)
  env = {'GHOSTNET_PEER_TIMEOUT_S': str(PEER_TIMEOUT_S),
         'GHOSTNET_PEER_HEARTBEAT_S': str(PEER_HEARTBEAT_S)}

  def launch(announce):
    port = train_test_utils.free_port()
    return [_EnvWorker({
        'devices': 1, 'fake_input': True, 'announce': announce,
        'batch_pause_s': 0.2, 'compilation_cache': compilation_cache,
        'distributed': {'coordinator': f'localhost:{port}',
                        'num_processes': 2, 'process_id': i},
        'runs': [{'workdir': str(workdir), 'config': config}]}, env)
            for i in range(2)]

  p0, p1 = launch(announce=True)
  p1.wait_for(r'SAVE_STARTED 2', timeout=600)
  p1.wait_for(r'BATCH 5')
  p1.proc.send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  assert p1.finish() == -signal.SIGKILL
  rc = p0.finish(timeout=PEER_TIMEOUT_S + 120)
  waited = time.monotonic() - killed_at
  assert rc != 0, p0.text
  assert 'lost peer process' in p0.text and 'process 1' in p0.text, (
      p0.text[-3000:])
  assert 'Traceback' not in p0.text[-2000:] or rc == 75, p0.text[-3000:]
  bound = PEER_TIMEOUT_S + PEER_HEARTBEAT_S + 60
  assert waited < bound, waited
  committed = _steps_on_disk(workdir / ckpt_lib.CHECKPOINT_DIR)[0]
  assert committed, 'a checkpoint was committed before the kill'
  q0, q1 = launch(announce=False)
  assert q0.finish(timeout=900) == 0, q0.text[-3000:]
  assert q1.finish(timeout=300) == 0, q1.text[-3000:]
  assert _resumed_from(q0.text) == committed[-1]
  assert train_test_utils.parse_result(q0.text)[0]['step'] == 10
  print(f'FAULTS peer: kill -9 of process 1 (1x): process 0 exited (rc {rc}) '
        f'{waited:.0f}s later (bound {bound}s); both restarted, resumed from '
        f'step {committed[-1]} and finished')
