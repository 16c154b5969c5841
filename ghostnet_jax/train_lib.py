"""Sharded training and evaluation: ``train_and_evaluate(config, workdir)``.

One ``jax.jit`` program trains on all devices of all processes. The file
reads top to bottom like the loop it runs, in titled sections:

  validation -> mesh -> input -> model and optimizer -> sharding -> step ->
  checkpoint -> eval -> loop

Design (see ``configs/default.py`` for every config field):

* **Mesh** ``('data', 'fsdp')`` (:mod:`ghostnet_jax.sharding`): the batch is
  split over every device; the train state is replicated, or sharded over
  ``'fsdp'`` FSDP-style when ``mesh_shape[1] > 1``.
* **State** (:class:`TrainState`): step, params, batch_stats, optax state and
  an optional EMA of params and batch_stats. Born sharded
  (``jax.jit(init, out_shardings=...)``) and donated to the step.
* **Input**: each process reads its slice of the global batch (the pipeline
  is a pure function of ``(seed, step)``), ``jax.make_array_from_process_local_data``
  assembles global arrays. The loop runs under ``jax.transfer_guard('disallow')``:
  every host/device transfer in it is explicit.
* **Checkpoints** (orbax ``CheckpointManager`` in ``workdir/checkpoints``):
  async, the latest ``keep_checkpoints`` plus the best ``keep_best_checkpoints``
  by eval top-1, a save on SIGTERM / preemption, automatic resume (the step
  is enough to resume the data exactly).
* **Metrics** (:mod:`ghostnet_jax.train_logging`): stdout with a progress
  bar, TensorBoard, ``metrics.csv``, ``metrics.png``; ``final_metrics.json``
  and ``config.json`` in the workdir. Process 0 writes them.

Bad input fails before any compute with a :class:`ConfigError` naming the
field (also an unwritable workdir), and nothing already in the workdir is
touched.

Faults during a run:

* **kill -9**: orbax writes each step into ``<step>.orbax-checkpoint-tmp``
  and renames it when complete; the rerun resumes from the last committed
  step and removes the temporary directories (tests/test_faults.py).
* **NaN / Inf** loss or gradients: counted on the device; at the next log,
  eval or checkpoint step a :class:`NonFiniteLossError` names the first bad
  step and the fixes, before anything of the bad state is saved. With
  ``skip_nonfinite_steps`` such steps leave the state as it was instead.
* **A failed checkpoint write** (full disk, permissions): a
  :class:`CheckpointWriteError` naming the step and the intact checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import input_pipeline
from ghostnet_jax import ops
from ghostnet_jax import optim
from ghostnet_jax import registry
from ghostnet_jax import sharding as shd
from ghostnet_jax import train_logging
from ghostnet_jax import data_faults, integrity, interrupts, peer_watchdog, workdir_lock  # issue-17 hook

CONFIG_NAME = ckpt_lib.CONFIG_NAME
FINAL_METRICS_NAME = 'final_metrics.json'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration (or workdir) that cannot be trained; names the field."""


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf; names the first bad step.

  Raised where the host looks at the metrics (log, eval and checkpoint
  steps), always before a checkpoint of the bad state could be written.
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...).

  Orbax writes each step into a temporary directory and renames it when
  complete, so the checkpoints committed before are left as they were.
  """


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; what a checkpoint holds.

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics.
    opt_state: the optax state.
    ema: ``{'params', 'batch_stats'}`` exponential moving averages, or None.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = None


# ------------------------------------------------------------------------------
# Validation (pure Python: no device is touched)
# ------------------------------------------------------------------------------


REQUIRED_FIELDS = ('model', 'dataset', 'batch_size', 'num_train_steps',
                   'checkpoint_every_steps', 'seed')
# Every field the trainer reads; configs/default.py documents each one.
FIELDS = REQUIRED_FIELDS + (
    'model_overrides', 'dtype', 'dropout', 'bn_batch_groups', 'conv_impl',
    'init_from', 'data_dir', 'train_split', 'eval_split', 'image_size',
    'eval_crop_fraction', 'interpolation', 'mean', 'std', 'scale', 'ratio',
    'hflip', 'worker_count', 'eval_batch_size', 'num_epochs', 'optimizer',
    'learning_rate', 'momentum', 'nesterov', 'rmsprop_decay', 'rmsprop_eps',
    'schedule', 'warmup_epochs', 'warmup_steps', 'warmup_init_lr', 'end_lr',
    'step_decay_epochs', 'step_decay_rate', 'weight_decay',
    'decay_bn_and_bias', 'label_smoothing', 'grad_clip_norm', 'ema_decay',
    'mesh_shape', 'fsdp_min_size', 'distributed', 'coordinator_address',
    'num_processes', 'process_id', 'keep_checkpoints',
    'keep_best_checkpoints', 'async_checkpointing', 'eval_every_steps',
    'log_every_steps', 'progress_bar', 'skip_nonfinite_steps',
    'force_unlock')  # issue-17 hook: force_unlock


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks everything that needs no device and no data.

  Raises:
    ConfigError: naming the first bad field.
  """
  for name in REQUIRED_FIELDS:
    if name not in config:
      raise ConfigError(f'config.{name} is missing; every config needs '
                        f'{", ".join(REQUIRED_FIELDS)}.')
  missing = [name for name in FIELDS if name not in config]
  if missing:
    raise ConfigError(
        f'config lacks {", ".join("config." + m for m in missing)}; start a '
        'config from configs/default.py (default.get_config()) and override '
        'fields.')
  try:
    registry.get_entry(config.model)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from None

  def positive(name, allow_zero=False):
    v = config.get(name)
    if v is None or not isinstance(v, (int, float)) or isinstance(v, bool):
      raise ConfigError(f'config.{name} must be a number; got {v!r}.')
    if v < 0 or (v == 0 and not allow_zero):
      raise ConfigError(f'config.{name} must be {">= 0" if allow_zero else "> 0"}'
                        f'; got {v!r}.')

  for name in ('batch_size', 'eval_batch_size', 'learning_rate',
               'checkpoint_every_steps', 'log_every_steps', 'image_size'):
    positive(name)
  for name in ('weight_decay', 'label_smoothing', 'grad_clip_norm',
               'ema_decay', 'warmup_steps', 'warmup_epochs', 'warmup_init_lr',
               'end_lr', 'momentum', 'dropout',
               'keep_checkpoints', 'keep_best_checkpoints'):
    positive(name, allow_zero=True)
  for name in ('batch_size', 'eval_batch_size', 'checkpoint_every_steps',
               'log_every_steps', 'image_size', 'warmup_steps',
               'eval_every_steps', 'keep_checkpoints', 'keep_best_checkpoints'):
    if int(config[name]) != config[name]:
      raise ConfigError(f'config.{name} must be an integer; got '
                        f'{config[name]!r}.')
  if config.num_train_steps <= 0 and not config.get('num_epochs', 0) > 0:
    raise ConfigError(
        f'config.num_train_steps must be > 0 (or config.num_epochs > 0); got '
        f'num_train_steps={config.num_train_steps}, '
        f'num_epochs={config.get("num_epochs")}.')
  if not isinstance(config.skip_nonfinite_steps, bool):
    raise ConfigError(f'config.skip_nonfinite_steps must be True or False; '
                      f'got {config.skip_nonfinite_steps!r}.')
  if not isinstance(config.eval_every_steps, int) or config.eval_every_steps < -1:
    raise ConfigError(f'config.eval_every_steps must be an int >= -1 (0: at '
                      f'the end only, -1: never); got '
                      f'{config.eval_every_steps!r}.')
  if config.keep_checkpoints < 1:
    raise ConfigError('config.keep_checkpoints must be >= 1 (resume needs '
                      'the latest checkpoint).')
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f'config.ema_decay must be in [0, 1); got '
                      f'{config.ema_decay}.')
  if not 0 <= config.label_smoothing < 1:
    raise ConfigError(f'config.label_smoothing must be in [0, 1); got '
                      f'{config.label_smoothing}.')
  if not 0 <= config.dropout < 1:
    raise ConfigError(f'config.dropout must be in [0, 1); got '
                      f'{config.dropout}.')
  if config.optimizer not in optim.OPTIMIZERS:
    raise ConfigError(f'config.optimizer must be one of {optim.OPTIMIZERS}; '
                      f'got {config.optimizer!r}.')
  if config.schedule not in optim.SCHEDULES:
    raise ConfigError(f'config.schedule must be one of {optim.SCHEDULES}; '
                      f'got {config.schedule!r}.')
  if config.schedule == 'step' and not (config.step_decay_epochs > 0 and
                                        config.step_decay_rate > 0):
    raise ConfigError('config.step_decay_epochs and config.step_decay_rate '
                      'must be > 0 for the step schedule.')
  if config.dtype not in DTYPES:
    raise ConfigError(f'config.dtype must be one of {sorted(DTYPES)}; got '
                      f'{config.dtype!r}.')
  if config.conv_impl not in ops.IMPLS:
    raise ConfigError(f'config.conv_impl must be one of {ops.IMPLS}; got '
                      f'{config.conv_impl!r}.')
  g = config.bn_batch_groups
  if not isinstance(g, int) or (g < 1 and g != -1):
    raise ConfigError(f'config.bn_batch_groups must be -1 (one group per '
                      f'device) or >= 1; got {g!r}.')
  try:
    shd.check_mesh_shape(config.mesh_shape)  # the device count comes later
  except ValueError as e:
    raise ConfigError(f'config.mesh_shape: {e}') from None
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f'config.init_from: no checkpoint directory at '
                      f'{config.init_from!r}.')


