"""Sharded training and evaluation: ``train_and_evaluate(config, workdir)``.

One ``jax.jit`` program trains on all devices of all processes.
:func:`train_and_evaluate` is a short orchestrator; each of its steps is a
named function or object below, in the order the run takes them (and the
README describes them):

  1. hosts and mesh      :func:`setup_hosts`
  2. input               :class:`DataSource` (or a data source passed in)
  3. model and optimizer :func:`build_model`, :func:`build_optimizer`
  4. state               :func:`check_workdir`, :func:`create_or_restore_state`
  5. compiled steps      :func:`compile_train_step` (the eval step is
                         :mod:`ghostnet_jax.evaluation`'s, shared with eval.py)
  6. the loop            :func:`train_loop`, with :class:`NonFiniteMonitor`
                         and :class:`Checkpointer`
  7. the report          :func:`final_report`

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

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from ghostnet_jax import augment
from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import data_faults
from ghostnet_jax import evaluation
from ghostnet_jax import ghostnetv3
from ghostnet_jax import distill
from ghostnet_jax import input_pipeline
from ghostnet_jax import integrity
from ghostnet_jax import interrupts
from ghostnet_jax import loading
from ghostnet_jax import ops
from ghostnet_jax import optim
from ghostnet_jax import peer_watchdog
from ghostnet_jax import registry
from ghostnet_jax import remat
from ghostnet_jax import sharding as shd
from ghostnet_jax import train_logging
from ghostnet_jax import utils
from ghostnet_jax import workdir_lock
# One implementation each, kept importable from here.
from ghostnet_jax.evaluation import cross_entropy, make_eval_step, topk_correct  # noqa: F401
from ghostnet_jax.loading import DIGITS_ALIASES, model_from_config  # noqa: F401

CONFIG_NAME = ckpt_lib.CONFIG_NAME
FINAL_METRICS_NAME = 'final_metrics.json'
# The names of utils.DTYPES the trainer computes in (float16 overflows in
# training without loss scaling).
TRAIN_DTYPES = ('float32', 'bfloat16')


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
    'step_decay_epochs', 'step_decay_rate', 'lr_noise', 'lr_noise_pct',
    'lr_noise_std', 'weight_decay',
    'decay_bn_and_bias', 'label_smoothing', 'grad_clip_norm', 'ema_decay',
    'mesh_shape', 'fsdp_min_size', 'distributed', 'coordinator_address',
    'num_processes', 'process_id', 'keep_checkpoints',
    'keep_best_checkpoints', 'async_checkpointing', 'eval_every_steps',
    'log_every_steps', 'progress_bar', 'skip_nonfinite_steps',
    'force_unlock')  # the workdir lock's override
FIELDS += (  # recipe fields (augment, distill, remat)
    'rand_augment', 'color_jitter', 'random_erasing', 'mixup', 'cutmix',
    'mixup_prob', 'mixup_switch_prob', 'teacher', 'teacher_model',
    'distill_weight', 'distill_temperature', 'distill_type', 'remat',
    'folder_bad_files')

# Numeric fields: > 0, >= 0, integral, and in [0, 1).
_POSITIVE = ('batch_size', 'eval_batch_size', 'learning_rate',
             'checkpoint_every_steps', 'log_every_steps', 'image_size')
_NON_NEGATIVE = ('weight_decay', 'label_smoothing', 'grad_clip_norm',
                 'ema_decay', 'warmup_steps', 'warmup_epochs', 'warmup_init_lr',
                 'end_lr', 'momentum', 'dropout', 'keep_checkpoints',
                 'keep_best_checkpoints')
_INTEGRAL = ('batch_size', 'eval_batch_size', 'checkpoint_every_steps',
             'log_every_steps', 'image_size', 'warmup_steps',
             'eval_every_steps', 'keep_checkpoints', 'keep_best_checkpoints')
_UNIT_INTERVAL = ('ema_decay', 'label_smoothing', 'dropout')
# Fields that take one of a few names.
_CHOICES = (('optimizer', optim.OPTIMIZERS), ('schedule', optim.SCHEDULES),
            ('dtype', TRAIN_DTYPES), ('conv_impl', ops.IMPLS))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks everything that needs no device and no data.

  Raises:
    ConfigError: naming the first bad field.
  """
  _check_fields_present(config)
  try:
    registry.get_entry(config.model)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from None
  _check_numbers(config)
  for name, choices in _CHOICES:
    if config[name] not in choices:
      raise ConfigError(f'config.{name} must be one of {tuple(choices)}; '
                        f'got {config[name]!r}.')
  _check_the_rest(config)


def _check_fields_present(config) -> None:
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


