"""What every ImageNet-1k recipe here shares: the data, the input and the run.

Not a recipe of its own: the papers' configs (``ghostnet_100_imagenet``,
``ghostnetv2_100_imagenet``, ``g_ghost_regnetx_032_imagenet``) start from
this and set the model, batch, length and optimiser. Starts from
``configs/default.py``, so every trainer field exists.

ImageNet comes from tfds (``imagenet2012``, prepared by hand under
``data_dir``: tfds cannot download it). Training input: Inception
random-resized crop (area 8-100%) + horizontal flip at 224x224; evaluation:
resize and centre crop 0.875; mean/std: the model's registry defaults.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """ImageNet data, bf16 compute, checkpoints every epoch at batch 1024."""
  c = default.get_config()
  c.dtype = 'bfloat16'
  c.conv_impl = 'auto'
  c.dropout = 0.2

  c.dataset = 'imagenet2012'
  c.data_dir = './data/tfds'
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.image_size = 224
  c.eval_crop_fraction = 0.875
  c.interpolation = 'bilinear'
  c.mean = None                       # the model's defaults (ImageNet mean/std)
  c.std = None
  c.scale = (0.08, 1.0)
  c.hflip = True
  c.worker_count = 16

  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.num_train_steps = -1              # from num_epochs

  c.momentum = 0.9
  c.nesterov = False
  c.warmup_steps = 0                  # warmup_epochs instead

  c.checkpoint_every_steps = 1251     # one epoch at batch 1024
  c.eval_every_steps = 1251 * 5
  c.keep_checkpoints = 2
  c.keep_best_checkpoints = 1
  c.log_every_steps = 100
  return c
