"""Train a GhostNet-family model: a thin CLI over ``train_and_evaluate``.

  python train.py                                   # digits demo, a few minutes on a CPU
  python train.py --config configs/ghostnet_100_imagenet.py \\
      --workdir gs://bucket/ghostnet_100 --config.data_dir=/data/tfds
  python train.py --config configs/default.py --config.batch_size=128 \\
      --config.num_train_steps=2000 --workdir workdirs/digits_long

Rerunning a command resumes from the last checkpoint in its workdir. Without
``--workdir`` runs go to ``./workdirs/<config file name>``. Every config field
can be overridden with ``--config.FIELD=VALUE``; see ``configs/default.py``.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, 'configs', 'default.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Training configuration file.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Run directory (checkpoints, metrics); default ./workdirs/<config name>.')


def default_workdir(config_path: str) -> str:
  """``./workdirs/<config file name without .py and :args>``."""
  name = os.path.basename(config_path.split(':')[0])
  return os.path.join('workdirs', os.path.splitext(name)[0])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO lines: -v 0 shows them
  from ghostnet_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache()  # GHOSTNET_JAX_CACHE_DIR=off: no cache
  from ghostnet_jax import train_lib  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  if workdir is None:
    workdir = default_workdir(config_flags.get_config_filename(
        flags.FLAGS['config']))
    print(f'No --workdir given: using {os.path.abspath(workdir)}',
          flush=True)
  try:
    train_lib.train_and_evaluate(_CONFIG.value, workdir)
  except (train_lib.ConfigError, train_lib.NonFiniteLossError,
          train_lib.CheckpointWriteError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