def _check_numbers(config) -> None:
  for name in _POSITIVE + _NON_NEGATIVE:
    v = config.get(name)
    if v is None or not isinstance(v, (int, float)) or isinstance(v, bool):
      raise ConfigError(f'config.{name} must be a number; got {v!r}.')
    if name in _POSITIVE and v <= 0:
      raise ConfigError(f'config.{name} must be > 0; got {v!r}.')
    if v < 0:
      raise ConfigError(f'config.{name} must be >= 0; got {v!r}.')
  for name in _INTEGRAL:
    if int(config[name]) != config[name]:
      raise ConfigError(f'config.{name} must be an integer; got '
                        f'{config[name]!r}.')
  for name in _UNIT_INTERVAL:
    if not 0 <= config[name] < 1:
      raise ConfigError(f'config.{name} must be in [0, 1); got '
                        f'{config[name]}.')


def _check_the_rest(config) -> None:
  """Fields with rules of their own."""
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
  if config.schedule == 'step' and not (config.step_decay_epochs > 0 and
                                        config.step_decay_rate > 0):
    raise ConfigError('config.step_decay_epochs and config.step_decay_rate '
                      'must be > 0 for the step schedule.')
  _check_lr_noise(config)
  g = config.bn_batch_groups
  if not isinstance(g, int) or (g < 1 and g != -1):
    raise ConfigError(f'config.bn_batch_groups must be -1 (one group per '
                      f'device) or >= 1; got {g!r}.')
  try:
    shd.check_mesh_shape(config.mesh_shape)  # the device count comes later
  except ValueError as e:
    raise ConfigError(f'config.mesh_shape: {e}') from None
  if config.init_from and not os.path.exists(config.init_from):
    raise ConfigError(f'config.init_from: no checkpoint at '
                      f'{config.init_from!r} (a converted directory, a '
                      'PyTorch file or a train.py workdir).')
  try:  # augmentation, distillation and remat fields
    augment.check_config(config)
    distill.check_config(config)
    remat.check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_lr_noise(config) -> None:
  noise = tuple(config.lr_noise or ())
  if noise and not (
      len(noise) in (1, 2)
      and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in noise)
      and list(noise) == sorted(noise)):
    raise ConfigError(f'config.lr_noise must be () (off), (start,) or '
                      f'(start, end): fractions of the run in [0, 1], '
                      f'start <= end; got {config.lr_noise!r}.')
  if noise and not (config.lr_noise_pct > 0 and config.lr_noise_std > 0):
    raise ConfigError('config.lr_noise_pct and config.lr_noise_std must be '
                      f'> 0; got {config.lr_noise_pct!r}, '
                      f'{config.lr_noise_std!r}.')


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


def architecture_signature(model: nn.Module, image_size: int) -> dict:
  """Model facts a checkpoint must match to be resumed: shapes of params.

  Traced with ``jax.eval_shape`` (no compute).
  """
  shapes = utils.abstract_variables(model, image_size)
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
# The train step (a pure function; the eval step is evaluation.make_eval_step)
# ------------------------------------------------------------------------------


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int,
                    label_smoothing: float, ema_decay: float,
                    seed: int, gather: Callable = lambda t: t,
                    skip_nonfinite: bool = False,
                    distill_loss: Callable | None = None) -> Callable:
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
      if 'target' in batch:  # mixup/CutMix soft targets
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                           batch['target']).mean()
      else:
        loss = cross_entropy(logits, batch['label'], num_classes,
                             label_smoothing).mean()
      if distill_loss is not None:  # knowledge distillation
        loss = loss + distill_loss(logits, batch)
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


# ------------------------------------------------------------------------------
# The loop's two objects: the non-finite monitor and the checkpointer
# ------------------------------------------------------------------------------


class NonFiniteMonitor:
  """Non-finite steps, counted on the device, looked at by the host.

  The compiled step (:func:`compile_train_step`) carries ``health``
  (``{'first_step', 'count'}``, int32 scalars) from step to step; the host
  reads it only where it fetches metrics anyway and before every save
  (:meth:`check`), at most once per step.

  Args:
    health: the initial device-side counters (:meth:`initial_health`).
    skip: ``config.skip_nonfinite_steps``: the step left the state as it was;
      :meth:`check` reports the new ones through ``log`` instead of raising.
    describe: ``first_bad_step -> message`` for the error.
    log: prints a line (process 0).
  """

  def __init__(self, health: dict, *, skip: bool,
               describe: Callable[[int], str],
               log: Callable[[str], None] = print):
    self.health = health
    self.skip = skip
    self.describe = describe
    self.log = log
    self.skipped = 0  # non-finite steps skipped so far (seen by the host)
    self._checked_step = -1

  @staticmethod
  def initial_health(sharding) -> dict:
    return jax.device_put({'first_step': np.zeros((), np.int32),
                           'count': np.zeros((), np.int32)}, sharding)

  def check(self, step: int) -> None:
    """Raises :class:`NonFiniteLossError` if a step up to ``step`` was not
    finite (unless skipping, then logs how many were skipped)."""
    if self._checked_step == step:
      return
    self._checked_step = step
    h = {k: int(v) for k, v in jax.device_get(self.health).items()}
    if not h['count'] or h['count'] == self.skipped:
      return
    if self.skip:
      self.log(f'Skipped {h["count"] - self.skipped} step(s) with a '
               f'non-finite loss or gradient up to step {step} '
               f'({h["count"]} in this run, the first at step '
               f'{h["first_step"]}).')
      self.skipped = h['count']
      return
    raise NonFiniteLossError(self.describe(h['first_step']), h['first_step'])


