"""Runs ``train_and_evaluate`` in a fresh process (multi-device tests).

  python tests/train_worker.py SPEC_JSON

``SPEC_JSON`` is a JSON object: ``devices`` (CPU devices of this process),
``runs`` (a list of ``{"workdir": ..., "config": {field: value}}``, run in
order in this process), and optionally ``distributed`` (``{"coordinator":
"localhost:PORT", "num_processes": n, "process_id": i}``) and ``fake_input``
(use tests/fake_input.py instead of the tfds pipeline) and
``compilation_cache`` (a persistent JAX compilation cache directory); a run
may have ``sigterm_at`` (send SIGTERM to this process while fetching the
batch of that step, 1-based). With ``announce`` the worker prints
``BATCH <step>`` when it fetches the batch of a step and ``SAVE_STARTED
<step>`` when a checkpoint save has been started (async: still being
written), and waits ``batch_pause_s`` after each ``BATCH`` line; ``slow_commit_s`` delays each checkpoint's commit (the rename of its
temporary directory) by that many seconds, so a test can kill the process
while a checkpoint is half written; ``check_workdir_delay_s`` makes this
process look at the workdir that many seconds late. Prints one line
``RESULT <json list of final metrics>``. Like ``train.py``, a Ctrl-C
(SIGINT) saves and the worker then exits with status 130.

The device count is process-wide, so each test that needs several devices
runs this script in its own process.
"""

import json
import os
import sys
import time


def main():
  spec = json.loads(sys.argv[1])
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', int(spec['devices']))
  if spec.get('compilation_cache'):
    jax.config.update('jax_compilation_cache_dir', spec['compilation_cache'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  dist = spec.get('distributed')
  if dist:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  sys.path.insert(0, os.path.dirname(here))
  import train_test_utils  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import interrupts  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import train_lib  # pylint: disable=g-import-not-at-top
  interrupts.install_cli_handler()  # as train.py does

  import fake_input  # pylint: disable=g-import-not-at-top
  base = fake_input if spec.get('fake_input') else train_lib.input_pipeline
  if spec.get('announce'):
    base = train_test_utils.announcing_pipeline(
        base, spec.get('batch_pause_s', 0.0))
    train_test_utils.announce_saves(train_lib.ckpt_lib)
  if spec.get('slow_commit_s'):
    train_test_utils.slow_checkpoint_commit(spec['slow_commit_s'])
  if spec.get('check_workdir_delay_s'):
    # A slow process: it looks at the workdir after the others could have
    # started writing to it.
    check_workdir = train_lib.check_workdir

    def slow_check_workdir(*args, **kwargs):
      time.sleep(spec['check_workdir_delay_s'])
      return check_workdir(*args, **kwargs)

    train_lib.check_workdir = slow_check_workdir
  results = []
  for run in spec['runs']:
    train_lib.input_pipeline = base
    if run.get('sigterm_at'):
      train_lib.input_pipeline = train_test_utils.sigterm_pipeline(
          base, run['sigterm_at'])
    config = train_test_utils.tiny_config(**run['config'])
    if dist:
      config.distributed = True
      config.coordinator_address = dist['coordinator']
      config.num_processes = dist['num_processes']
      config.process_id = dist['process_id']
    results.append(train_lib.train_and_evaluate(config, run['workdir']))
  print('RESULT ' + json.dumps(results), flush=True)
  sys.exit(interrupts.exit_code(results[-1]) if results else 0)


if __name__ == '__main__':
  main()
