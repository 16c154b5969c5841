"""Test config: configs/default.py with a two-stage GhostNet and a few steps.

  python train.py --config tests/tiny_digits_config.py --workdir DIR \
      --config.data_dir=DATA_DIR
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model_overrides = ml_collections.ConfigDict(
      {'blocks': (((3, 16, 16, 0.0, 1),), ((3, 48, 24, 0.25, 2),))})
  c.conv_impl = 'lax'
  c.image_size = 16
  c.batch_size = 32
  c.num_train_steps = 6
  c.warmup_steps = 2
  c.checkpoint_every_steps = 3
  c.eval_every_steps = 3
  c.log_every_steps = 2
  return c