class Checkpointer:
  """The train state's saves and restores in ``workdir/checkpoints``.

  Each save carries the run's metadata (model, classes, signature, dataset)
  and the step; ``before_save(step)`` runs first (the trainer passes
  :meth:`NonFiniteMonitor.check`: a non-finite state is never saved). An
  ``OSError`` of a save, at once or later from an async write, becomes a
  :class:`CheckpointWriteError` naming the step and the intact checkpoints.

  Args:
    mngr: the orbax manager (:func:`ghostnet_jax.checkpoint.train_checkpoint_manager`).
    meta: the run's metadata.
    before_save: called with the step before each save.
  """

  def __init__(self, mngr: ocp.CheckpointManager, meta: dict,
               before_save: Callable[[int], None] = lambda step: None):
    self.mngr = mngr
    self.meta = meta
    self.before_save = before_save
    self.saves: list[int] = []  # steps whose save was started

  @property
  def directory(self) -> str:
    return str(self.mngr.directory)

  def save(self, step: int, state: Any, metrics: dict | None = None,
           force: bool = False) -> None:
    self.before_save(step)
    self.saves.append(step)
    with _checkpoint_errors(self.mngr, self.saves):
      self.mngr.save(step, args=ocp.args.Composite(**{
          ckpt_lib.STATE: ocp.args.StandardSave(state),
          ckpt_lib.META: ocp.args.JsonSave({**self.meta, 'step': step}),
      }), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state of ``step``, laid out as ``abstract_state`` (sharded)."""
    return self.mngr.restore(step, args=ocp.args.Composite(**{
        ckpt_lib.STATE: ocp.args.StandardRestore(abstract_state)
    }))[ckpt_lib.STATE]

  def wait(self) -> None:
    """Waits for async saves; raises their error as above."""
    with _checkpoint_errors(self.mngr, self.saves):
      self.mngr.wait_until_finished()

  def committed_steps(self) -> list[int]:
    return sorted(_committed_steps(self.directory))

  def reached_preemption(self, step: int) -> bool:
    return self.mngr.reached_preemption(step)

  def best_step(self) -> int | None:
    return self.mngr.best_step()

  def close(self) -> None:
    self.mngr.close()




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
        f'{exc.strerror or exc}. {integrity.write_error_cause(exc)} '
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


def _nonfinite_message(step: int, config, schedule,
                       checkpointer: Checkpointer) -> str:
  checkpointer.mngr.wait_until_finished()  # saves started before are good
  kept = checkpointer.committed_steps()
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
          f'state after it was not saved: the checkpoints in {checkpointer.directory} '
          f'(steps {kept}) are from before and untouched, and a rerun resumes '
          f'from step {kept[-1] if kept else 0}. To fix: '
          + '; '.join(hints) + '.')


def _pct(v) -> str:
  return 'n/a' if v is None else f'{100 * v:.2f}%'


# ------------------------------------------------------------------------------
# 1. Hosts and mesh
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hosts:
  """Where the run computes: processes, devices and the mesh."""
  process_index: int
  process_count: int
  num_devices: int
  mesh_shape: tuple[int, int]
  mesh: jax.sharding.Mesh

  @property
  def is_main(self) -> bool:
    return self.process_index == 0


def setup_hosts(config: ml_collections.ConfigDict) -> Hosts:
  """Joins the other processes (``config.distributed``), checks batch sizes
  against the devices and builds the ``('data', 'fsdp')`` mesh."""
  if config.distributed and not jax.distributed.is_initialized():
    kwargs = {}
    if config.coordinator_address:
      kwargs['coordinator_address'] = config.coordinator_address
    if config.num_processes > 0:
      kwargs['num_processes'] = config.num_processes
    if config.process_id >= 0:
      kwargs['process_id'] = config.process_id
    jax.distributed.initialize(**kwargs)
  process_count = jax.process_count()
  num_devices = jax.device_count()
  mesh_shape = validate_devices(config, num_devices, process_count)
  return Hosts(process_index=jax.process_index(), process_count=process_count,
               num_devices=num_devices, mesh_shape=tuple(mesh_shape),
               mesh=shd.make_mesh(mesh_shape))


# ------------------------------------------------------------------------------
# 2. Input
# ------------------------------------------------------------------------------


class Data(Protocol):
  """What the trainer needs of its data (:class:`DataSource`, or a fake)."""
  dataset: str  # the name the pipeline reads (recorded in checkpoints)
  num_classes: int
  train_size: int
  class_names: Any

  def train_batches(self, start_step: int) -> Iterator[dict]: ...

  def eval_batches(self) -> Iterator[dict]: ...


@dataclasses.dataclass(frozen=True)
class RunLength:
  """Steps of the run, derived from the config and the train split size."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_every: int  # 0: never

  @classmethod
  def of(cls, config, train_size: int) -> 'RunLength':
    per_epoch = max(train_size // config.batch_size, 1)
    total = int(config.num_train_steps if config.num_train_steps > 0
                else round(config.num_epochs * per_epoch))
    warmup = int(config.warmup_steps or
                 round(config.warmup_epochs * per_epoch))
    every = (0 if config.eval_every_steps < 0 else
             config.eval_every_steps or total)
    return cls(per_epoch, total, warmup, every)


# ------------------------------------------------------------------------------
# 3. Model and optimizer
# ------------------------------------------------------------------------------


def build_model(config, num_classes: int, num_devices: int) -> nn.Module:
  """The config's model, one BatchNorm group per ``bn_batch_groups``."""
  try:
    return model_from_config(config, num_classes,
                             bn_batch_groups=bn_groups(config, num_devices))
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.model / config.model_overrides: {e}') from None


def build_optimizer(config, length: RunLength
                    ) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """The learning-rate schedule and the optax optimizer of the config."""
  schedule = optim.make_schedule(
      schedule=config.schedule, learning_rate=config.learning_rate,
      total_steps=length.total_steps, warmup_steps=length.warmup_steps,
      warmup_init_lr=config.warmup_init_lr, end_lr=config.end_lr,
      decay_steps=config.step_decay_epochs * length.steps_per_epoch,
      decay_rate=config.step_decay_rate)
  schedule = optim.with_lr_noise(
      schedule, steps_per_epoch=length.steps_per_epoch,
      total_epochs=length.total_steps / length.steps_per_epoch,
      noise_range=tuple(config.lr_noise), pct=config.lr_noise_pct,
      std=config.lr_noise_std, seed=config.seed)
  tx = optim.make_optimizer(
      optimizer=config.optimizer, schedule=schedule,
      momentum=config.momentum, nesterov=config.nesterov,
      weight_decay=config.weight_decay, decay_all=config.decay_bn_and_bias,
      rmsprop_decay=config.rmsprop_decay, rmsprop_eps=config.rmsprop_eps,
      grad_clip_norm=config.grad_clip_norm)
  return schedule, tx


def run_metadata(config, model: nn.Module, data: Data) -> dict:
  """What every checkpoint of the run records (and a resume must match)."""
  return {
      'model': config.model,
      'num_classes': data.num_classes,
      'signature': architecture_signature(model, config.image_size),
      'dataset': config.dataset,
      'dataset_name': data.dataset,  # the tfds name the pipeline reads
      'class_names': list(data.class_names or []),
  }


# ------------------------------------------------------------------------------
# 4. State: create or restore
# ------------------------------------------------------------------------------


def _finished_run(workdir: str, resume_step: int | None, total_steps: int,
                  is_main: bool) -> dict | None:
  """The final metrics of a run already complete in ``workdir``, or None."""
  final_path = os.path.join(workdir, FINAL_METRICS_NAME)
  if (resume_step is None or resume_step < total_steps or
      not os.path.exists(final_path)):
    return None
  with open(final_path) as f:
    final = json.load(f)
  if is_main:
    print(f'{workdir} already holds a finished run ({resume_step} of '
          f'{total_steps} steps): top-1 {_pct(final.get("top1"))}, '
          f'top-5 {_pct(final.get("top5"))}; see {final_path}. Nothing to '
          'do; use a new --workdir to train again.', flush=True)
  return final


class StateFactory:
  """Builds the :class:`TrainState` (fresh, from given variables, or its
  abstract shape) and its shardings over the mesh."""

  def __init__(self, config, model: nn.Module, tx, mesh):
    self.config, self.model, self.tx = config, model, tx
    self.abstract = jax.eval_shape(self.init, jax.random.key(0))
    self.sharding = shd.state_shardings(mesh, self.abstract,
                                        config.fsdp_min_size)

  def init(self, rng) -> TrainState:
    variables = utils.init_fn(self.model, self.config.image_size)(rng)
    return self.from_variables(variables['params'], variables['batch_stats'])

  def from_variables(self, params, batch_stats) -> TrainState:
    ema = None
    if self.config.ema_decay > 0:
      ema = {'params': params, 'batch_stats': batch_stats}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats,
                      opt_state=self.tx.init(params), ema=ema)

  def abstract_sharded(self) -> TrainState:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.sharding)