def validate_devices(config: ml_collections.ConfigDict, num_devices: int,
                     process_count: int) -> tuple[int, int]:
  """Checks batch sizes and mesh against the devices; returns the mesh shape.

  Raises:
    ConfigError: naming the field.
  """
  try:
    mesh_shape = shd.resolve_mesh_shape(config.mesh_shape, num_devices)
  except ValueError as e:
    raise ConfigError(f'config.mesh_shape: {e}') from None
  for name in ('batch_size', 'eval_batch_size'):
    b = config[name]
    if b % num_devices:
      raise ConfigError(
          f'config.{name}={b} is not divisible by the {num_devices} devices; '
          f'use a multiple of {num_devices}.')
    if b % process_count:
      raise ConfigError(
          f'config.{name}={b} is not divisible by the {process_count} '
          'processes.')
  groups = bn_groups(config, num_devices)
  if config.batch_size % groups:
    raise ConfigError(f'config.batch_size={config.batch_size} is not '
                      f'divisible by config.bn_batch_groups={groups}.')
  return mesh_shape


def bn_groups(config, num_devices: int) -> int:
  """BatchNorm groups: ``bn_batch_groups``, with -1 meaning one per device."""
  g = config.bn_batch_groups
  return num_devices if g == -1 else g


def _tuples(v):
  if isinstance(v, (list, tuple)):
    return tuple(_tuples(x) for x in v)
  return v


