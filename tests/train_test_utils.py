"""Shared helpers of the trainer tests: a tiny config and a worker launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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