def create_or_restore_state(factory: StateFactory, checkpointer: Checkpointer,
                            resume_step: int | None,
                            init_variables: dict | None, seed: int):
  """The state to start from, born sharded: restored from ``resume_step``,
  built on ``init_variables`` (``config.init_from``), or initialised."""
  if resume_step is not None:
    return checkpointer.restore(resume_step, factory.abstract_sharded())
  s = factory.sharding
  if init_variables is None:  # the same on every host; no init to compile
    init_variables = utils.host_variables(
        utils.init_fn(factory.model, factory.config.image_size),
        jax.random.key(seed))
  if init_variables is not None:
    return jax.jit(factory.from_variables, out_shardings=s)(
        *jax.device_put((init_variables['params'],
                         init_variables['batch_stats']),
                        (s.params, s.batch_stats)))
  return jax.jit(factory.init, out_shardings=s)(jax.random.key(seed))


def load_init_from(config, model: nn.Module) -> dict:
  """``config.init_from``'s weights (any checkpoint :mod:`ghostnet_jax.loading`
  reads) fitted to ``model``: the classifier is re-initialised when its
  shape differs.

  Raises:
    ConfigError: another model, or shapes that do not match.
  """
  try:
    loaded = loading.load_checkpoint(
        config.init_from, model_kwargs={
            k: v for k, v in loading.model_kwargs(config).items()
            if k in (config.model_overrides or {})})
  except (ValueError, OSError) as e:
    raise ConfigError(f'config.init_from: {e}') from None
  if loaded.model != config.model:
    raise ConfigError(
        f'config.init_from holds {loaded.model!r} weights but '
        f'config.model is {config.model!r}.')
  fresh = utils.abstract_variables(model, config.image_size)
  out = {col: _fit(col, loaded.variables[col], fresh[col])
         for col in ('params', 'batch_stats')}
  if any(v is None for v in out['params'].values()):
    init = utils.init_variables(model, config.seed, config.image_size)
    new = flax.traverse_util.flatten_dict(dict(init['params']), sep='/')
    out['params'] = {k: (np.asarray(new[k]) if v is None else v)
                     for k, v in out['params'].items()}
  return {col: flax.traverse_util.unflatten_dict(v, sep='/')
          for col, v in out.items()}


