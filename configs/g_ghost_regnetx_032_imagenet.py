"""G-GhostNet (RegNetX-3.2GF) on ImageNet-1k: the official PyTorch example recipe.

The G-Ghost README says it followed the official PyTorch ImageNet example:
SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256, 100 epochs (step
x0.1 every 30 epochs, or cosine: cosine here), no label smoothing, no EMA,
weight decay on every parameter (the example does not exclude BN/bias).
Dropout before ``fc`` is the model's default. The G-Ghost paper's own recipe
is UNVERIFIED. For large batches scale ``learning_rate`` linearly (0.4 at
1024) and add warmup. FSDP: ``--config.mesh_shape='(-1, 8)'`` shards the
state over groups of 8 devices (one GPU host).

  python train.py --config configs/g_ghost_regnetx_032_imagenet.py \
      --workdir $WORKDIR --config.data_dir=$TFDS_DATA_DIR

Expected cost, from the measured train step (``python
benchmarks/accelerator.py``; assumptions in BENCHMARKS.md: step time =
max(FLOPs at 40% of peak, bytes at 60% of HBM bandwidth), bf16 activations,
gradient all-reduce and input pipeline not included):
10.7 GFLOP and 1.2 GB per image (dense and grouped 3x3 convolutions: far
more arithmetic per byte than GhostNet, but still memory-bound at 40% MFU).
100 epochs x 1.28M images = 128M images, batch 256:
  TPU v4-32 (16 chips):      ~19k img/s, ~1.9 h (30 chip-hours);
  8x A100 (bf16):            ~14k img/s, ~2.5 h (20 GPU-hours).
Both need an input pipeline that keeps up; below that it sets the pace.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """G-Ghost RegNetX-3.2GF, 100 epochs, batch 256, SGD + cosine."""
  c = imagenet.get_config()
  c.model = 'g_ghost_regnetx_032'
  c.batch_size = 256
  c.eval_batch_size = 512
  c.num_epochs = 100.0

  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.schedule = 'cosine'
  c.warmup_epochs = 0.0
  c.weight_decay = 1e-4
  c.decay_bn_and_bias = True
  c.label_smoothing = 0.0
  c.ema_decay = 0.0

  c.mesh_shape = (-1, 1)
  c.checkpoint_every_steps = 5004     # one epoch at batch 256
  c.eval_every_steps = 5004
  return c
