"""Fault injection: what a long run on preemptible machines meets.

* kill -9 at random moments (also while an async checkpoint is being
  written), several times in a row, then SIGTERM: every restart resumes from
  the last committed checkpoint and the end equals an uninterrupted run;
* a NaN / Inf loss: an error naming the step and the fixes, nothing saved
  after it; or, with ``skip_nonfinite_steps``, the step is skipped;
* a full disk or an unwritable workdir: a clear error, the checkpoints
  already there byte-identical;
* converter fuzzing: every mutated checkpoint loads equal to the reference
  or is refused with an error naming the problem.

Each fault family prints ``FAULTS <kind>: {...}`` with what was injected and
what happened (``pytest -s``). Config validation, corrupt images and datasets
without labels are covered in test_train.py and test_eval.py; the few gaps
are here.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fake_input
import train_test_utils
from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import train_lib

TMP_SUFFIX = '.orbax-checkpoint-tmp'


def _steps_on_disk(ckpt_dir) -> tuple[list[int], list[str]]:
  """(committed steps, names of uncommitted temporary step directories)."""
  if not os.path.isdir(ckpt_dir):
    return [], []
  names = os.listdir(ckpt_dir)
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if TMP_SUFFIX in n))


def _hashes(root) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


# ------------------------------------------------------------------------------
# 1. kill -9 and SIGTERM
# ------------------------------------------------------------------------------


class _Worker:
  """tests/train_worker.py in a subprocess whose stdout lines we can await."""

  def __init__(self, spec):
    self.proc = subprocess.Popen(
        train_test_utils.worker_cmd(spec), env=train_test_utils.worker_env(),
        cwd=train_test_utils.ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line.rstrip('\n'))
    self._queue.put(None)

  def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        self.proc.kill()
        raise AssertionError(f'no {pattern!r} in time:\n' +
                             '\n'.join(self.lines[-40:])) from None
      if line is None:
        raise AssertionError(f'worker ended without {pattern!r} (rc '
                             f'{self.proc.wait()}):\n' +
                             '\n'.join(self.lines[-40:]))
      self.lines.append(line)
      m = re.fullmatch(pattern, line)
      if m:
        return m

  def finish(self, timeout: float = 300) -> int:
    rc = self.proc.wait(timeout=timeout)
    while (line := self._queue.get(timeout=30)) is not None:
      self.lines.append(line)
    return rc

  @property
  def text(self) -> str:
    return '\n'.join(self.lines)


def _resumed_from(text: str) -> int | None:
  m = re.search(r'resuming from step (\d+)', text)
  return int(m.group(1)) if m else None


@pytest.mark.slow
def test_kill_9_at_random_moments_then_sigterm_equals_straight_run(
    tmp_path, compilation_cache):
  """Three kill -9 (two while a checkpoint is half written, one at a random
  moment between steps), then SIGTERM, then a run to the end: every restart
  resumes from the last committed checkpoint, half-written ones are ignored
  and removed, and the final parameters equal an uninterrupted run's."""
  config = dict(num_train_steps=16, checkpoint_every_steps=2,
                log_every_steps=5, eval_every_steps=-1, keep_checkpoints=2,
                ema_decay=0.9, dropout=0.2)
  base = {'devices': 1, 'fake_input': True,
          'compilation_cache': compilation_cache}
  straight_dir, workdir = tmp_path / 'straight', tmp_path / 'killed'
  ckpt_dir = workdir / ckpt_lib.CHECKPOINT_DIR
  [straight] = train_test_utils.run_worker(
      {**base, 'runs': [{'workdir': str(straight_dir), 'config': config}]})
  assert straight['step'] == 16

  rs = np.random.default_rng(2024)  # kill moments are reproducible
  # Commits are delayed by 0.6 s, so a kill soon after "SAVE_STARTED" lands
  # while that step exists only as a temporary directory.
  runs = [{'workdir': str(workdir), 'config': config}]
  spec = {**base, 'announce': True, 'slow_commit_s': 0.6, 'runs': runs}
  plan = ['during_save', 'between_steps', 'during_save']
  log = collections.Counter()
  expected_start = None
  for kind in plan:
    worker = _Worker(spec)
    first = int(worker.wait_for(r'BATCH (\d+)').group(1))
    assert first == (expected_start or 0) + 1, worker.text
    if kind == 'during_save':
      # The second save of this run: the first one is then committed.
      worker.wait_for(r'SAVE_STARTED \d+')
      step = int(worker.wait_for(r'SAVE_STARTED (\d+)').group(1))
      time.sleep(rs.uniform(0.0, 0.2))
    else:
      target = first + int(rs.integers(2, 6))
      worker.wait_for(rf'BATCH {target}')
      time.sleep(rs.uniform(0.0, 0.2))
    worker.proc.send_signal(signal.SIGKILL)
    assert worker.finish() == -signal.SIGKILL
    assert _resumed_from(worker.text) == expected_start
    committed, tmp = _steps_on_disk(ckpt_dir)
    if kind == 'during_save':
      assert step not in committed and f'{step}{TMP_SUFFIX}' in tmp, (
          committed, tmp)
      log['kill -9 while a checkpoint was half written'] += 1
    else:
      log['kill -9 between steps'] += 1
    log['half-written step dirs left by kills'] += len(tmp)
    assert committed, 'every kill comes after at least one committed save'
    expected_start = committed[-1]

  # SIGTERM at a random step: a final save of that step and a clean exit.
  worker = _Worker({**base, 'announce': True, 'batch_pause_s': 0.3,
                    'runs': runs})
  first = int(worker.wait_for(r'BATCH (\d+)').group(1))
  assert first == expected_start + 1
  assert _resumed_from(worker.text) == expected_start
  target = first + 2 * int(rs.integers(1, 3))  # odd: no save due there
  worker.wait_for(rf'BATCH {target}')
  worker.proc.send_signal(signal.SIGTERM)
  assert worker.finish() == 0, worker.text
  preempted = train_test_utils.parse_result(worker.text)[0]
  assert preempted['preempted'] and preempted['step'] == target
  assert f'Preempted at step {target}: checkpoint saved' in worker.text
  committed, tmp = _steps_on_disk(ckpt_dir)
  assert committed[-1] == target and target % 2 and not tmp
  log['SIGTERM -> final save, exit 0'] += 1

  final_run = _Worker({**base, 'runs': runs})
  assert final_run.finish() == 0, final_run.text
  assert _resumed_from(final_run.text) == target
  [final] = train_test_utils.parse_result(final_run.text)
  assert final['step'] == 16
  committed, tmp = _steps_on_disk(ckpt_dir)
  assert committed[-1] == 16 and not tmp  # half-written dirs were removed
  np.testing.assert_allclose(final['train_loss'], straight['train_loss'],
                             rtol=1e-6)
  a = ckpt_lib.restore_workdir(straight_dir, 'latest')
  b = ckpt_lib.restore_workdir(workdir, 'latest')
  assert a['step'] == b['step'] == 16
  chex.assert_trees_all_close(a['variables'], b['variables'], rtol=1e-6,
                              atol=1e-7)
  chex.assert_trees_all_close(a['ema_variables'], b['ema_variables'],
                              rtol=1e-6, atol=1e-7)
  print('FAULTS kill/sigterm:', dict(log))