def _fit(col: str, have: dict, want: dict) -> dict:
  """Flat ``{path: array}`` of ``have`` in ``want``'s shapes; ``None`` for a
  classifier entry to re-initialise."""
  want = flax.traverse_util.flatten_dict(dict(want), sep='/')
  have = flax.traverse_util.flatten_dict(dict(have), sep='/')
  merged = {}
  for k, spec in want.items():
    v = have.get(k)
    if v is not None and tuple(v.shape) == tuple(spec.shape):
      merged[k] = np.asarray(v, spec.dtype)
    elif k.startswith('classifier/'):
      merged[k] = None
    else:
      raise ConfigError(
          f'config.init_from: {col}/{k} is '
          f'{None if v is None else tuple(v.shape)} in the checkpoint, '
          f'{tuple(spec.shape)} in the model.')
  return merged


# ------------------------------------------------------------------------------
# 5. Compiled steps
# ------------------------------------------------------------------------------


def compile_train_step(model, tx, schedule, config, num_classes: int,
                       factory: StateFactory, mesh,
                       teacher: distill.Teacher | None = None) -> Callable:
  """``(state, health, batch) -> (state, health, metrics)`` under
  ``jax.jit``: sharded as the state, state and health donated. With a
  ``teacher`` (:mod:`ghostnet_jax.distill`) its logits are computed inside the
  same program and the distillation term is added to the loss; the model's
  residual blocks are rematerialised as ``config.remat`` says."""
  replicated = shd.replicated(mesh)
  gather = functools.partial(jax.lax.with_sharding_constraint,
                             shardings=replicated)
  step = make_train_step(
      remat.wrap(model, config.remat), tx, schedule, num_classes=num_classes,
      label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
      seed=config.seed, gather=gather,
      skip_nonfinite=config.skip_nonfinite_steps,
      distill_loss=teacher.loss if teacher is not None else None)
  return distill.jit_train_step(
      _count_nonfinite(step), teacher, gather=gather,
      fsdp_min_size=config.fsdp_min_size,
      in_shardings=(factory.sharding, replicated, shd.batch_sharding(mesh)),
      out_shardings=(factory.sharding, replicated, replicated),
      donate_argnums=(0, 1))


def eval_variables(state: TrainState) -> dict:
  """What is evaluated: the EMA when the run keeps one, else the weights."""
  if state.ema is not None:
    return state.ema
  return {'params': state.params, 'batch_stats': state.batch_stats}


def evaluated_form(model: nn.Module, variables) -> tuple[nn.Module, Any]:
  """The model and variables evaluation runs: a GhostNetV3 trained in its
  re-parameterisable form is evaluated in its deploy form (branches folded
  on the host in float64, as it will be exported); others as they are."""
  if isinstance(model, ghostnetv3.GhostNetV3) and not model.deploy:
    host = multihost_utils.process_allgather(variables, tiled=True)
    return ghostnetv3.deploy_form(model, host)
  return model, variables


def evaluate_state(model, state: TrainState, data: Data, num_classes: int,
                   mesh) -> dict:
  """One pass over the eval split with :mod:`ghostnet_jax.evaluation` (the
  evaluator ``eval.py`` uses), in :func:`evaluated_form`: ``eval_loss``,
  ``eval_top1``, ``eval_top5`` (fractions) and ``eval_count``."""
  model, variables = evaluated_form(model, eval_variables(state))
  sums = evaluation.evaluate_batches(model, variables,
                                     data.eval_batches(),
                                     num_classes=num_classes, mesh=mesh)
  n = max(sums['count'], 1)
  return {'eval_loss': sums['loss'] / n, 'eval_top1': sums['top1'] / n,
          'eval_top5': sums['top5'] / n, 'eval_count': float(sums['count'])}


