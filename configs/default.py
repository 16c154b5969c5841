"""The default run: a small GhostNet on the embedded digits dataset.

``python train.py`` (no arguments) trains this on a laptop CPU in a few
minutes: GhostNet 0.5x (the full network) at 16x16 on scikit-learn's 8x8
handwritten digits (1797 images, stored upscaled to 32x32 RGB; prepared once
into ``./data/tfds``), 1000 steps of 64 (45 epochs), and reaches ~98% top-1
on the 359 held-out digits. 16x16 keeps all the information of the 8x8
originals at a quarter of the cost of 32x32; the last stages then run on 1x1
maps. ``conv_impl='auto'`` uses the package's compiled depthwise kernels on
the CPU (built by setup.sh): the first step compiles in ~20 s against ~33 s
for ``'lax'``, and 100 steps take about half the time.
Every field below exists in every config; the ImageNet configs start from
this one and override the recipe.

  python train.py                                  # -> ./workdirs/default
  python train.py --config configs/default.py --workdir /tmp/digits \
      --config.num_train_steps=200 --config.batch_size=32
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default (digits) training configuration."""
  c = ml_collections.ConfigDict()

  # --- model ---
  c.model = 'ghostnet_050'             # registry name (ghostnet_jax.list_models())
  c.model_overrides = ml_collections.ConfigDict()  # other model fields, e.g. width
  c.dtype = 'float32'                  # compute dtype: 'float32' or 'bfloat16' (params stay fp32)
  c.dropout = 0.2                      # before the classifier
  c.bn_batch_groups = 1                # 1: global BN stats; -1: one group per device (DDP w/o SyncBN); n: n groups
  c.conv_impl = 'auto'                 # convolution lowering (ghostnet_jax.ops): CPU kernels on CPU, 'lax' elsewhere
  c.init_from = ''                     # converted checkpoint dir to start from (classifier reset if classes differ)
  c.remat = 'none'                     # rematerialisation: 'none', 'blocks' or a policy name
                                       # (ghostnet_jax.remat; saves memory, costs recompute)

  # --- data ---
  c.dataset = 'digits'                 # 'digits' (embedded), a tfds name, e.g. 'imagenet2012',
                                       # or 'folder:/path' (train/<class>/*, val/<class>/*)
  c.folder_bad_files = 'fail'          # folder datasets: non-image/corrupt files 'fail' or 'skip'
  c.data_dir = './data/tfds'           # tfds data_dir; digits is prepared here automatically
  c.train_split = 'train'
  c.eval_split = 'test'                # held-out split for top-1/top-5
  c.image_size = 16                    # training and evaluation resolution
  c.eval_crop_fraction = 1.0           # eval: resize short side to image_size / crop, center crop
  c.interpolation = 'bilinear'
  c.mean = (0.5, 0.5, 0.5)             # normalisation (None: the model's registry defaults)
  c.std = (0.5, 0.5, 0.5)
  c.scale = (0.35, 1.0)                # RandomResizedCrop area range
  c.ratio = (3 / 4, 4 / 3)             # RandomResizedCrop aspect ratio range
  c.hflip = False                      # digits are not mirror-symmetric
  c.worker_count = 0                   # grain worker processes per host (0: in-process)
  # Recipe augmentations (ghostnet_jax.augment, timm semantics); all off here.
  c.rand_augment = ''                  # RandAugment string, e.g. 'rand-m9-mstd0.5' ('' off)
  c.color_jitter = 0.0                 # brightness/contrast/saturation strength (float or 3)
                                       # (ignored when rand_augment is set, as in timm)
  c.random_erasing = 0.0               # probability of one per-pixel-noise box (timm 'pixel')
  c.mixup = 0.0                        # mixup Beta alpha (0 off)
  c.cutmix = 0.0                       # CutMix Beta alpha (0 off)
  c.mixup_prob = 1.0                   # probability a batch is mixed at all
  c.mixup_switch_prob = 0.5            # CutMix instead of mixup when both are on

  # --- knowledge distillation (ghostnet_jax.distill; off while teacher is '') ---
  c.teacher = ''                       # checkpoint: PyTorch file, converted dir or train.py workdir
  c.teacher_model = ''                 # its registry name ('' : from the checkpoint)
  c.distill_weight = 1.0               # loss = CE + distill_weight * KD
  c.distill_temperature = 1.0          # 'soft': T^2 KL(softmax(t/T) || softmax(s/T))
  c.distill_type = 'soft'              # 'soft' or 'hard' (CE against the teacher's argmax)

  # --- length and batch ---
  c.batch_size = 64                    # global batch, split over all devices and processes
  c.eval_batch_size = 128              # global eval batch
  c.num_train_steps = 1000             # > 0 wins over num_epochs
  c.num_epochs = 0.0                   # used when num_train_steps <= 0
  c.seed = 0                           # init, dropout and data order

  # --- optimisation ---
  c.optimizer = 'sgd'                  # 'sgd' or 'rmsprop_tf'
  c.learning_rate = 0.1                # peak learning rate for batch_size
  c.momentum = 0.9
  c.nesterov = True
  c.rmsprop_decay = 0.9                # rmsprop_tf only
  c.rmsprop_eps = 1e-3                 # rmsprop_tf only (inside the sqrt)
  c.schedule = 'cosine'                # 'cosine', 'step' or 'constant'
  c.warmup_epochs = 0.0                # linear warmup (epochs; warmup_steps wins if > 0)
  c.warmup_steps = 50
  c.warmup_init_lr = 0.0
  c.end_lr = 0.0                       # cosine end value
  c.step_decay_epochs = 2.4            # 'step' schedule: decay period (epochs)
  c.step_decay_rate = 0.973            # 'step' schedule: factor per period
  c.lr_noise = ()                      # timm's --lr-noise: (start, end) fractions of the run
                                       # in which each epoch's lr is scaled by 1 + noise (() off)
  c.lr_noise_pct = 0.67                # |noise| < pct (timm's --lr-noise-pct)
  c.lr_noise_std = 1.0                 # noise ~ std * N(0, 1), redrawn until |noise| < pct
  c.weight_decay = 5e-5                # L2 added to the gradient
  c.decay_bn_and_bias = False          # also decay BatchNorm parameters and biases
  c.label_smoothing = 0.1
  c.grad_clip_norm = 0.0               # global-norm clipping (0: off)
  c.ema_decay = 0.0                    # parameter EMA, used for evaluation (0: off)
  c.skip_nonfinite_steps = False       # NaN/Inf loss or gradients: False stops with an error
                                       # naming the step; True skips the update and goes on

  # --- sharding and hosts ---
  c.mesh_shape = (-1, 1)               # (data, fsdp); fsdp > 1 shards params/opt state
  c.fsdp_min_size = 2 ** 14            # arrays with fewer elements stay replicated
  c.distributed = False                # call jax.distributed.initialize (multi-host)
  c.coordinator_address = ''           # optional, for jax.distributed.initialize
  c.num_processes = 0                  # optional (0: auto-detect)
  c.process_id = -1                    # optional (-1: auto-detect)

  # --- checkpoints, evaluation, logging ---
  c.checkpoint_every_steps = 250       # also saved at the end and on preemption
  c.keep_checkpoints = 2               # latest N kept ...
  c.keep_best_checkpoints = 1          # ... plus best N by eval top-1
  c.async_checkpointing = True
  c.eval_every_steps = 250             # 0: only at the end; -1: never
  c.log_every_steps = 50               # stdout/CSV/TensorBoard; each log syncs the host
  c.progress_bar = True
  c.force_unlock = False               # take workdir/train.lock even if it looks held (ghostnet_jax/workdir_lock.py)
  return c