# ------------------------------------------------------------------------------
# 2. NaN / Inf loss
# ------------------------------------------------------------------------------


def _poisoned(base, bad_steps, value=np.nan):
  """``base`` pipeline whose images are ``value`` at ``bad_steps`` (1-based)."""

  def train_iterator(**kwargs):
    step = kwargs['start_step']
    for batch in base.train_iterator(**kwargs):
      step += 1
      if step in bad_steps:
        batch = {**batch, 'image': np.full_like(batch['image'], value)}
      yield batch

  return types.SimpleNamespace(
      get_dataset_info=base.get_dataset_info,
      eval_iterator=base.eval_iterator, train_iterator=train_iterator)


def test_skipped_nonfinite_step_leaves_the_state_as_it_was():
  config = train_test_utils.tiny_config()
  model = train_lib.model_from_config(config, 10)
  tx = optax.sgd(0.1, momentum=0.9)
  from ghostnet_jax import utils  # pylint: disable=g-import-not-at-top
  variables = utils.init_variables(model, 0, image_size=16)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']),
      ema={'params': variables['params'],
           'batch_stats': variables['batch_stats']})
  step_fn = jax.jit(train_lib.make_train_step(
      model, tx, optax.constant_schedule(0.1), num_classes=10,
      label_smoothing=0.1, ema_decay=0.9, seed=0, skip_nonfinite=True))
  good = next(fake_input.train_iterator(
      dataset='fake_digits', data_dir=None, global_batch_size=8,
      image_size=16, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3))
  for value in (np.nan, np.inf):
    bad = {**good, 'image': np.full_like(good['image'], value)}
    new, metrics = step_fn(state, bad)
    assert not bool(metrics['finite'])
    assert int(new.step) == 1
    chex.assert_trees_all_equal(new.replace(step=state.step), state)
  new, metrics = step_fn(state, good)
  assert bool(metrics['finite']) and int(new.step) == 1
  assert not np.array_equal(new.params['conv_stem']['kernel'],
                            state.params['conv_stem']['kernel'])


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_then_skip_option_finishes(
    tmp_path, monkeypatch):
  workdir = tmp_path / 'w'
  ckpt_dir = workdir / ckpt_lib.CHECKPOINT_DIR
  log = collections.Counter()
  # NaN images at step 5; metrics are looked at on steps 3, 6 (log) and at
  # the saves 2, 4, 6: the error comes before step 6 is saved.
  monkeypatch.setattr(train_lib, 'input_pipeline',
                      _poisoned(fake_input, {5}))
  config = train_test_utils.tiny_config(num_train_steps=8,
                                        checkpoint_every_steps=2,
                                        log_every_steps=3, eval_every_steps=-1)
  with pytest.raises(train_lib.NonFiniteLossError) as e:
    train_lib.train_and_evaluate(config, str(workdir))
  msg = str(e.value)
  assert e.value.step == 5
  for words in ('NaN/Inf at step 5', 'config.learning_rate',
                'config.skip_nonfinite_steps=True', 'steps [2, 4]',
                'resumes from step 4', str(ckpt_dir)):
    assert words in msg, (words, msg)
  assert _steps_on_disk(ckpt_dir) == ([2, 4], [])
  log['NaN loss -> error, last good checkpoint kept'] += 1
  last_good = ckpt_lib.restore_workdir(workdir, 'latest')
  assert last_good['step'] == 4
  assert all(np.isfinite(x).all() for x in
             jax.tree_util.tree_leaves(last_good['variables']))

  # The same command with the skip option resumes from 4, skips 5 and 7.
  monkeypatch.setattr(train_lib, 'input_pipeline',
                      _poisoned(fake_input, {5, 7}, np.inf))
  config.skip_nonfinite_steps = True
  final = train_lib.train_and_evaluate(config, str(workdir))
  assert final['step'] == 8 and final['nonfinite_steps_skipped'] == 2
  assert np.isfinite(final['train_loss'])
  # Step 4 was kept (latest 2: 6, 8) only until newer steps replaced it;
  # the files of what remains were written by the resumed run.
  assert _steps_on_disk(ckpt_dir)[0] == [6, 8]
  done = ckpt_lib.restore_workdir(workdir, 'latest')
  assert all(np.isfinite(x).all() for x in
             jax.tree_util.tree_leaves(done['variables']))
  log['Inf loss skipped with skip_nonfinite_steps'] += 2
  print('FAULTS nonfinite:', dict(log))