# ------------------------------------------------------------------------------
# 6. The loop
# ------------------------------------------------------------------------------


class _Window:
  """Wall time and steps since the last reset (img/s without compilation)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start, self.steps = time.perf_counter(), 0

  def rates(self, batch_size: int) -> dict:
    elapsed = time.perf_counter() - self.start
    return {'step_time': elapsed / max(self.steps, 1),
            'img_per_sec': self.steps * batch_size / elapsed}


@dataclasses.dataclass
class LoopResult:
  state: Any
  last_train: dict
  last_eval: dict
  preempted: bool


def train_loop(config, state, *, train_step: Callable, data: Data,
               evaluate: Callable[[Any], dict], checkpointer: Checkpointer,
               monitor: NonFiniteMonitor, logger, length: RunLength,
               batch_sharding, preemption: interrupts.Interrupts,
               run_start: float) -> LoopResult:
  """Steps ``state.step + 1 .. length.total_steps``: log, eval and save at
  their intervals; stops after a save on SIGTERM, SIGINT or a preemption
  notice."""
  start_step = int(jax.device_get(state.step))
  total = length.total_steps
  train_iter = data.train_batches(start_step)
  last_train, last_eval, preempted = {}, {}, False
  window = _Window()
  with jax.transfer_guard('disallow'):
    for step in range(start_step + 1, total + 1):
      batch = shd.put_batch(next(train_iter), batch_sharding)
      state, monitor.health, train_metrics = train_step(
          state, monitor.health, batch)
      window.steps += 1
      logger.update(1)
      if step % config.log_every_steps == 0 or step == total:
        monitor.check(step)
        last_train = {k: float(v) for k, v in
                      jax.device_get(train_metrics).items()}
        last_train.update(window.rates(config.batch_size),
                          epoch=step / length.steps_per_epoch)
        # With a progress bar the numbers go to its postfix; without one
        # (batch jobs, logs), one line per log step.
        logger.write(step, last_train, echo=not config.progress_bar)
        logger.update(0, loss=last_train['train_loss'],
                      lr=last_train['learning_rate'],
                      img_s=last_train['img_per_sec'])
        window.reset()
      if step == start_step + 1:  # keep compilation out of img/s
        jax.block_until_ready(train_metrics)
        logger.print(f'First step (with compilation) took '
                     f'{time.perf_counter() - run_start:.1f}s.')
        window.reset()
      eval_metrics = None
      if length.eval_every and (step % length.eval_every == 0 or
                                step == total):
        monitor.check(step)
        eval_metrics = evaluate(state)
        last_eval = {**eval_metrics, 'step': step}
        logger.write(step, {k: v for k, v in eval_metrics.items()
                            if k != 'eval_count'})
        window.reset()
      preempted = preemption.requested or checkpointer.reached_preemption(step)
      if (step % config.checkpoint_every_steps == 0 or step == total or
          preempted):
        checkpointer.save(step, state, force=preempted, metrics=(
            None if eval_metrics is None else
            {'top1': eval_metrics['eval_top1']}))
      if preempted:
        logger.print(preemption.message(step, checkpointer.directory))
        break
  if length.eval_every and not preempted and not last_eval:
    last_eval = {**evaluate(state), 'step': start_step}  # resumed past the end
  return LoopResult(state, last_train, last_eval, preempted)


# ------------------------------------------------------------------------------
# 7. The report
# ------------------------------------------------------------------------------


def final_report(config, workdir: str, result: LoopResult,
                 checkpointer: Checkpointer, monitor: NonFiniteMonitor,
                 logger, run_start: float, is_main: bool) -> dict:
  """The final metrics; process 0 writes ``final_metrics.json`` and the
  plot, and prints where everything is (not after a preemption)."""
  last_train, last_eval = result.last_train, result.last_eval
  final = {
      'step': int(jax.device_get(result.state.step)),
      'train_loss': last_train.get('train_loss'),
      'train_top1': last_train.get('train_top1'),
      'top1': last_eval.get('eval_top1'),
      'top5': last_eval.get('eval_top5'),
      'eval_loss': last_eval.get('eval_loss'),
      'eval_examples': last_eval.get('eval_count'),
      'eval_split': config.eval_split,
      'evaluated_ema': config.ema_decay > 0,
      'evaluated_form': ('deploy' if config.model.startswith('ghostnetv3')
                         else 'as trained'),
      'best_step': checkpointer.best_step(),
      'nonfinite_steps_skipped': monitor.skipped,
      'wall_time_s': time.perf_counter() - run_start,
      'checkpoint_dir': checkpointer.directory,
      'workdir': workdir,
  }
  if result.preempted:
    final['preempted'] = True
    return final
  if is_main:
    final_path = os.path.join(workdir, FINAL_METRICS_NAME)
    utils.write_json(final_path, final, sort_keys=True)
    plot = train_logging.finish_report(  # never turns a finished run into a failure
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
        f'  metrics:     {final_path}, '
        f'{logger.csv_path}, {os.path.join(workdir, "tensorboard")}\n'
        f'  plot:        {plot}')
  return final


class DataSource:
  """The trainer's data (:class:`Data`) from an input pipeline module
  (:mod:`ghostnet_jax.input_pipeline`, or a fake with the same three
  functions).

  ``dataset='digits'`` builds the embedded digits dataset into ``data_dir``
  the first time (``ghostnet_digits/32``, or ``/64`` for images above 32).
  """

  def __init__(self, config, process_index: int, process_count: int,
               pipeline: Any = None):
    self.pipeline = input_pipeline if pipeline is None else pipeline
    self.config = config
    self.process_index = process_index
    self.process_count = process_count
    # 'folder:/path' datasets take the bad-file policy.
    self.folder_kwargs = ({'bad_files': config.folder_bad_files}
                          if str(config.dataset).startswith('folder:') else {})
    try:
      dataset = config.dataset
      if dataset in DIGITS_ALIASES:
        from ghostnet_jax.datasets import digits  # pylint: disable=g-import-not-at-top
        dataset = digits.prepare_digits(
            config.data_dir,
            image_size=digits.config_size_for(config.image_size))
      info = self.pipeline.get_dataset_info(dataset, config.data_dir or None,
                                             **self.folder_kwargs)
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
    try:  # recipe augmentations (None: crop and flip only)
      self.augment = augment.from_config(config, self.num_classes, self.mean,
                                         config.interpolation)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  def train_batches(self, start_step: int) -> Iterator[dict]:
    """Local batches for steps ``start_step, start_step + 1, ...``."""
    c = self.config
    return data_faults.named_errors(iter(self.pipeline.train_iterator(
        dataset=self.dataset, data_dir=self.data_dir, split=c.train_split,
        global_batch_size=c.batch_size, image_size=c.image_size, seed=c.seed,
        start_step=start_step, mean=self.mean, std=self.std,
        interpolation=c.interpolation, scale=tuple(c.scale),
        ratio=tuple(c.ratio), hflip=c.hflip,
        process_index=self.process_index, process_count=self.process_count,
        worker_count=c.worker_count, **self.folder_kwargs,
        **({'augment': self.augment} if self.augment else {}))),
        dataset=self.dataset, data_dir=self.data_dir, split=c.train_split)

  def eval_batches(self) -> Iterator[dict]:
    """Local padded eval batches with a ``mask``, one pass over the split."""
    c = self.config
    return iter(self.pipeline.eval_iterator(
        dataset=self.dataset, data_dir=self.data_dir, split=c.eval_split,
        global_batch_size=c.eval_batch_size, image_size=c.image_size,
        crop_fraction=c.eval_crop_fraction, interpolation=c.interpolation,
        mean=self.mean, std=self.std, process_index=self.process_index,
        process_count=self.process_count, **self.folder_kwargs))


# The trainer's data source under its former name.
_Input = DataSource


# ------------------------------------------------------------------------------
# train_and_evaluate
# ------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data: Data | None = None,
                       model: nn.Module | None = None,
                       pipeline: Any = None,
                       teacher: tuple | None = None) -> dict:
  """Trains ``config.model`` on ``config.dataset``; resumes from ``workdir``.

  Args:
    config: a config from ``configs/`` (see ``configs/default.py``).
    workdir: run directory: checkpoints, metrics, ``config.json`` and, at the
      end, ``final_metrics.json``.
    data: the data source (:class:`Data`); default :class:`DataSource` over
      ``pipeline``.
    model: the Flax module to train; default :func:`build_model` of the
      config (``config.model`` is still what checkpoints record).
    pipeline: the input module :class:`DataSource` reads
      (``get_dataset_info``, ``train_iterator``, ``eval_iterator``); default
      :mod:`ghostnet_jax.input_pipeline`.
    teacher: a ``(flax module, variables)`` pair to distil from, instead of
      ``config.teacher`` (:mod:`ghostnet_jax.distill`).

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
  validate_config(config)

  # 1. Hosts and mesh.
  hosts = setup_hosts(config)
  # 2. Input.
  if data is None:
    data = DataSource(config, hosts.process_index, hosts.process_count,
                      pipeline or input_pipeline)
  length = RunLength.of(config, data.train_size)
  # 3. Model and optimizer.
  if model is None:
    model = build_model(config, data.num_classes, hosts.num_devices)
  schedule, tx = build_optimizer(config, length)
  teacher = load_teacher(config, data.num_classes, teacher)
  meta = run_metadata(config, model, data)

  # 4. State: the last checks before compute, then create or restore.
  # One writer per workdir: process 0 locks before anything is written; newer
  # checkpoints that fail their integrity check are set aside.
  workdir_lock.acquire_for_run(
      workdir, force=config.force_unlock, is_main=hosts.is_main,
      process_count=hosts.process_count, check=lambda: check_writable(workdir),
      prepare=lambda: integrity.select_resume_step(
          os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)))
  resume_step = check_workdir(workdir, meta)  # another model's: refused
  if hosts.process_count > 1:
    # check_workdir opens a checkpoint manager (with its own cross-process
    # barriers) only if checkpoints/ exists: no process may create it (below)
    # before every process has looked, or they take different barriers.
    multihost_utils.sync_global_devices('train_and_evaluate:workdir_checked')
  finished = _finished_run(workdir, resume_step, length.total_steps,
                           hosts.is_main)
  if finished is not None:
    return finished
  watchdog = peer_watchdog.start(workdir, hosts.process_index,
                                 hosts.process_count)  # a lost peer: exit
  init_variables = None
  if config.init_from and resume_step is None:
    init_variables = load_init_from(config, model)
  factory = StateFactory(config, model, tx, hosts.mesh)
  if hosts.is_main:  # the workdir was proven writable when it was locked
    utils.write_json(os.path.join(workdir, CONFIG_NAME),
                     json.loads(config.to_json_best_effort()), sort_keys=True)
  checkpointer = Checkpointer(
      ckpt_lib.train_checkpoint_manager(
          os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR),
          keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
          async_save=config.async_checkpointing), meta)
  state = create_or_restore_state(factory, checkpointer, resume_step,
                                  init_variables, config.seed)
  start_step = int(jax.device_get(state.step))

  # 5. Compiled steps.
  train_step = compile_train_step(model, tx, schedule, config,
                                  data.num_classes, factory, hosts.mesh,
                                  teacher)
  evaluate = functools.partial(evaluate_state, model, data=data,
                               num_classes=data.num_classes, mesh=hosts.mesh)

  # 6. The loop.
  logger = train_logging.MetricsLogger(
      workdir, total_steps=length.total_steps, start_step=start_step,
      enabled=hosts.is_main, progress=config.progress_bar)
  logger.print(_run_banner(config, data, length, hosts, workdir, start_step))
  if teacher is not None and config.eval_every_steps >= 0 and not start_step:
    logger.print(_teacher_report(config, teacher, data, hosts.mesh))
  monitor = NonFiniteMonitor(
      NonFiniteMonitor.initial_health(shd.replicated(hosts.mesh)),
      skip=config.skip_nonfinite_steps, log=logger.print,
      describe=lambda first: _nonfinite_message(first, config, schedule,
                                                checkpointer)
      + integrity.after_restore_hint(first, resume_step,
                                     checkpointer.directory))
  checkpointer.before_save = monitor.check  # never checkpoint a NaN state
  preemption = interrupts.Interrupts(enable=hosts.process_count == 1)
  run_start = time.perf_counter()
  try:
    result = train_loop(
        config, state, train_step=train_step, data=data, evaluate=evaluate,
        checkpointer=checkpointer, monitor=monitor, logger=logger,
        length=length, batch_sharding=shd.batch_sharding(hosts.mesh),
        preemption=preemption, run_start=run_start)
  finally:
    try:
      checkpointer.wait()
    finally:
      preemption.restore()
      logger.close()

  # 7. The report.
  final = final_report(config, workdir, result, checkpointer, monitor, logger,
                       run_start, hosts.is_main)
  checkpointer.close()
  if result.preempted:
    final['interrupted_by'] = preemption.signal_name
  if watchdog is not None:
    watchdog.done()
  return final


