"""Runs ``train_and_evaluate`` in a fresh process (multi-device tests).

  python tests/train_worker.py SPEC_JSON

``SPEC_JSON`` is a JSON object: ``devices`` (CPU devices of this process),
``runs`` (a list of ``{"workdir": ..., "config": {field: value}}``, run in
order in this process), and optionally ``distributed`` (``{"coordinator":
"localhost:PORT", "num_processes": n, "process_id": i}``) and ``fake_input``
(use tests/fake_input.py instead of the tfds pipeline). Prints one line
``RESULT <json list of final metrics>``.

The device count is process-wide, so each test that needs several devices
runs this script in its own process.
"""

import json
import os
import sys


def main():
  spec = json.loads(sys.argv[1])
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', int(spec['devices']))
  dist = spec.get('distributed')
  if dist:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  sys.path.insert(0, os.path.dirname(here))
  import train_test_utils  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import train_lib  # pylint: disable=g-import-not-at-top

  if spec.get('fake_input'):
    import fake_input  # pylint: disable=g-import-not-at-top
    train_lib.input_pipeline = fake_input
  results = []
  for run in spec['runs']:
    config = train_test_utils.tiny_config(**run['config'])
    if dist:
      config.distributed = True
      config.coordinator_address = dist['coordinator']
      config.num_processes = dist['num_processes']
      config.process_id = dist['process_id']
    results.append(train_lib.train_and_evaluate(config, run['workdir']))
  print('RESULT ' + json.dumps(results), flush=True)


if __name__ == '__main__':
  main()