def model_from_config(config: ml_collections.ConfigDict, num_classes: int,
                      **overrides) -> nn.Module:
  """The model a config trains (also for a config read from ``config.json``).

  Args:
    config: a training config (or ``restore_workdir(...)['config']``).
    num_classes: classifier outputs (``meta['num_classes']`` of a workdir).
    **overrides: model fields replacing the config's, e.g.
      ``bn_batch_groups=1`` or ``conv_impl='lax'``.
  """
  kwargs = dict(dtype=DTYPES[config.dtype], dropout=config.dropout,
                bn_batch_groups=1 if config.bn_batch_groups == -1 else
                config.bn_batch_groups, conv_impl=config.conv_impl)
  kwargs.update({k: _tuples(v) for k, v in
                 config.get('model_overrides', {}).items()})
  kwargs.update(overrides)
  return registry.create_model(config.model, num_classes=num_classes,
                               **kwargs)


def architecture_signature(model: nn.Module, image_size: int) -> dict:
  """Model facts a checkpoint must match to be resumed: shapes of params.

  Traced with ``jax.eval_shape`` (no compute).
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, image_size, image_size, 3)),
                         train=False))
  flat = sorted(
      (jax.tree_util.keystr(k), tuple(v.shape))
      for k, v in jax.tree_util.tree_leaves_with_path(dict(shapes)))
  digest = hashlib.sha256(repr(flat).encode()).hexdigest()[:16]
  return {'num_arrays': len(flat), 'shapes_sha256': digest}


def check_workdir(workdir: str, meta: dict) -> int | None:
  """Refuses a workdir whose checkpoints belong to another model.

  Args:
    workdir: the run directory.
    meta: this run's checkpoint metadata (model, num_classes, signature).

  Returns:
    The latest checkpointed step to resume from, or None.

  Raises:
    ConfigError: the workdir's checkpoints were made by another model.
  """
  ckpt_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    if os.path.exists(ckpt_dir):
      raise ConfigError(f'{ckpt_dir} exists and is not a directory.')
    return None
  with ocp.CheckpointManager(
      os.path.abspath(ckpt_dir),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers=ckpt_lib.item_handlers()) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    old = mngr.restore(step, args=ocp.args.Composite(**{
        ckpt_lib.META: ocp.args.JsonRestore()}))[ckpt_lib.META]
  for key in ('model', 'num_classes', 'signature'):
    if old.get(key) != meta[key]:
      raise ConfigError(
          f'workdir {workdir} holds checkpoints of another model '
          f'({key}: {old.get(key)!r} there, {meta[key]!r} in this config: '
          f'model {old.get("model")!r} with {old.get("num_classes")} classes). '
          'Use a new --workdir, or the config that made them; nothing in the '
          'workdir was changed.')
  return step


# ------------------------------------------------------------------------------
# Pieces of the step (pure functions)
# ------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with label smoothing (optax)."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array,
                 ks: tuple[int, ...] = (1, 5)) -> dict[int, jax.Array]:
  """Per-example 0/1 top-k correctness for each ``k`` (k capped at classes)."""
  kmax = min(max(ks), logits.shape[-1])
  _, top = jax.lax.top_k(logits, kmax)
  hits = top == labels[:, None]
  return {k: hits[:, :min(k, kmax)].any(-1).astype(jnp.float32) for k in ks}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int,
                    label_smoothing: float, ema_decay: float,
                    seed: int, gather: Callable = lambda t: t,
                    skip_nonfinite: bool = False) -> Callable:
  """The update ``(state, batch) -> (state, metrics)`` over a global batch.

  Dropout keys are ``fold_in(key(seed), step)``: a step's randomness depends
  only on the seed and the step, whatever the sharding, and resumes exactly.

  ``metrics['finite']`` is a boolean scalar: loss and gradient norm are
  finite. With ``skip_nonfinite`` a step where they are not keeps params,
  BatchNorm statistics, optimizer state and EMA as they were (only the step
  counter advances, so the data order is unchanged); the selection happens
  on the device and costs no host transfer.

  ``gather`` maps the stored variables to the ones the model computes with;
  under FSDP it all-gathers them (``with_sharding_constraint`` to replicated)
  so every convolution is partitioned along the batch only, as in data
  parallelism, while parameters and optimizer state stay stored sharded.
  """

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      logits, new_vars = model.apply(
          gather({'params': params, 'batch_stats': state.batch_stats}),
          batch['image'], train=True, mutable=['batch_stats'],
          rngs={'dropout': rng})
      loss = cross_entropy(logits, batch['label'], num_classes,
                           label_smoothing).mean()
      return loss, (logits, new_vars['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = optax.incremental_update({'params': params,
                                      'batch_stats': batch_stats}, ema,
                                     1.0 - ema_decay)
    metrics = {
        'train_loss': loss,
        'train_top1': topk_correct(logits, batch['label'], (1,))[1].mean(),
        'learning_rate': schedule(state.step),
        'grad_norm': optax.global_norm(grads),
    }
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    metrics['finite'] = finite
    new_state = state.replace(params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema=ema)
    if skip_nonfinite:
      new_state = jax.tree_util.tree_map(
          lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state.replace(step=state.step + 1), metrics

  return step_fn


def make_eval_step(model: nn.Module, num_classes: int,
                   gather: Callable = lambda t: t) -> Callable:
  """``(variables, batch) -> sums`` of loss, top-1, top-5 and examples.

  ``batch['mask']`` is 0 on padding examples, which then count nowhere.
  ``gather`` as in :func:`make_train_step`.
  """

  def eval_fn(variables: dict, batch: dict) -> dict:
    logits = model.apply(gather(variables), batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    loss = cross_entropy(logits, batch['label'], num_classes)
    hits = topk_correct(logits, batch['label'], (1, 5))
    return {'loss': (loss * mask).sum(), 'top1': (hits[1] * mask).sum(),
            'top5': (hits[5] * mask).sum(), 'count': mask.sum()}

  return eval_fn


def _to_python(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


# ------------------------------------------------------------------------------
# train_and_evaluate
# ------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Trains ``config.model`` on ``config.dataset``; resumes from ``workdir``.

  Args:
    config: a config from ``configs/`` (see ``configs/default.py``).
    workdir: run directory: checkpoints, metrics, ``config.json`` and, at the
      end, ``final_metrics.json``.

  Returns:
    The final metrics (``step``, ``train_loss``, ``top1``, ``top5``, ...);
    with ``preempted: True`` and no eval if the run stopped on SIGTERM or a
    preemption notice after saving a checkpoint.

  Raises:
    ConfigError: bad config or workdir, before any compute.
  """
  config = ml_collections.ConfigDict(config)  # a copy we may annotate
  workdir = os.path.abspath(workdir)
  ckpt_lib.quiet_orbax_logs()

  # ----------------------------------------------------------------------------
  # Validation, hosts and mesh
  # ----------------------------------------------------------------------------
  validate_config(config)
  if config.distributed:
    kwargs = {}
    if config.coordinator_address:
      kwargs['coordinator_address'] = config.coordinator_address
    if config.num_processes > 0:
      kwargs['num_processes'] = config.num_processes
    if config.process_id >= 0:
      kwargs['process_id'] = config.process_id
    if not jax.distributed.is_initialized():
      jax.distributed.initialize(**kwargs)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  num_devices = jax.device_count()
  mesh_shape = validate_devices(config, num_devices, process_count)
  mesh = shd.make_mesh(mesh_shape)  # ('data', 'fsdp') over every device

  # ----------------------------------------------------------------------------
  # Input: the one place the trainer talks to the input pipeline
  # ----------------------------------------------------------------------------
  data = _Input(config, process_index, process_count)
  num_classes = data.num_classes
  steps_per_epoch = max(data.train_size // config.batch_size, 1)
  total_steps = int(config.num_train_steps if config.num_train_steps > 0
                    else round(config.num_epochs * steps_per_epoch))
  warmup_steps = int(config.warmup_steps or
                     round(config.warmup_epochs * steps_per_epoch))
  do_eval = config.eval_every_steps >= 0
  eval_every = config.eval_every_steps or total_steps

  # ----------------------------------------------------------------------------
  # Model and optimizer
  # ----------------------------------------------------------------------------
  try:
    model = model_from_config(config, num_classes,
                              bn_batch_groups=bn_groups(config, num_devices))
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.model / config.model_overrides: {e}') from None
  schedule = optim.make_schedule(
      schedule=config.schedule, learning_rate=config.learning_rate,
      total_steps=total_steps, warmup_steps=warmup_steps,
      warmup_init_lr=config.warmup_init_lr, end_lr=config.end_lr,
      decay_steps=config.step_decay_epochs * steps_per_epoch,
      decay_rate=config.step_decay_rate)
  tx = optim.make_optimizer(
      optimizer=config.optimizer, schedule=schedule,
      momentum=config.momentum, nesterov=config.nesterov,
      weight_decay=config.weight_decay, decay_all=config.decay_bn_and_bias,
      rmsprop_decay=config.rmsprop_decay, rmsprop_eps=config.rmsprop_eps,
      grad_clip_norm=config.grad_clip_norm)
  meta = {
      'model': config.model,
      'num_classes': num_classes,
      'signature': architecture_signature(model, config.image_size),
      'dataset': config.dataset,
      'dataset_name': data.dataset,  # the tfds name the pipeline reads
      'class_names': list(data.class_names or []),
  }
  # issue-17 hook: one writer per workdir (process 0 locks, before anything is
  # written); newer checkpoints failing their integrity check are set aside.
  workdir_lock.acquire_for_run(
      workdir, force=config.force_unlock, is_main=is_main,
      process_count=process_count, check=lambda: check_writable(workdir),
      prepare=lambda: integrity.select_resume_step(
          os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)))
  # The last check before compute: a workdir of another model is refused.
  resume_step = check_workdir(workdir, meta)
  if jax.process_count() > 1:
    # check_workdir opens a checkpoint manager (with its own cross-process
    # barriers) only if checkpoints/ exists: no process may create it (below)
    # before every process has looked, or they take different barriers.
    multihost_utils.sync_global_devices('train_and_evaluate:workdir_checked')
  final_path = os.path.join(workdir, FINAL_METRICS_NAME)
  if (resume_step is not None and resume_step >= total_steps and
      os.path.exists(final_path)):
    with open(final_path) as f:
      final = json.load(f)
    if is_main:
      print(f'{workdir} already holds a finished run ({resume_step} of '
            f'{total_steps} steps): top-1 {_pct(final.get("top1"))}, '
            f'top-5 {_pct(final.get("top5"))}; see {final_path}. Nothing to '
            'do; use a new --workdir to train again.', flush=True)
    return final
  watchdog = peer_watchdog.start(workdir, process_index, process_count)  # issue-17 hook
  init_variables = None
  if config.init_from and resume_step is None:
    init_variables = _load_init_from(config, model, num_classes)

  def init_state(rng):
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init(rng, x, train=False)
    return make_state(variables['params'], variables['batch_stats'])

  def make_state(params, batch_stats):
    ema = None
    if config.ema_decay > 0:
      ema = {'params': params, 'batch_stats': batch_stats}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=tx.init(params),
                      ema=ema)

  # ----------------------------------------------------------------------------
  # Sharding: batch over all devices, state replicated or FSDP over 'fsdp'
  # ----------------------------------------------------------------------------
  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_sharding = shd.state_shardings(mesh, abstract_state,
                                       config.fsdp_min_size)
  batch_sharding = shd.batch_sharding(mesh)
  replicated = shd.replicated(mesh)

  # ----------------------------------------------------------------------------
  # Step
  # ----------------------------------------------------------------------------
  gather = functools.partial(jax.lax.with_sharding_constraint,
                             shardings=replicated)
  train_step = jax.jit(
      _count_nonfinite(make_train_step(
          model, tx, schedule, num_classes=num_classes,
          label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
          seed=config.seed, gather=gather,
          skip_nonfinite=config.skip_nonfinite_steps)),
      in_shardings=(state_sharding, replicated, batch_sharding),
      out_shardings=(state_sharding, replicated, replicated),
      donate_argnums=(0, 1))
  eval_step = jax.jit(
      make_eval_step(model, num_classes, gather),
      in_shardings=(_eval_variables_sharding(state_sharding), batch_sharding),
      out_shardings=replicated)

  # ----------------------------------------------------------------------------
  # Checkpoint: resume, or initialise (born sharded)
  # ----------------------------------------------------------------------------
  if is_main:
    check_writable(workdir)
    _write_json(os.path.join(workdir, CONFIG_NAME), json.loads(
        config.to_json_best_effort()))
  mngr = ckpt_lib.train_checkpoint_manager(
      os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR),
      keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
      async_save=config.async_checkpointing)
  abstract_sharded = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  if resume_step is not None:
    state = mngr.restore(resume_step, args=ocp.args.Composite(**{
        ckpt_lib.STATE: ocp.args.StandardRestore(abstract_sharded)
    }))[ckpt_lib.STATE]
  elif init_variables is not None:
    state = jax.jit(make_state, out_shardings=state_sharding)(
        *jax.device_put((init_variables['params'],
                         init_variables['batch_stats']),
                        (state_sharding.params, state_sharding.batch_stats)))
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)(
        jax.random.key(config.seed))
  start_step = int(jax.device_get(state.step))

  # Steps whose save was started (async saves finish in the background; a
  # failure shows in a later save() or wait_until_finished()).
  saves = []

  def save(step, metrics=None, force=False):
    check_finite(step)  # never checkpoint a NaN state
    saves.append(step)
    with _checkpoint_errors(mngr, saves):
      mngr.save(step, args=ocp.args.Composite(**{
          ckpt_lib.STATE: ocp.args.StandardSave(state),
          ckpt_lib.META: ocp.args.JsonSave({**meta, 'step': step}),
      }), metrics=metrics, force=force)

  # Non-finite steps: counted on the device ({first step, count}); the host
  # looks only where it fetches metrics anyway and before every save.
  health = jax.device_put(
      {'first_step': np.zeros((), np.int32), 'count': np.zeros((), np.int32)},
      replicated)
  seen = {'step': -1, 'count': 0}

  def check_finite(step):
    if seen['step'] == step:
      return
    seen['step'] = step
    h = {k: int(v) for k, v in jax.device_get(health).items()}
    if not h['count'] or h['count'] == seen['count']:
      return
    if config.skip_nonfinite_steps:
      logger.print(f'Skipped {h["count"] - seen["count"]} step(s) with a '
                   f'non-finite loss or gradient up to step {step} '
                   f'({h["count"]} in this run, the first at step '
                   f'{h["first_step"]}).')
      seen['count'] = h['count']
      return
    raise NonFiniteLossError(_nonfinite_message(
        h['first_step'], config, schedule, mngr)
        + integrity.after_restore_hint(  # issue-17 hook
            h['first_step'], resume_step, str(mngr.directory)),
        h['first_step'])

  # ----------------------------------------------------------------------------
  # Eval
  # ----------------------------------------------------------------------------
  def evaluate() -> dict:
    variables = (state.ema if state.ema is not None else
                 {'params': state.params, 'batch_stats': state.batch_stats})
    totals = None
    for batch in data.eval_batches():
      sums = eval_step(variables, shd.put_batch(batch, batch_sharding))
      totals = sums if totals is None else jax.tree_util.tree_map(
          jnp.add, totals, sums)
    totals = _to_python(totals)
    n = max(totals['count'], 1.0)
    return {'eval_loss': totals['loss'] / n, 'eval_top1': totals['top1'] / n,
            'eval_top5': totals['top5'] / n, 'eval_count': totals['count']}

  # ----------------------------------------------------------------------------
  # Loop
  # ----------------------------------------------------------------------------
  logger = train_logging.MetricsLogger(
      workdir, total_steps=total_steps, start_step=start_step,
      enabled=is_main, progress=config.progress_bar)
  logger.print(
      f'Training {config.model} ({num_classes} classes) on {config.dataset} '
      f'for {total_steps} steps of {config.batch_size} images '
      f'({total_steps / steps_per_epoch:.1f} epochs) on {num_devices} '
      f'{jax.devices()[0].platform} device(s), {process_count} process(es), '
      f'mesh (data, fsdp) = {mesh_shape}; workdir {workdir}'
      + (f'; resuming from step {start_step}' if start_step else ''))
  preemption = interrupts.Interrupts(enable=process_count == 1)  # issue-17 hook: SIGINT too
  train_iter = data.train_batches(start_step)
  last_train, last_eval, preempted = {}, {}, False
  window_start, window_steps = time.perf_counter(), 0
  run_start = time.perf_counter()
  try:
    with jax.transfer_guard('disallow'):
      for step in range(start_step + 1, total_steps + 1):
        batch = shd.put_batch(next(train_iter), batch_sharding)
        state, health, train_metrics = train_step(state, health, batch)
        window_steps += 1
        logger.update(1)

        if step % config.log_every_steps == 0 or step == total_steps:
          check_finite(step)
          last_train = _to_python(train_metrics)
          elapsed = time.perf_counter() - window_start
          last_train['step_time'] = elapsed / window_steps
          last_train['img_per_sec'] = (window_steps * config.batch_size
                                       / elapsed)
          last_train['epoch'] = step / steps_per_epoch
          # With a progress bar the numbers go to its postfix; without one
          # (batch jobs, logs), one line per log step.
          logger.write(step, last_train, echo=not config.progress_bar)
          logger.update(0, loss=last_train['train_loss'],
                        lr=last_train['learning_rate'],
                        img_s=last_train['img_per_sec'])
          window_start, window_steps = time.perf_counter(), 0
        if step == start_step + 1:  # keep compilation out of img/s
          jax.block_until_ready(train_metrics)
          logger.print(f'First step (with compilation) took '
                       f'{time.perf_counter() - run_start:.1f}s.')
          window_start, window_steps = time.perf_counter(), 0

        eval_metrics = None
        if do_eval and (step % eval_every == 0 or step == total_steps):
          check_finite(step)
          eval_metrics = evaluate()
          last_eval = {**eval_metrics, 'step': step}
          logger.write(step, {k: v for k, v in eval_metrics.items()
                              if k != 'eval_count'})
          window_start, window_steps = time.perf_counter(), 0

        preempted = preemption.requested or mngr.reached_preemption(step)
        if (step % config.checkpoint_every_steps == 0 or
            step == total_steps or preempted):
          save(step, metrics=(None if eval_metrics is None else
                              {'top1': eval_metrics['eval_top1']}),
               force=preempted)
        if preempted:
          logger.print(preemption.message(step, mngr.directory))  # issue-17 hook
          break
    if do_eval and not preempted and not last_eval:  # resumed past the end
      last_eval = {**evaluate(), 'step': start_step}
  finally:
    try:
      with _checkpoint_errors(mngr, saves):
        mngr.wait_until_finished()
    finally:
      preemption.restore()
      logger.close()

  # ----------------------------------------------------------------------------
  # Final report
  # ----------------------------------------------------------------------------
  final = {
      'step': int(jax.device_get(state.step)),
      'train_loss': last_train.get('train_loss'),
      'train_top1': last_train.get('train_top1'),
      'top1': last_eval.get('eval_top1'),
      'top5': last_eval.get('eval_top5'),
      'eval_loss': last_eval.get('eval_loss'),
      'eval_examples': last_eval.get('eval_count'),
      'eval_split': config.eval_split,
      'evaluated_ema': config.ema_decay > 0,
      'best_step': mngr.best_step(),
      'nonfinite_steps_skipped': seen['count'],
      'wall_time_s': time.perf_counter() - run_start,
      'checkpoint_dir': str(mngr.directory),
      'workdir': workdir,
  }
  mngr.close()
  if preempted:
    final['preempted'] = True
    final['interrupted_by'] = preemption.signal_name  # issue-17 hook
    if watchdog is not None:  # issue-17 hook
      watchdog.done()
    return final
  if is_main:
    _write_json(os.path.join(workdir, FINAL_METRICS_NAME), final)
    plot = train_logging.finish_report(  # issue-17 hook: never raises
        logger.csv_path, os.path.join(workdir, train_logging.PLOT_NAME))
    train_loss = final['train_loss']
    logger.print(
        f'Final (step {final["step"]}): train loss '
        f'{"n/a" if train_loss is None else f"{train_loss:.4f}"}, '
        f'{config.eval_split} top-1 {_pct(final["top1"])}, '
        f'top-5 {_pct(final["top5"])} on {int(final["eval_examples"] or 0)} '
        f'images.\n'
        f'  checkpoints: {final["checkpoint_dir"]} (best step '
        f'{final["best_step"]})\n'
        f'  metrics:     {os.path.join(workdir, FINAL_METRICS_NAME)}, '
        f'{logger.csv_path}, {os.path.join(workdir, "tensorboard")}\n'
        f'  plot:        {plot}')
  if watchdog is not None:  # issue-17 hook
    watchdog.done()
  return final


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and proves it (and its checkpoints) take
  a file, before any compute.

  Raises:
    ConfigError: naming the directory and the OS error; nothing already in
      it was changed.
  """
  probe_dirs = [workdir, os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)]
  try:
    os.makedirs(workdir, exist_ok=True)
    for d in probe_dirs:
      if not os.path.isdir(d):
        continue
      probe = os.path.join(d, f'.write_test.{os.getpid()}')
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f'workdir {workdir} is not writable: {e.strerror or e} '
        f'({e.filename or workdir}). Fix its permissions or free '
        'space, or use another --workdir; nothing in it was changed.'
    ) from None


class _checkpoint_errors:  # pylint: disable=invalid-name
  """Turns an ``OSError`` of an orbax save into a :class:`CheckpointWriteError`
  naming the step, the directory and the checkpoints that are still intact."""

  def __init__(self, mngr: ocp.CheckpointManager, saves: list[int]):
    self.mngr, self.saves = mngr, saves

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is None or not isinstance(exc, OSError) or isinstance(
        exc, CheckpointWriteError):
      return False
    directory = str(self.mngr.directory)
    kept = sorted(_committed_steps(directory))
    # An async save fails in the background and shows at a later call: the
    # failed one is the first started save that was not committed.
    pending = [s for s in self.saves if s not in kept and s > max(kept or [-1])]
    step = pending[0] if pending else (self.saves or [None])[-1]
    raise CheckpointWriteError(
        exc.errno,
        f'Could not write the checkpoint of step {step} to {directory}: '
        f'{exc.strerror or exc}. {integrity.write_error_cause(exc)} '  # issue-17 hook
        f'The checkpoints committed before (steps {kept}) are '
        'intact; once fixed, rerun the same command to '
        f'resume from step {kept[-1] if kept else 0}.') from exc


def _committed_steps(directory: str) -> list[int]:
  """Steps whose orbax directory was committed (renamed from its tmp name)."""
  if not os.path.isdir(directory):
    return []
  return [int(n) for n in os.listdir(directory)
          if n.isdigit() and os.path.isdir(os.path.join(directory, n))]


def _count_nonfinite(step_fn: Callable) -> Callable:
  """``(state, health, batch) -> (state, health, metrics)``: ``step_fn``
  with a device-side count of non-finite steps and the first one (1-based)."""

  def fn(state, health, batch):
    new_state, metrics = step_fn(state, batch)
    bad = ~metrics.pop('finite')
    first = jnp.where(bad & (health['count'] == 0), new_state.step,
                      health['first_step'])
    return new_state, {'first_step': first,
                       'count': health['count'] + bad.astype(jnp.int32)}, metrics

  return fn


def _nonfinite_message(step: int, config, schedule, mngr) -> str:
  mngr.wait_until_finished()  # saves started before are good: let them land
  kept = sorted(_committed_steps(str(mngr.directory)))
  with jax.transfer_guard('allow'):  # an error path, once
    lr = float(schedule(step - 1))
  hints = [f'lower config.learning_rate (now {config.learning_rate:g}; '
           f'{lr:.3g} at that step)']
  if config.dtype == 'bfloat16':
    hints.append("disable bf16 compute (config.dtype='float32')")
  else:
    hints.append("keep config.dtype='float32' (bfloat16 overflows sooner)")
  if not config.grad_clip_norm:
    hints.append('clip gradients (config.grad_clip_norm=1.0)')
  hints.append('or set config.skip_nonfinite_steps=True to skip such steps')
  return (f'The loss or the gradients became NaN/Inf at step {step}. The '
          f'state after it was not saved: the checkpoints in {mngr.directory} '
          f'(steps {kept}) are from before and untouched, and a rerun resumes '
          f'from step {kept[-1] if kept else 0}. To fix: '
          + '; '.join(hints) + '.')


def _pct(v) -> str:
  return 'n/a' if v is None else f'{100 * v:.2f}%'


def _eval_variables_sharding(state_sharding: TrainState) -> dict:
  src = state_sharding.ema if state_sharding.ema is not None else {
      'params': state_sharding.params,
      'batch_stats': state_sharding.batch_stats}
  return src


def _load_init_from(config, model: nn.Module, num_classes: int) -> dict:
  """Converted weights for ``config.init_from``; classifier reset if needed.

  Raises:
    ConfigError: another model, or shapes that do not match.
  """
  variables, meta = ckpt_lib.restore_converted(config.init_from)
  if meta.get('model') not in (None, config.model):
    raise ConfigError(
        f'config.init_from holds {meta.get("model")!r} weights but '
        f'config.model is {config.model!r}.')
  fresh = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(
          (1, config.image_size, config.image_size, 3)), train=False))
  out = {}
  for col in ('params', 'batch_stats'):
    want = flax.traverse_util.flatten_dict(dict(fresh[col]), sep='/')
    have = flax.traverse_util.flatten_dict(dict(variables[col]), sep='/')
    merged = {}
    for k, spec in want.items():
      v = have.get(k)
      if v is not None and tuple(v.shape) == tuple(spec.shape):
        merged[k] = np.asarray(v, spec.dtype)
      elif k.startswith('classifier/'):
        merged[k] = None  # re-initialised below
      else:
        raise ConfigError(
            f'config.init_from: {col}/{k} is '
            f'{None if v is None else tuple(v.shape)} in the checkpoint, '
            f'{tuple(spec.shape)} in the model.')
    out[col] = merged
  if any(v is None for v in out['params'].values()):
    init = jax.jit(lambda r: model.init(r, jnp.zeros(
        (1, config.image_size, config.image_size, 3)), train=False))(
            jax.random.key(config.seed))
    fresh_flat = flax.traverse_util.flatten_dict(dict(init['params']), sep='/')
    out['params'] = {k: (np.asarray(fresh_flat[k]) if v is None else v)
                     for k, v in out['params'].items()}
  return {col: flax.traverse_util.unflatten_dict(v, sep='/')
          for col, v in out.items()}


DIGITS_ALIASES = ('digits', 'ghostnet_digits')


class _Input:
  """The trainer's view of :mod:`ghostnet_jax.input_pipeline`.

  ``dataset='digits'`` builds the embedded digits dataset into ``data_dir``
  the first time (``ghostnet_digits/32``, or ``/64`` for images above 32).
  """

  def __init__(self, config, process_index: int, process_count: int):
    self.config = config
    self.process_index = process_index
    self.process_count = process_count
    try:
      if config.dataset in DIGITS_ALIASES:
        from ghostnet_jax.datasets import digits  # pylint: disable=g-import-not-at-top
        info = digits.prepare_digits(
            config.data_dir, image_size=32 if config.image_size <= 32 else 64)
      else:
        info = input_pipeline.get_dataset_info(config.dataset,
                                               config.data_dir or None)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ConfigError(f'config.dataset={config.dataset!r} '
                        f'(data_dir {config.data_dir!r}): {e}') from None
    self.info = info
    self.dataset = info.name
    self.data_dir = config.data_dir or None
    for field in ('train_split', 'eval_split'):
      split = config[field]
      if split not in info.splits:
        raise ConfigError(f'config.{field}={split!r} is not a split of '
                          f'{config.dataset!r}; splits: {sorted(info.splits)}.')
    self.num_classes = info.num_classes
    self.train_size = info.splits[config.train_split]
    self.class_names = getattr(info, 'class_names', None)
    eval_cfg = registry.get_eval_config(config.model)
    self.mean = tuple(config.mean) if config.mean else eval_cfg.mean
    self.std = tuple(config.std) if config.std else eval_cfg.std
    if config.batch_size > self.train_size:
      raise ConfigError(
          f'config.batch_size={config.batch_size} is larger than the '
          f'{self.train_size} examples of {config.dataset}:{config.train_split}.')

  def train_batches(self, start_step: int) -> Iterator[dict]:
    """Local batches for steps ``start_step, start_step + 1, ...``."""
    c = self.config
    return data_faults.named_errors(iter(input_pipeline.train_iterator(  # issue-17 hook
        dataset=self.dataset, data_dir=self.data_dir, split=c.train_split,
        global_batch_size=c.batch_size, image_size=c.image_size, seed=c.seed,
        start_step=start_step, mean=self.mean, std=self.std,
        interpolation=c.interpolation, scale=tuple(c.scale),
        ratio=tuple(c.ratio), hflip=c.hflip,
        process_index=self.process_index, process_count=self.process_count,
        worker_count=c.worker_count)),
        dataset=self.dataset, data_dir=self.data_dir, split=c.train_split)  # issue-17 hook

  def eval_batches(self) -> Iterator[dict]:
    """Local padded eval batches with a ``mask``, one pass over the split."""
    c = self.config
    return iter(input_pipeline.eval_iterator(
        dataset=self.dataset, data_dir=self.data_dir, split=c.eval_split,
        global_batch_size=c.eval_batch_size, image_size=c.image_size,
        crop_fraction=c.eval_crop_fraction, interpolation=c.interpolation,
        mean=self.mean, std=self.std, process_index=self.process_index,
        process_count=self.process_count))
