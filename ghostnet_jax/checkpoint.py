"""Orbax checkpoints of model variables: converted weights and their restore.

A converted checkpoint is an orbax ``CheckpointManager`` directory with one
step (0) holding two items:

* ``variables``: ``{'params': ..., 'batch_stats': ...}``
* ``metadata``: JSON, at least ``{'model': name, 'num_classes': n}``

``restore_converted(path)`` reads it back.

A ``train.py`` workdir holds ``config.json`` (the config of the run) and an
orbax ``CheckpointManager`` directory ``checkpoints/`` whose steps hold
``state`` (the :class:`ghostnet_jax.train_lib.TrainState`: step, params,
batch_stats, opt_state, ema) and ``meta`` (JSON: model, num_classes, dataset,
class names, architecture signature, step); steps evaluated during training
also carry ``metrics`` (``{'top1': ...}``, used to keep the best ones).
:func:`restore_workdir` reads the variables and the config back for
evaluation or fine-tuning.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ghostnet_jax import integrity

VARIABLES = 'variables'
METADATA = 'metadata'

# A train.py workdir.
CONFIG_NAME = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'
META = 'meta'
BEST_METRIC = 'top1'


def check_output_dir(path: str | os.PathLike) -> None:
  """Refuses to write into a directory that already holds files."""
  path = os.fspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise FileExistsError(f'{path} exists and is not a directory.')
    if os.listdir(path):
      raise FileExistsError(
          f'{path} already exists and is not empty; choose a new --output '
          'directory (nothing there was changed).')


def save_converted(path: str | os.PathLike, variables: dict,
                   metadata: dict[str, Any]) -> None:
  """Writes ``variables`` and ``metadata`` as an orbax checkpoint at step 0."""
  check_output_dir(path)
  path = os.path.abspath(os.fspath(path))
  with ocp.CheckpointManager(path) as mngr:
    mngr.save(0, args=ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardSave(variables),
        METADATA: ocp.args.JsonSave(metadata),
    }))
    mngr.wait_until_finished()
  integrity.write_manifest(os.path.join(path, '0'))


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isdir(os.path.join(path, '0', VARIABLES))


def restore_converted(path: str | os.PathLike) -> tuple[dict, dict]:
  """Reads a converted checkpoint: ``(variables, metadata)``."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No checkpoint directory at {path}.')
  with ocp.CheckpointManager(path) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{path} holds no complete orbax checkpoint.')
    integrity.require_intact(path, step)
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardRestore(),
        METADATA: ocp.args.JsonRestore(),
    }))
  return dict(restored[VARIABLES]), dict(restored[METADATA])


# Orbax warnings that describe intended behaviour here: saves between
# evaluations carry no metrics (they are kept by the latest-N policy), and
# managers opened only to read are read-only.
_EXPECTED_ORBAX_WARNINGS = (
    'did not provide metrics',
    'read_only=True, setting save_interval_steps=0',
    'Given directory is read only',
)


class _DropExpectedOrbaxWarnings:
  """A logging filter for :data:`_EXPECTED_ORBAX_WARNINGS`."""

  def filter(self, record) -> bool:
    msg = record.getMessage()
    return not any(m in msg for m in _EXPECTED_ORBAX_WARNINGS)


def quiet_orbax_logs() -> None:
  """Drops orbax's warnings about behaviour this package asks for."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _DropExpectedOrbaxWarnings)
             for f in logger.filters):
    logger.addFilter(_DropExpectedOrbaxWarnings())


def train_checkpoint_manager(directory: str | os.PathLike, *, keep: int,
                             keep_best: int, async_save: bool = True
                             ) -> ocp.CheckpointManager:
  """The trainer's orbax ``CheckpointManager`` for ``workdir/checkpoints``.

  Keeps the latest ``keep`` steps plus the best ``keep_best`` steps by the
  ``top1`` metric saved with them (steps saved without metrics, e.g. on
  preemption, are kept only while among the latest). Saves are asynchronous
  when ``async_save``; call ``wait_until_finished()`` before reading them.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_best > 0:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda m: m[BEST_METRIC], best_mode='max',
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
          policies),
      enable_async_checkpointing=async_save, create=True,
      # A save killed before its commit leaves a ``<step>.orbax-checkpoint-tmp``
      # directory; it is never restored (not a step) and is removed here.
      cleanup_tmp_directories=True,
      async_options=integrity.async_options(directory, async_save))
  return integrity.SealingCheckpointManager(
      os.path.abspath(os.fspath(directory)), options=options,
      item_handlers=item_handlers())


