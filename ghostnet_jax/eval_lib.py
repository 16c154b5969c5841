"""Evaluation of GhostNet checkpoints on tfds datasets (the library behind
``eval.py``).

:func:`evaluate` loads a checkpoint (:mod:`ghostnet_jax.loading`: a PyTorch
file, a converted orbax directory or a ``train.py`` workdir, whose dataset,
split and preprocessing it then uses), chooses the preprocessing
(:func:`resolve_preprocessing`) and runs one pass over a tfds split with
:mod:`ghostnet_jax.evaluation`, the evaluator the trainer uses too: sharded
over every device of every process, the global batch rounded up to a
multiple of the device count and the last batch padded with masked rows, so
every example counts exactly once. Top-1 / top-5 are integer counts of hits
on the device (``lax.top_k``, ties towards the lower class index), reported
in percent.

The other parts of eval live in their own modules, and their names stay
importable from here: checkpoint loading in :mod:`ghostnet_jax.loading`,
image classification in :mod:`ghostnet_jax.classify`, the command line in
:mod:`ghostnet_jax.eval_cli`.

Python::

    from ghostnet_jax import eval_lib
    results = eval_lib.evaluate('state_dict_73.98.pth', model='ghostnet_100',
                                dataset='imagenet2012', data_dir='~/tfds')
    print(results['top1'], results['top5'], results['num_examples'])
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ghostnet_jax import evaluation, loading, registry, utils
from ghostnet_jax import sharding as shd
# The checkpoint loader lives in the checkpoint layer; its names stay
# importable from here.
from ghostnet_jax.checkpoint import is_workdir  # noqa: F401
from ghostnet_jax.loading import (LoadedCheckpoint, infer_torch_model,  # noqa: F401
                                  load_checkpoint)

DEFAULT_BATCH_SIZE = 256
# The preprocessing of a train.py workdir's own evaluation.
WORKDIR_PREPROCESS = 'workdir'
DTYPES = utils.DTYPES

# A problem with what eval was asked to do (a user mistake); the loader's
# error, so a bad checkpoint and a bad option are caught alike.
EvalError = loading.LoadError


# ---------------------------------------------------------------------------
# Preprocessing choice
# ---------------------------------------------------------------------------

def resolve_preprocessing(checkpoint: LoadedCheckpoint,
                          preprocess: str | None = None,
                          image_size: int | None = None,
                          crop_fraction: float | None = None
                          ) -> tuple[str, registry.EvalConfig]:
  """The preprocessing to evaluate with: ``(name, EvalConfig)``.

  ``preprocess=None``: a workdir's own evaluation preprocessing
  (``'workdir'``), else the model's default preset. A preset name gives the
  model's registry settings under that preset. ``image_size`` and
  ``crop_fraction`` override either.
  """
  if preprocess is None and checkpoint.eval_config is not None:
    name, config = WORKDIR_PREPROCESS, checkpoint.eval_config
  else:
    name = preprocess or registry.get_entry(checkpoint.model).default_preprocess
    config = registry.get_eval_config(checkpoint.model, name)
  if image_size is not None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
        or image_size <= 0:
      raise EvalError(f'image_size must be a positive int, got {image_size!r}.')
    config = dataclasses.replace(config, input_size=image_size)
  if crop_fraction is not None:
    if not 0.0 < crop_fraction <= 1.0:
      raise EvalError(f'crop_fraction must be in (0, 1], got {crop_fraction}.')
    config = dataclasses.replace(config, crop_fraction=float(crop_fraction))
  return name, config


def preprocessing_record(name: str, config: registry.EvalConfig) -> dict:
  """The JSON description of a preprocessing."""
  return {'name': name, 'input_size': int(config.input_size),
          'crop_fraction': float(config.crop_fraction),
          'interpolation': config.interpolation,
          'mean': [float(m) for m in config.mean],
          'std': [float(s) for s in config.std]}


# ---------------------------------------------------------------------------
# Sharded computation
# ---------------------------------------------------------------------------

def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """The trainer's ``('data', 'fsdp')`` mesh over ``devices`` (default: all),
  every device on ``'data'`` (:func:`ghostnet_jax.sharding.make_mesh`)."""
  return shd.make_mesh((-1, 1), devices)


def round_batch_size(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh's device count."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
      or batch_size <= 0:
    raise EvalError(f'batch_size must be a positive int, got {batch_size!r}.')
  n = mesh.devices.size
  multiple = n * jax.process_count() // math.gcd(n, jax.process_count())
  return -(-batch_size // multiple) * multiple


def _replicate(tree, mesh: Mesh):
  return jax.device_put(tree, shd.replicated(mesh))


def evaluate_model(model, variables: Mapping, *, dataset: str, split: str,
                   data_dir: str | None, eval_config: registry.EvalConfig,
                   num_classes: int, batch_size: int = DEFAULT_BATCH_SIZE,
                   mesh: Mesh | None = None, progress: bool = True,
                   return_logits: bool = False, worker_count: int = 0,
                   num_threads: int = 8, image_key: str | None = None,
                   label_key: str | None = None) -> dict:
  """One pass of ``model`` over a tfds split, sharded over ``mesh``.

  Args:
    model: a Flax module mapping NHWC images to ``(N, num_classes)`` logits.
    variables: its variables.
    dataset, split, data_dir: the tfds data.
    eval_config: preprocessing (size, crop fraction, interpolation, mean,
      std).
    num_classes: the model's outputs; must equal the dataset's classes.
    batch_size: global batch; rounded up to a multiple of the device count.
    mesh: default :func:`make_mesh` over all devices.
    progress: show a tqdm bar (process 0 only).
    return_logits: also return ``'logits'`` ``(N, classes)`` and
      ``'labels'`` ``(N,)`` numpy arrays of the real (unpadded) examples, in
      split order.
    worker_count: grain worker processes for decoding and preprocessing.
    num_threads: threads decoding and preprocessing (in each process), each
      preparing a whole local batch; as many batches are buffered.
    image_key, label_key: feature keys (defaults: ``'image'``, ``'label'``).

  Returns:
    ``{'top1': %, 'top5': %, 'num_examples', 'correct_top1',
    'correct_top5', 'images_per_second', 'eval_seconds',
    'compile_seconds', 'num_devices', 'global_batch_size'}``.
  """
  mesh = make_mesh() if mesh is None else mesh
  info = _dataset_info(dataset, data_dir, num_classes, image_key, label_key)
  global_batch = round_batch_size(batch_size, mesh)
  batches = _eval_batches(dataset, split, data_dir, info, eval_config,
                          global_batch, worker_count, num_threads)
  with _progress(len(batches), f'{dataset}:{split}', progress) as on_batch:
    sums = evaluation.evaluate_batches(
        model, _replicate(dict(variables), mesh), batches,
        num_classes=num_classes, mesh=mesh, return_logits=return_logits,
        on_batch=on_batch)
  count = sums['count']
  if count == 0:
    raise EvalError(f'Split {split!r} of {dataset!r} gave no examples.')
  seconds = sums['seconds']
  results = {
      'top1': 100.0 * sums['top1'] / count,
      'top5': 100.0 * sums['top5'] / count,
      'num_examples': count,
      'correct_top1': sums['top1'],
      'correct_top5': sums['top5'],
      'images_per_second': count / seconds if seconds > 0 else None,
      'eval_seconds': seconds,
      'compile_seconds': sums['compile_seconds'],
      'num_devices': int(mesh.devices.size),
      'global_batch_size': global_batch,
  }
  if return_logits:
    results['logits'] = sums['logits']
    results['labels'] = sums['labels']
  return results


def _dataset_info(dataset, data_dir, num_classes, image_key, label_key):
  """The dataset's info; its classes must be the model's outputs."""
  from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_dataset_info(dataset, data_dir,
                                         image_key=image_key,
                                         label_key=label_key)
  if info.num_classes != num_classes:
    raise EvalError(
        f'The model has {num_classes} outputs but dataset {dataset!r} has '
        f'{info.num_classes} classes; evaluate a checkpoint trained for '
        'this dataset.')
  return info


def _eval_batches(dataset, split, data_dir, info, eval_config, global_batch,
                  worker_count, num_threads):
  """This process's padded eval batches (``image``, ``label``, ``mask``)."""
  from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.eval_iterator(
      dataset=dataset, data_dir=data_dir, split=split,
      global_batch_size=global_batch, image_size=eval_config.input_size,
      crop_fraction=eval_config.crop_fraction,
      interpolation=eval_config.interpolation, mean=eval_config.mean,
      std=eval_config.std, worker_count=worker_count,
      num_threads=num_threads, prefetch_batches=max(2, num_threads),
      image_key=info.image_key, label_key=info.label_key)


