"""GhostNet 1.0x on ImageNet-1k: the GhostNet (CVPR 2020) recipe.

The paper trained in TensorFlow with the ShuffleNet-series setting; the
authors' statements (issues of huawei-noah/Efficient-AI-Backbones): SGD with
momentum 0.9, 5-epoch linear warmup + cosine, ~400 epochs, dropout 0.2 before
the classifier, weight decay 4e-5, lr 0.4 at batch 1024 (recalled from the
paper, UNVERIFIED), label smoothing 0.1 (ShuffleNet setting, UNVERIFIED), no
EMA. Paper: 73.9% top-1. Augmentation here: RandomResizedCrop + flip (the
paper's colour jitter is not implemented).

  python train.py --config configs/ghostnet_100_imagenet.py \
      --workdir $WORKDIR --config.data_dir=$TFDS_DATA_DIR
  # multi-host (TPU pod slice / several GPU hosts): run the same command on
  # every host with --config.distributed=True

Expected cost (COST_PLACEHOLDER)
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """GhostNet 1.0x, 400 epochs, batch 1024, SGD + cosine."""
  c = default.get_config()
  c.model = 'ghostnet_100'
  c.dtype = 'bfloat16'
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
  c.num_train_steps = -1
  c.num_epochs = 400.0

  c.optimizer = 'sgd'
  c.learning_rate = 0.4
  c.momentum = 0.9
  c.nesterov = False
  c.schedule = 'cosine'
  c.warmup_steps = 0
  c.warmup_epochs = 5.0
  c.warmup_init_lr = 0.0
  c.weight_decay = 4e-5
  c.label_smoothing = 0.1
  c.ema_decay = 0.0

  c.checkpoint_every_steps = 1251     # one epoch
  c.eval_every_steps = 1251 * 5
  c.keep_checkpoints = 2
  c.keep_best_checkpoints = 1
  c.log_every_steps = 100
  return c
