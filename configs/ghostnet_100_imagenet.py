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

Expected cost. XLA's cost analysis of this train step (fwd + bwd + update,
lowered program; ``jax.jit(step).lower(...).cost_analysis()``) is 0.90
GFLOP per image (forward 0.29 GFLOP = 2 x 146M MACs); 400 epochs x 1.28M
images = 512M images = 4.6e17 FLOP. Assuming 1.5% MFU (depthwise, SE and
BatchNorm make GhostNet memory-bound: MobileNet-class models train at a few
thousand img/s per A100, about 1-2% of bf16 peak):
  TPU v4-32 (16 chips x 275 TFLOP/s): ~2.0 h (~73k img/s, 31 chip-hours);
  8x A100 (8 x 312 TFLOP/s):          ~3.4 h (~41k img/s, 27 GPU-hours).
Both need an input pipeline that keeps up (``worker_count``: ~18k img/s per
TPU host, ~41k img/s on the GPU host); below that, the pipeline sets the pace.
(XLA:CPU's compiled cost analysis reports 4.75 GFLOP/image because the CPU
backend rewrites grouped convolutions; accelerators keep them.)
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """GhostNet 1.0x, 400 epochs, batch 1024, SGD + cosine."""
  c = default.get_config()
  c.model = 'ghostnet_100'
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
