"""Train a GhostNet-family model: a thin CLI over ``train_and_evaluate``.

  python train.py                                   # digits demo, a few minutes on a CPU
  python train.py --config configs/ghostnet_100_imagenet.py \\
      --workdir gs://bucket/ghostnet_100 --config.data_dir=/data/tfds
  python train.py --config configs/default.py --config.batch_size=128 \\
      --config.num_train_steps=2000 --workdir workdirs/digits_long

Rerunning a command resumes from the last checkpoint in its workdir. Without
``--workdir`` runs go to ``./workdirs/<config file name>``. Every config field
can be overridden with ``--config.FIELD=VALUE``; see ``configs/default.py``.
The command line itself is :mod:`ghostnet_jax.train_cli`.
"""

from absl import app

from ghostnet_jax.train_cli import default_workdir, main  # noqa: F401

if __name__ == '__main__':
  app.run(main)
