"""GhostNet 1.0x on ImageNet-1k: the GhostNet (CVPR 2020) recipe.

The paper trained in TensorFlow with the ShuffleNet-series setting; the
authors' statements (issues of huawei-noah/Efficient-AI-Backbones): SGD with
momentum 0.9, 5-epoch linear warmup + cosine, ~400 epochs, dropout 0.2 before
the classifier, weight decay 4e-5, lr 0.4 at batch 1024 (recalled from the
paper, UNVERIFIED), label smoothing 0.1 (ShuffleNet setting, UNVERIFIED), no
EMA. Paper: 73.9% top-1. Augmentation: RandomResizedCrop + flip + colour
jitter 0.4 (brightness, contrast, saturation; the authors' MindSpore/TinyNet
recipe; the TF paper run's exact jitter is UNVERIFIED); no RandAugment,
random erasing or mixup (none is mentioned for v1).

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

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """GhostNet 1.0x, 400 epochs, batch 1024, SGD + cosine."""
  c = imagenet.get_config()
  c.model = 'ghostnet_100'
  c.num_epochs = 400.0

  c.optimizer = 'sgd'
  c.learning_rate = 0.4
  c.schedule = 'cosine'
  c.warmup_epochs = 5.0
  c.warmup_init_lr = 0.0
  c.weight_decay = 4e-5
  c.label_smoothing = 0.1
  c.ema_decay = 0.0
  c.color_jitter = 0.4
  return c
