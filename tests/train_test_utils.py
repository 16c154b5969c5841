"""Shared helpers of the trainer tests: a tiny config and a worker launcher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import types

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Two small stages of GhostNet blocks (one with SE): the real block code, a
# graph small enough to compile in seconds.
TINY_BLOCKS = (((3, 16, 16, 0.0, 1),), ((3, 48, 24, 0.25, 2),))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The default config shrunk for tests; ``overrides`` replace fields."""
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.model = 'ghostnet_050'
  c.model_overrides = ml_collections.ConfigDict({'blocks': TINY_BLOCKS})
  c.conv_impl = 'lax'
  c.dataset = 'fake_digits'
  c.image_size = 16
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_train_steps = 4
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.log_every_steps = 1
  c.warmup_steps = 1
  c.learning_rate = 0.05
  c.progress_bar = False
  c.async_checkpointing = True
  for k, v in overrides.items():
    if isinstance(v, dict):
      c[k] = ml_collections.ConfigDict(v)
    else:
      c[k] = tuple(v) if isinstance(v, list) else v
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def worker_cmd(spec: dict) -> list[str]:
  return [sys.executable, os.path.join(HERE, 'train_worker.py'),
          json.dumps(spec)]


def worker_env() -> dict:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['PYTHONPATH'] = os.pathsep.join([ROOT, HERE, env.get('PYTHONPATH', '')])
  return env


def parse_result(stdout: str) -> list[dict]:
  for line in stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  raise AssertionError(f'worker printed no RESULT line:\n{stdout[-3000:]}')


def run_worker(spec: dict, timeout: float = 600) -> list[dict]:
  """Runs tests/train_worker.py with ``spec``; its list of final metrics."""
  proc = subprocess.run(worker_cmd(spec), env=worker_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f'worker failed ({proc.returncode}):\n'
                         f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
  return parse_result(proc.stdout)


def digits_dir(tmp_path_factory) -> str:
  """A tfds data_dir with the digits dataset, built once per session."""
  from ghostnet_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.getbasetemp() / 'tfds_digits'
  digits.prepare_digits(str(path), image_size=32)  # a no-op once built
  return str(path)


def sigterm_pipeline(base, step_to_stop: int):
  """``base`` pipeline whose train iterator sends this process SIGTERM while
  fetching the batch of the ``step_to_stop``-th step (1-based).

  Python runs the handler before the next bytecode, so the trainer sees the
  request right after that step, deterministically.
  """

  def train_iterator(**kwargs):
    step = kwargs['start_step']
    for batch in base.train_iterator(**kwargs):
      if step == step_to_stop - 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
      step += 1

  return types.SimpleNamespace(
      get_dataset_info=base.get_dataset_info,
      eval_iterator=base.eval_iterator, train_iterator=train_iterator)


def announcing_pipeline(base, pause_s: float = 0.0):
  """``base`` whose train iterator prints ``BATCH <step>`` (1-based) as it
  hands out the batch of each step, then waits ``pause_s`` seconds (time for
  a signal sent on seeing the line to arrive before that step runs)."""

  def train_iterator(**kwargs):
    step = kwargs['start_step']
    for batch in base.train_iterator(**kwargs):
      step += 1
      print(f'BATCH {step}', flush=True)
      time.sleep(pause_s)
      yield batch

  return types.SimpleNamespace(
      get_dataset_info=base.get_dataset_info,
      eval_iterator=base.eval_iterator, train_iterator=train_iterator)


def announce_saves(ckpt_lib) -> None:
  """Makes the trainer's checkpoint managers print ``SAVE_STARTED <step>``
  once ``save`` returns (an async save is then still being written)."""
  make = ckpt_lib.train_checkpoint_manager

  def train_checkpoint_manager(*args, **kwargs):
    mngr = make(*args, **kwargs)
    save = mngr.save

    def announced(step, *a, **kw):
      out = save(step, *a, **kw)
      print(f'SAVE_STARTED {step}', flush=True)
      return out

    mngr.save = announced
    return mngr

  ckpt_lib.train_checkpoint_manager = train_checkpoint_manager


def slow_checkpoint_commit(seconds: float) -> None:
  """Delays orbax's commit (rename of ``<step>.orbax-checkpoint-tmp``) of
  every checkpoint by ``seconds``: the data is written, the step not yet."""
  import asyncio  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_finalize(self, *args, **kwargs):
    await asyncio.sleep(seconds)
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize


def compilation_cache(tmp_path_factory) -> str:
  """A persistent compilation cache directory shared by a session's workers."""
  return str(tmp_path_factory.getbasetemp() / 'jax_cache')