@pytest.mark.slow
def test_diverging_bf16_run_suggests_lower_lr_and_float32(tmp_path,
                                                           fake_pipeline):
  workdir = tmp_path / 'w'
  config = train_test_utils.tiny_config(
      num_train_steps=6, checkpoint_every_steps=6, log_every_steps=6,
      eval_every_steps=-1, learning_rate=1e30, warmup_steps=0,
      dtype='bfloat16')
  with pytest.raises(train_lib.NonFiniteLossError) as e:
    train_lib.train_and_evaluate(config, str(workdir))
  msg = str(e.value)
  assert 2 <= e.value.step <= 6, msg
  assert f'at step {e.value.step}' in msg
  assert 'lower config.learning_rate (now 1e+30' in msg
  assert "disable bf16 compute (config.dtype='float32')" in msg
  assert _steps_on_disk(workdir / ckpt_lib.CHECKPOINT_DIR) == ([], [])
  print('FAULTS nonfinite: diverging bf16 run (lr 1e30) stopped at step',
        e.value.step)


# ------------------------------------------------------------------------------
# 5. Full disk, unwritable workdir
# ------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_during_async_save_is_clear_and_keeps_checkpoints(
    tmp_path, fake_pipeline, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  ckpt_dir = workdir / ckpt_lib.CHECKPOINT_DIR
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  snapshot = {}

  async def full_disk(self, *args, **kwargs):
    if self.get_final().name == '4':  # the commit of step 4 hits a full disk
      snapshot.update(_hashes(ckpt_dir))
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                    str(self.get()))
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize',
                      full_disk)
  config = train_test_utils.tiny_config(num_train_steps=8,
                                        checkpoint_every_steps=2,
                                        eval_every_steps=-1)
  with pytest.raises(train_lib.CheckpointWriteError) as e:
    train_lib.train_and_evaluate(config, str(workdir))
  msg = str(e.value)
  assert e.value.errno == errno.ENOSPC
  for words in ('checkpoint of step 4', 'No space left on device',
                'disk full', 'steps [2]', 'resume from step 2', str(ckpt_dir)):
    assert words in msg, (words, msg)
  assert snapshot and 'final_metrics.json' not in os.listdir(workdir)
  committed, _ = _steps_on_disk(ckpt_dir)
  assert committed == [2]
  def step_2(hashes):
    return {k: v for k, v in hashes.items() if k.startswith('2/')}

  assert step_2(snapshot) and step_2(_hashes(ckpt_dir)) == step_2(snapshot)
  log = collections.Counter({'ENOSPC on async commit -> clear error': 1})

  # An unwritable checkpoint directory is found before any compute.
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize',
                      finalize)
  before = _hashes(workdir)
  if os.geteuid() != 0:
    os.chmod(ckpt_dir, 0o500)
    try:
      with pytest.raises(train_lib.ConfigError, match='is not writable'):
        train_lib.train_and_evaluate(config, str(workdir))
    finally:
      os.chmod(ckpt_dir, 0o755)
    assert _hashes(workdir) == before
    log['read-only checkpoint dir -> clear error'] += 1
  else:
    print('FAULTS disk: running as root, chmod cannot make a directory '
          'read-only; the read-only variant is not injected')
  print('FAULTS disk:', dict(log))