class _progress:  # pylint: disable=invalid-name
  """A tqdm bar (process 0 only) as an ``on_batch(real_rows)`` callback."""

  def __init__(self, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm(total=total, unit='batch', desc=desc,
                    disable=not enabled or jax.process_index() != 0,
                    dynamic_ncols=True)
    self.seen, self.start = 0, time.perf_counter()

  def __enter__(self):
    return self.update

  def update(self, rows: int) -> None:
    self.seen += rows
    self.bar.update(1)
    elapsed = time.perf_counter() - self.start
    if elapsed > 0:
      self.bar.set_postfix_str(
          f'{self.seen * jax.process_count() / elapsed:.1f} img/s',
          refresh=False)

  def __exit__(self, *exc):
    self.bar.close()
    return False


def _dtype(name: str | None):
  try:
    return utils.dtype_of(name)
  except ValueError as e:
    raise EvalError(str(e)) from None


_as_loaded = loading.as_loaded


def evaluate(checkpoint: str | os.PathLike | LoadedCheckpoint, *,
             model: str | None = None, dataset: str | None = None,
             split: str | None = None, data_dir: str | None = None,
             preprocess: str | None = None, image_size: int | None = None,
             crop_fraction: float | None = None,
             batch_size: int | None = None, ema: bool | None = None,
             which: str | int = 'best', dtype: str | None = None,
             allow_pickle: bool = False, progress: bool = True,
             return_logits: bool = False, worker_count: int = 0,
             num_threads: int = 8, image_key: str | None = None,
             label_key: str | None = None, mesh: Mesh | None = None) -> dict:
  """Evaluates a checkpoint on a tfds split; the ``results.json`` dict.

  Args:
    checkpoint: a path (see :func:`load_checkpoint`) or a loaded checkpoint.
    model, ema, which, allow_pickle: see :func:`load_checkpoint`.
    dataset: tfds name; default: a workdir's dataset, else
      ``'imagenet2012'``.
    split: default: a workdir's evaluation split, else ``'validation'`` or,
      for datasets without one, ``'test'``.
    data_dir: tfds data directory; default: a workdir's, else tfds's.
    preprocess, image_size, crop_fraction: see :func:`resolve_preprocessing`.
    batch_size: global batch (rounded up to a multiple of the devices);
      default: a workdir's eval batch size, else 256.
    dtype: computation dtype (``'float32'``, ``'bfloat16'``); default: a
      workdir's, else float32.
    progress: tqdm progress bar.
    return_logits: also return the logits and labels (numpy; not JSON).
    worker_count: grain worker processes.
    num_threads: decoding threads per process.
    image_key, label_key: the dataset's image and ClassLabel features
      (default ``'image'`` / ``'label'``, else its supervised keys).
    mesh: default: every device.

  Returns:
    ``top1`` and ``top5`` in percent, ``num_examples``, the hit counts,
    ``images_per_second``, and ``model``, ``checkpoint``, ``checkpoint_kind``,
    ``dataset``, ``split``, ``preprocessing``, ``ema``, ``num_classes``.
  """
  loaded = _as_loaded(checkpoint, model=model, ema=ema, which=which,
                      allow_pickle=allow_pickle)
  name, config = resolve_preprocessing(loaded, preprocess, image_size,
                                       crop_fraction)
  dataset = dataset or loaded.dataset or 'imagenet2012'
  if data_dir is None and dataset == loaded.dataset:
    data_dir = loaded.data_dir
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  if split is None:
    if loaded.split and dataset == loaded.dataset:
      split = loaded.split
    else:
      from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      split = input_pipeline.get_dataset_info(dataset, data_dir).eval_split
  net = loaded.create_model(dtype=_dtype(dtype))
  metrics = evaluate_model(
      net, loaded.variables, dataset=dataset, split=split, data_dir=data_dir,
      eval_config=config, num_classes=loaded.num_classes,
      batch_size=batch_size or loaded.batch_size or DEFAULT_BATCH_SIZE,
      mesh=mesh, progress=progress,
      return_logits=return_logits, worker_count=worker_count,
      num_threads=num_threads, image_key=image_key, label_key=label_key)
  results = {
      'top1': metrics.pop('top1'),
      'top5': metrics.pop('top5'),
      'num_examples': metrics.pop('num_examples'),
      'metrics_unit': 'percent',
      'model': loaded.model,
      'num_classes': loaded.num_classes,
      'checkpoint': os.path.abspath(loaded.path),
      'checkpoint_kind': loaded.kind,
      'dataset': dataset,
      'split': split,
      'data_dir': data_dir,
      'preprocessing': preprocessing_record(name, config),
      'ema': loaded.ema,
      'dtype': str(jnp.dtype(net.dtype)) if hasattr(net, 'dtype') else None,
  }
  if loaded.step is not None:
    results['step'] = loaded.step
  if loaded.run_metrics:
    results['checkpoint_metrics'] = dict(loaded.run_metrics)
  results.update(metrics)
  return results



# Names of the image and command-line modules, importable from here as before
# (looked up on first use: those modules import this one).
_MOVED = {
    'classify': ('ImageError', 'DEFAULT_TOP_K', 'pil_to_rgb', 'load_image',
                 'preprocess_image', 'predict_arrays', 'class_names_for',
                 'classify_images', 'format_predictions'),
    'eval_cli': ('build_parser', 'write_json', 'main'),
}


def __getattr__(name: str):
  for module, names in _MOVED.items():
    if name in names:
      import importlib  # pylint: disable=g-import-not-at-top
      return getattr(importlib.import_module(f'ghostnet_jax.{module}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
