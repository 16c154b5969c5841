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

Expected cost, from the measured train step (``python
benchmarks/accelerator.py``; assumptions in BENCHMARKS.md: step time =
max(FLOPs at 40% of peak, bytes at 60% of HBM bandwidth), bf16 activations,
gradient all-reduce and input pipeline not included):
0.90 GFLOP and 0.57 GB per image (XLA's cost analysis of the lowered and the
compiled step), so the step is memory-bound on accelerators (~1.6 FLOP/byte).
400 epochs x 1.28M images = 512M images:
  TPU v4-32 (16 chips):      ~40k img/s, ~3.6 h (57 chip-hours);
  8x A100 (bf16):            ~30k img/s, ~4.7 h (38 GPU-hours).
Both need an input pipeline that keeps up (``worker_count``: ~10k img/s per
TPU host, ~30k img/s on the GPU host); below that, the pipeline sets the pace.
(XLA:CPU's compiled cost analysis reports 4.75 GFLOP/image because the CPU
backend rewrites grouped convolutions into dense ones; accelerators keep them.)
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