def test_workdir_under_a_file_fails_before_compute(tmp_path, fake_pipeline,
                                                   monkeypatch):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: (
      lambda *x, **y: pytest.fail('compute before the workdir check')))
  with pytest.raises(train_lib.ConfigError,
                     match=r'workdir .*file/w is not writable: Not a dir'):
    train_lib.train_and_evaluate(train_test_utils.tiny_config(),
                                 str(blocker / 'w'))
  assert blocker.read_text() == 'x'


@pytest.mark.parametrize('field,value,match', [
    ('num_train_steps', -5, 'config.num_train_steps must be > 0'),
    ('learning_rate', -1e-3, 'config.learning_rate must be > 0'),
    ('mesh_shape', (0, 1), 'config.mesh_shape'),
])
def test_more_bad_configs_are_named(field, value, match):
  with pytest.raises(train_lib.ConfigError, match=match):
    train_lib.validate_config(train_test_utils.tiny_config(**{field: value}))


def test_skip_nonfinite_steps_must_be_a_bool():
  config = train_test_utils.tiny_config()
  del config['skip_nonfinite_steps']  # a config read from JSON or a dict
  config.skip_nonfinite_steps = 'yes'
  with pytest.raises(train_lib.ConfigError,
                     match="config.skip_nonfinite_steps must be True or "
                     "False; got 'yes'"):
    train_lib.validate_config(config)


# ------------------------------------------------------------------------------
# 3. Converter fuzzing
# ------------------------------------------------------------------------------

FUZZ_MODEL = 'ghostnet_050'