def item_handlers() -> dict:
  """The orbax handlers of a train.py checkpoint's items."""
  return {STATE: ocp.StandardCheckpointHandler(),
          META: ocp.JsonCheckpointHandler()}


def is_workdir(path: str | os.PathLike) -> bool:
  """Whether ``path`` looks like a ``train.py`` workdir (``config.json`` and
  ``checkpoints/``)."""
  path = os.fspath(path)
  return (os.path.isdir(path)
          and os.path.exists(os.path.join(path, CONFIG_NAME))
          and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


def _single_device_target(tree_metadata: Any, device: Any) -> Any:
  """Abstract arrays on one device, shaped as the saved ones."""
  sharding = jax.sharding.SingleDeviceSharding(device)

  def leaf(m):
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)

  return jax.tree_util.tree_map(
      leaf, tree_metadata,
      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))


def restore_workdir(workdir: str | os.PathLike, which: str = 'best',
                    device: Any = None) -> dict:
  """Reads a ``train.py`` workdir back for evaluation or fine-tuning.

  Args:
    workdir: the ``--workdir`` of a training run.
    which: ``'best'`` (highest eval top-1 among kept steps; the latest step
      if none was evaluated), ``'latest'``, or a step number.
    device: where to put the arrays (default: ``jax.devices()[0]``); works
      whatever mesh the run was trained on.

  Returns:
    A dict with

    * ``variables``: ``{'params', 'batch_stats'}`` of the trained model;
    * ``ema_variables``: the same for the parameter EMA, or None if the run
      had no EMA (training evaluated the EMA when it had one);
    * ``config``: the run's ``ml_collections.ConfigDict`` (model, dataset,
      data_dir, eval_split, image_size, eval_crop_fraction, interpolation,
      mean, std); build the model with
      ``ghostnet_jax.loading.model_from_config(config, meta['num_classes'])``;
    * ``meta``: model, num_classes, dataset (as configured), dataset_name
      (the tfds name to pass to the input pipeline), class_names, step;
    * ``step`` and ``metrics`` (``{'top1': ...}`` or None).

  Raises:
    FileNotFoundError: no workdir or no complete checkpoint in it.
    ValueError: bad ``which``.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  quiet_orbax_logs()
  workdir = os.path.abspath(os.fspath(workdir))
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  config_path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isdir(ckpt_dir) or not os.path.exists(config_path):
    raise FileNotFoundError(
        f'{workdir} is not a train.py workdir (it needs {CONFIG_NAME} and '
        f'{CHECKPOINT_DIR}/).')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  device = jax.devices()[0] if device is None else device
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, best_fn=lambda m: m[BEST_METRIC],
      best_mode='max')
  with ocp.CheckpointManager(ckpt_dir, options=options,
                             item_handlers=item_handlers()) as mngr:
    if which == 'best':
      step = mngr.best_step()
    elif which == 'latest':
      step = mngr.latest_step()
    elif isinstance(which, int):
      step = which
      if step not in mngr.all_steps():
        raise ValueError(f'Step {step} is not in {ckpt_dir}; steps: '
                         f'{sorted(mngr.all_steps())}.')
    else:
      raise ValueError(f"which must be 'best', 'latest' or a step; got "
                       f'{which!r}.')
    if step is None:
      raise FileNotFoundError(f'{ckpt_dir} holds no complete checkpoint.')
    integrity.require_intact(ckpt_dir, step)
    tree = mngr.item_metadata(step)[STATE].tree
    target = _single_device_target(tree, device)
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        META: ocp.args.JsonRestore()}))
    metrics = mngr.metrics(step)
  state, meta = restored[STATE], dict(restored[META])
  ema = state.get('ema')
  return {
      'variables': {'params': state['params'],
                    'batch_stats': state['batch_stats']},
      'ema_variables': None if ema is None else {
          'params': ema['params'], 'batch_stats': ema['batch_stats']},
      'config': config,
      'meta': meta,
      'step': step,
      'metrics': metrics,
  }