def load_teacher(config, num_classes: int,
                 teacher: tuple | None = None) -> distill.Teacher | None:
  """The distillation teacher of ``config.teacher`` (or the given
  ``(module, variables)`` pair); ``None`` without one."""
  try:
    return distill.load_teacher(config, num_classes, teacher=teacher,
                                dtype=utils.DTYPES[config.dtype])
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _teacher_report(config, teacher: distill.Teacher, data: Data,
                    mesh) -> str:
  """The teacher's top-1 on the eval split, logged once at the start."""
  sums = evaluation.evaluate_batches(teacher.module, teacher.variables,
                                     data.eval_batches(),
                                     num_classes=data.num_classes, mesh=mesh)
  top1 = sums['top1'] / max(sums['count'], 1)
  return f'Teacher {teacher.name}: {config.eval_split} top-1 {_pct(top1)}'


def _run_banner(config, data: Data, length: RunLength, hosts: Hosts,
                workdir: str, start_step: int) -> str:
  return (
      f'Training {config.model} ({data.num_classes} classes) on '
      f'{config.dataset} for {length.total_steps} steps of {config.batch_size} '
      f'images ({length.total_steps / length.steps_per_epoch:.1f} epochs) on '
      f'{hosts.num_devices} {jax.devices()[0].platform} device(s), '
      f'{hosts.process_count} process(es), mesh (data, fsdp) = '
      f'{hosts.mesh_shape}; workdir {workdir}'
      + (f'; resuming from step {start_step}' if start_step else ''))