def _fuzz_cases(sd: dict, data: bytes, rs: np.random.RandomState):
  """``(kind, payload, expect)``: payload is bytes (written as is) or an
  object (``torch.save``d); expect is ``'equal'``, ``'close'`` (half
  precision) or a regex the refusal must match."""
  import torch  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import convert  # pylint: disable=g-import-not-at-top
  keys = sorted(sd)
  weights = [k for k in keys if not k.endswith('num_batches_tracked')]
  corrupt = r'truncated or corrupt|damaged zip|not a PyTorch checkpoint|empty'
  for offset in sorted(rs.randint(0, len(data), size=8)):
    yield 'truncated', data[:offset], corrupt
  for head in (b'', b'PK\x03\x04', b'\x80\x02', b'<html>'):
    yield 'random bytes', head + rs.bytes(rs.randint(1, 50000)), corrupt

  def random_layout(name):
    return {k: torch.from_numpy(rs.randn(*convert._torch_shape(shape)).astype(
        np.float32)) for k, (_, _, shape) in convert.torch_layout(name).items()}

  yield ('other architecture', random_layout('ghostnet_100'),
         r'(?s)does not match ghostnet_050.*looks like a checkpoint of: '
         r'ghostnet_100')
  yield ('other architecture', random_layout('ghostnetv2_100'),
         'does not match ghostnet_050')
  yield ('other architecture', torch.nn.Sequential(
      torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(),
         r'does not match ghostnet_050: \d+ missing, 6 unexpected')
  for key in rs.choice(weights, size=4, replace=False):
    t = sd[key]
    bad = dict(sd)
    bad[key] = (t[:-1] if t.shape[0] > 1 else torch.cat([t, t]))
    yield 'shape mismatch', bad, rf'mis-shaped.*\n(.*\n)*\s+{re.escape(key)}: '
  for dtype in (torch.float16, torch.bfloat16):
    yield (f'{dtype}', {k: v.to(dtype) if v.is_floating_point() else v
                        for k, v in sd.items()}, 'close')
  big = dict(sd)
  big[weights[0]] = sd[weights[0]] * 1e6  # fine in fp32, inf in fp16
  yield 'fp16 overflow', {k: v.half() if v.is_floating_point() else v
                          for k, v in big.items()}, 'NaN or Inf'
  for i in range(3):
    extra = dict(sd)
    name = f'{rs.choice(weights).rsplit(".", 1)[0]}.extra{i}.weight'
    extra[name] = torch.zeros(3)
    yield 'extra key', extra, rf'1 unexpected(.*\n)*\s+{re.escape(name)}'
  for key in rs.choice(weights, size=3, replace=False):
    missing = {k: v for k, v in sd.items() if k != key}
    yield 'missing key', missing, rf'1 missing(.*\n)*\s+{re.escape(key)}'
  wrappers = ['state_dict', 'model', 'module', 'net', 'state_dict_ema']
  for depth in (1, 2, 3, 2):
    obj = {f'module.{k}' if rs.rand() < 0.5 else k: v for k, v in sd.items()}
    for _ in range(depth):
      obj = {str(rs.choice(wrappers)): obj, 'epoch': 7, 'arch': 'ghostnet'}
    yield 'nested wrapper', obj, 'equal'
  dup = dict(sd)
  dup[f'module.{weights[1]}'] = sd[weights[1]] + 1
  yield 'duplicate after module. prefix', dup, 'both name'
  ints = dict(sd)
  ints[weights[2]] = sd[weights[2]].to(torch.int32)
  yield 'integer weights', ints, 'expected floats'
  yield 'list of tensors', list(sd.values()), 'not a state_dict'
  yield ('two state_dicts', {'a': sd, 'b': sd},
         'Cannot find a state_dict')


def test_converter_fuzz_loads_equal_or_refuses_clearly(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import convert, utils  # pylint: disable=g-import-not-at-top
  model = ghostnet_jax.create_model(FUZZ_MODEL, num_classes=10)
  variables = jax.device_get(utils.init_variables(model, 5, image_size=32))
  sd = convert.to_torch_state_dict(variables)
  good = tmp_path / 'good.pth'
  torch.save(sd, good)
  reference = convert.load_torch_checkpoint(str(good), FUZZ_MODEL,
                                            num_classes=10)
  chex.assert_trees_all_equal(reference, variables)
  apply = jax.jit(lambda v, x: model.apply(v, x))
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  want = np.asarray(apply(reference, x))

  outcomes = collections.Counter()
  rs = np.random.RandomState(1234)
  for i, (kind, payload, expect) in enumerate(
      _fuzz_cases(sd, good.read_bytes(), rs)):
    path = tmp_path / f'case{i}.pth'
    if isinstance(payload, bytes):
      path.write_bytes(payload)
    else:
      torch.save(payload, path)
    try:
      got = convert.load_torch_checkpoint(str(path), FUZZ_MODEL,
                                          num_classes=10)
    except (convert.CheckpointError, FileNotFoundError) as e:
      assert expect not in ('equal', 'close'), f'{kind} refused: {e}'
      assert re.search(expect, str(e)), (kind, expect, str(e))
      assert str(path) in str(e), (kind, str(e))  # the error names the file
      outcomes[f'{kind}: refused'] += 1
      continue
    assert expect in ('equal', 'close'), f'{kind} loaded, expected {expect}'
    if expect == 'equal':
      chex.assert_trees_all_equal(got, reference)
    else:
      assert {a.dtype for a in jax.tree_util.tree_leaves(got)} == {
          np.dtype(np.float32)}
      np.testing.assert_allclose(np.asarray(apply(got, x)), want,
                                 rtol=0.05, atol=0.05, err_msg=kind)
    outcomes[f'{kind}: loaded correctly'] += 1
  assert sum(outcomes.values()) == 36
  print('FAULTS converter:', dict(sorted(outcomes.items())))
