"""The command line of ``train.py`` (also ``python -m ghostnet_jax.train_cli``
or ``ghostnet-train`` where the package is installed).

  python -m ghostnet_jax.train_cli                  # digits demo, a few minutes on a CPU
  python -m ghostnet_jax.train_cli --config configs/ghostnet_100_imagenet.py \\
      --workdir gs://bucket/ghostnet_100 --config.data_dir=/data/tfds

Rerunning a command resumes from the last checkpoint in its workdir. Without
``--workdir`` runs go to ``./workdirs/<config file name>``. Every config field
can be overridden with ``--config.FIELD=VALUE``; see ``configs/default.py``.
Without ``--config`` the default (digits) config runs: the repository's
``configs/default.py`` in a source checkout, the copy the wheel ships as
``ghostnet_jax/configs/default.py`` where the package is installed.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def default_config_path() -> str:
  """The default config: the wheel's copy, else the source checkout's."""
  for path in (os.path.join(_PACKAGE, 'configs', 'default.py'),
               os.path.join(os.path.dirname(_PACKAGE), 'configs',
                            'default.py')):
    if os.path.exists(path):
      return path
  raise FileNotFoundError('configs/default.py is neither in the package nor '
                          'in a source checkout; pass --config.')


_CONFIG = config_flags.DEFINE_config_file(
    'config', default_config_path(), 'Training configuration file.',
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
  from ghostnet_jax import data_faults, integrity, interrupts, workdir_lock  # pylint: disable=g-import-not-at-top
  interrupts.install_cli_handler()  # Ctrl-C saves and exits 130; twice: at once
  try:
    final = train_lib.train_and_evaluate(_CONFIG.value, workdir)
  except (train_lib.ConfigError, train_lib.NonFiniteLossError,
          train_lib.CheckpointWriteError, workdir_lock.WorkdirLockedError,
          data_faults.InputDataError,
          integrity.CheckpointIntegrityError) as e:
    raise SystemExit(f'error: {e}') from None
  raise SystemExit(interrupts.exit_code(final))


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == '__main__':
  run()
