"""Evaluation of GhostNet checkpoints on tfds datasets, and photo classification.

The library behind ``eval.py``. Three kinds of checkpoint are read by
:func:`load_checkpoint`:

* a PyTorch file (``.pth`` / ``.pth.tar``, official or timm layout),
  converted on the fly by :mod:`ghostnet_jax.convert`; the model is
  ``model=`` or, when omitted, the one registered architecture whose keys and
  shapes the file matches exactly; the number of classes is read off the
  classifier;
* a converted orbax directory (``python -m ghostnet_jax.convert``): model and
  classes from its metadata;
* a ``train.py`` workdir: the best (or latest) checkpoint, with model,
  dataset, split, classes and preprocessing taken from the run's config.

:func:`evaluate` runs one pass over a tfds split, sharded over every device
of every process: a ``Mesh`` over ``jax.devices()`` with one ``'data'``
axis, the global batch rounded up to a multiple of the device count and the
last batch padded with masked rows, so every example counts exactly once.
Top-1 / top-5 are computed on device as integer counts of hits (``lax.top_k``,
ties broken towards the lower class index) and reported in percent.

:func:`classify_images` classifies image files (any format PIL reads; grey,
palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB by
:func:`load_image`) and returns the top-k classes with their softmax
probabilities.

Python::

    from ghostnet_jax import eval_lib
    results = eval_lib.evaluate('state_dict_73.98.pth', model='ghostnet_100',
                                dataset='imagenet2012', data_dir='~/tfds')
    print(results['top1'], results['top5'], results['num_examples'])
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ghostnet_jax import evaluation, loading, registry, utils
from ghostnet_jax import sharding as shd
from ghostnet_jax.class_names import NUM_IMAGENET_CLASSES, imagenet_classes
# The checkpoint loader lives in the checkpoint layer; its names stay
# importable from here.
from ghostnet_jax.checkpoint import is_workdir  # noqa: F401
from ghostnet_jax.loading import (LoadedCheckpoint, infer_torch_model,  # noqa: F401
                                  load_checkpoint)

DEFAULT_BATCH_SIZE = 256
DEFAULT_TOP_K = 5
# The preprocessing of a train.py workdir's own evaluation.
WORKDIR_PREPROCESS = 'workdir'
DTYPES = utils.DTYPES

# A problem with what eval was asked to do (a user mistake); the loader's
# error, so a bad checkpoint and a bad option are caught alike.
EvalError = loading.LoadError


class ImageError(EvalError):
  """An image file that cannot be read; ``path`` names it."""

  def __init__(self, path: str, problem: str):
    self.path = path
    self.problem = problem
    super().__init__(f'{path}: {problem}')


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


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _composite_on_white(image) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgba = image.convert('RGBA')
  white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
  return np.asarray(Image.alpha_composite(white, rgba).convert('RGB'))


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[:, :, None], 3, axis=2)


def pil_to_rgb(image) -> np.ndarray:
  """A PIL image as ``(H, W, 3)`` uint8 RGB.

  * 16-bit grey (``I;16*``) is scaled to 8 bits (``v / 257``, rounded);
    PIL's own conversion would clip everything above 255 to white. 32-bit
    integer grey (``I``) is read as 8-bit if no value exceeds 255, else as
    16-bit (clipped to [0, 65535]).
  * Float grey (``F``) is read as [0, 1] if it lies there, else as [0, 255]
    (clipped).
  * Transparency (RGBA, LA, palette with a transparent color) is composited
    over white, as an image viewer shows it; opaque pixels are unchanged.
  * Bilevel, grey, palette, CMYK, YCbCr and others: PIL's RGB conversion.
  """
  mode = image.mode
  if mode.startswith('I;16') or mode == 'I':
    a = np.asarray(image).astype(np.float64)
    if mode == 'I' and a.size and a.max() <= 255 and a.min() >= 0:
      grey = a
    else:
      grey = np.clip(a, 0, 65535) / 257.0
    return _grey_to_rgb(np.round(grey).astype(np.uint8))
  if mode == 'F':
    a = np.nan_to_num(np.asarray(image, np.float64))
    if a.size and a.min() >= 0.0 and a.max() <= 1.0:
      a = a * 255.0
    return _grey_to_rgb(np.round(np.clip(a, 0, 255)).astype(np.uint8))
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      mode == 'P' and 'transparency' in image.info):
    return _composite_on_white(image)
  if mode == 'RGB':
    return np.asarray(image)
  return np.asarray(image.convert('RGB'))


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as ``(H, W, 3)`` uint8 RGB (see :func:`pil_to_rgb`).

  EXIF orientation is applied (photos from phones come out upright);
  multi-frame files give their first frame.

  Raises:
    ImageError: naming the file: missing, not an image, truncated or
      corrupt, too large, or of an unsupported mode.
  """
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageError(path, 'file not found.')
  if os.path.isdir(path):
    raise ImageError(path, 'is a directory, not an image file.')
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image) or image
      rgb = pil_to_rgb(image)
  except Image.DecompressionBombError as e:
    raise ImageError(path, f'refused as too large ({e}).') from None
  except (OSError, ValueError, SyntaxError, EOFError, IndexError,
          TypeError) as e:
    what = str(e) or type(e).__name__
    raise ImageError(path, f'cannot read this image ({what}); the file is '
                     'not an image PIL can decode, or it is truncated or '
                     'corrupt.') from None
  if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
    raise ImageError(path, f'decodes to an unusable array of shape '
                     f'{rgb.shape}.')
  return np.ascontiguousarray(rgb)


def preprocess_image(image: np.ndarray,
                     eval_config: registry.EvalConfig) -> np.ndarray:
  """``(H, W, 3)`` uint8 -> the model's ``(S, S, 3)`` float32 input."""
  from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.preprocess_eval(
      image, eval_config.input_size, eval_config.crop_fraction,
      eval_config.interpolation, eval_config.mean, eval_config.std)


@functools.lru_cache(maxsize=16)
def _make_predict(model, mesh: Mesh, k: int):
  replicated = shd.replicated(mesh)
  batch = shd.batch_sharding(mesh)

  def predict(variables, images):
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)
    return logits, top_p, top_i

  return jax.jit(predict, in_shardings=(replicated, batch),
                 out_shardings=(batch, batch, batch))


def predict_arrays(model, variables: Mapping, images: np.ndarray, *,
                   top_k: int = DEFAULT_TOP_K, batch_size: int = 64,
                   mesh: Mesh | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Logits and top-k of preprocessed ``(N, S, S, 3)`` images.

  Returns ``(logits (N, C), top-k probabilities (N, k), top-k indices
  (N, k))``; ``k = min(top_k, C)``. Every batch is padded to ``batch_size``
  rounded up to a multiple of the device count (one compiled shape) and
  sharded over ``mesh`` (default: this process's devices).
  """
  mesh = make_mesh(jax.local_devices()) if mesh is None else mesh
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  num_classes = getattr(model, 'num_classes', None)
  if not num_classes:
    num_classes = int(jax.eval_shape(
        lambda x: model.apply(variables, x, train=False),
        jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32)).shape[-1])
  k = max(1, min(int(top_k), num_classes))
  predict = _make_predict(model, mesh, k)
  variables = _replicate(dict(variables), mesh)
  chunk = round_batch_size(batch_size, mesh)
  outs = []
  for start in range(0, n, chunk):
    part = images[start:start + chunk]
    pad = chunk - part.shape[0]
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:],
                                            np.float32)])
    sharded = jax.device_put(part, shd.batch_sharding(mesh))
    outs.append([np.asarray(o)[:chunk - pad] for o in predict(variables,
                                                               sharded)])
  if not outs:
    return (np.zeros((0, num_classes), np.float32), np.zeros((0, k)),
            np.zeros((0, k), np.int32))
  return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def class_names_for(loaded: LoadedCheckpoint, dataset: str | None = None,
                    data_dir: str | None = None) -> tuple[str, ...] | None:
  """Names of ``loaded``'s classes: its own, a dataset's, or ImageNet's."""
  if dataset:
    from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    info = input_pipeline.get_dataset_info(dataset, data_dir)
    if info.num_classes != loaded.num_classes:
      raise EvalError(f'Dataset {dataset!r} has {info.num_classes} classes '
                      f'but the model has {loaded.num_classes} outputs.')
    if info.class_names:
      return tuple(info.class_names)
  if loaded.class_names and len(loaded.class_names) == loaded.num_classes:
    return tuple(loaded.class_names)
  if loaded.num_classes == NUM_IMAGENET_CLASSES:
    return imagenet_classes()
  return None


def classify_images(checkpoint: str | os.PathLike | LoadedCheckpoint,
                    paths: Iterable[str | os.PathLike], *,
                    model: str | None = None, preprocess: str | None = None,
                    image_size: int | None = None,
                    crop_fraction: float | None = None,
                    ema: bool | None = None, which: str | int = 'best',
                    top_k: int = DEFAULT_TOP_K, batch_size: int = 64,
                    dataset: str | None = None, data_dir: str | None = None,
                    dtype: str | None = None, allow_pickle: bool = False,
                    return_inputs: bool = False) -> dict:
  """Top-k classes of each image file.

  Unreadable files do not stop the others: they are listed under
  ``'errors'`` (each an :class:`ImageError` naming the file).

  Returns:
    ``{'model', 'checkpoint', 'preprocessing', 'ema', 'predictions': [{'file',
    'top_k': [{'index', 'class', 'probability'}, ...]}, ...],
    'errors': [ImageError, ...]}``; with ``return_inputs`` also ``'inputs'``
    (the preprocessed ``(N, S, S, 3)`` float32 images, readable files only)
    and ``'logits'``.
  """
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise EvalError('No image files given.')
  loaded = _as_loaded(checkpoint, model=model, ema=ema, which=which,
                      allow_pickle=allow_pickle)
  name, config = resolve_preprocessing(loaded, preprocess, image_size,
                                       crop_fraction)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise EvalError(f'top_k must be a positive int, got {top_k!r}.')
  names = class_names_for(loaded, dataset, data_dir)
  net = loaded.create_model(dtype=_dtype(dtype))
  mesh = make_mesh(jax.local_devices())
  # Files are read one batch at a time; a job smaller than batch_size runs
  # as one batch of its own size.
  chunk = round_batch_size(min(batch_size, len(paths)), mesh)
  errors, predictions, kept_inputs, kept_logits = [], [], [], []
  for start in range(0, len(paths), chunk):
    ok_paths, inputs = [], []
    for path in paths[start:start + chunk]:
      try:
        inputs.append(preprocess_image(load_image(path), config))
        ok_paths.append(path)
      except ImageError as e:
        errors.append(e)
    if not inputs:
      continue
    x = np.stack(inputs)
    logits, top_p, top_i = predict_arrays(net, loaded.variables, x,
                                          top_k=top_k, batch_size=chunk,
                                          mesh=mesh)
    for path, ps, ids in zip(ok_paths, top_p, top_i):
      predictions.append({'file': path, 'top_k': [
          {'index': int(i), 'class': names[int(i)] if names else None,
           'probability': float(p)} for p, i in zip(ps, ids)]})
    if return_inputs:
      kept_inputs.append(x)
      kept_logits.append(logits)
  out = {'model': loaded.model, 'checkpoint': os.path.abspath(loaded.path),
         'checkpoint_kind': loaded.kind,
         'preprocessing': preprocessing_record(name, config),
         'ema': loaded.ema, 'predictions': predictions, 'errors': errors}
  if return_inputs:
    out['inputs'] = np.concatenate(kept_inputs) if kept_inputs else None
    out['logits'] = np.concatenate(kept_logits) if kept_logits else None
  return out


def format_predictions(result: Mapping) -> str:
  """Human-readable lines for :func:`classify_images`'s result."""
  lines = []
  for pred in result['predictions']:
    lines.append(f'{pred["file"]}:')
    for rank, item in enumerate(pred['top_k'], 1):
      label = item['class'] if item['class'] is not None \
          else f'class {item["index"]}'
      if item['class'] is not None:
        label = f'{label} ({item["index"]})'
      lines.append(f'  {rank}. {100.0 * item["probability"]:6.2f}%  {label}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _which(value: str) -> str | int:
  if value in ('best', 'latest'):
    return value
  try:
    step = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected 'best', 'latest' or a step number, got {value!r}") from None
  if step < 0:
    raise argparse.ArgumentTypeError(f'step must be >= 0, got {step}')
  return step


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``eval.py``."""
  p = argparse.ArgumentParser(
      prog='eval.py',
      description='Evaluate a GhostNet checkpoint (PyTorch file, converted '
      'orbax directory or train.py workdir) on a tfds dataset, or classify '
      'image files with it. Top-1/top-5 are in percent.')
  p.add_argument('--checkpoint', required=True,
                 help='a .pth/.pth.tar file, a converted orbax directory, or '
                 'a train.py workdir')
  p.add_argument('--model', default=None,
                 help='registered model name (default: from the checkpoint; '
                 'for a PyTorch file, the one model it fits)')
  p.add_argument('--images', nargs='+', default=None, metavar='FILE',
                 help='classify these image files and print the top classes '
                 'instead of evaluating a dataset')
  p.add_argument('--dataset', default=None,
                 help="tfds name (default: a workdir's dataset, else "
                 'imagenet2012); with --images, its class names are used')
  p.add_argument('--split', default=None,
                 help="tfds split (default: a workdir's eval split, else "
                 'validation, or test if there is none)')
  p.add_argument('--data_dir', '--data-dir', default=None,
                 help="tfds data directory (default: a workdir's, else "
                 "tfds's default)")
  p.add_argument('--preprocess', default=None,
                 choices=sorted(registry.PREPROCESS_PRESETS),
                 help="preset (default: a workdir's own preprocessing, else "
                 "the model's default): official = resize 256 bilinear + "
                 'center crop 224; timm = the same with bicubic')
  p.add_argument('--image_key', '--image-key', default=None,
                 help="the dataset's image feature (default: image)")
  p.add_argument('--label_key', '--label-key', default=None,
                 help="the dataset's ClassLabel feature (default: label)")
  p.add_argument('--image_size', '--image-size', type=int, default=None,
                 help='override the input size')
  p.add_argument('--crop_fraction', '--crop-fraction', type=float,
                 default=None, help='override the center-crop fraction')
  p.add_argument('--batch_size', '--batch-size', type=int, default=None,
                 help="global batch, rounded up to a multiple of the devices "
                 f"(default: a workdir's eval batch, else {DEFAULT_BATCH_SIZE}"
                 '; 64 for --images)')
  group = p.add_mutually_exclusive_group()
  group.add_argument('--ema', dest='ema', action='store_true', default=None,
                     help='require and use EMA weights')
  group.add_argument('--no-ema', '--no_ema', dest='ema', action='store_false',
                     help='use the regular weights even if EMA ones exist '
                     '(default: EMA when the checkpoint has them)')
  p.add_argument('--which', type=_which, default='best',
                 help="workdir checkpoint: 'best' (by eval top-1), 'latest' or "
                 'a step')
  p.add_argument('--dtype', default=None, choices=sorted(DTYPES),
                 help="computation dtype (default: a workdir's, else float32)")
  p.add_argument('--top_k', '--top-k', type=int, default=DEFAULT_TOP_K,
                 help='classes printed per image')
  p.add_argument('--output', default=None,
                 help='write the results as JSON to this file')
  p.add_argument('--worker_count', '--worker-count', type=int, default=0,
                 help='grain worker processes for decoding (per host)')
  p.add_argument('--num_threads', '--num-threads', type=int, default=8,
                 help='decoding threads (per host)')
  p.add_argument('--allow_pickle', '--allow-pickle', action='store_true',
                 help='let torch.load unpickle arbitrary objects (trusted '
                 'files only)')
  p.add_argument('--no_progress', '--no-progress', action='store_true',
                 help='no progress bar')
  p.add_argument('--distributed', action='store_true',
                 help='call jax.distributed.initialize() first (multi-host)')
  return p


def _jsonable(obj):
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, ImageError):
    return {'file': obj.path, 'error': obj.problem}
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return obj


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` (numpy values and image errors made JSON) as indented
  JSON, atomically (:func:`ghostnet_jax.utils.write_json`)."""
  path = os.path.expanduser(path)
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise EvalError(f'Cannot write {path}: directory {parent} does not '
                    'exist.')
  utils.write_json(path, _jsonable(obj))


def _print_summary(results: Mapping) -> None:
  ips = results.get('images_per_second')
  print(f'{results["model"]} on {results["dataset"]}:{results["split"]} '
        f'({results["num_examples"]} examples, preprocessing '
        f'{results["preprocessing"]["name"]}, ema {results["ema"]}): '
        f'top-1 {results["top1"]:.3f}%  top-5 {results["top5"]:.3f}%'
        + (f'  ({ips:.1f} img/s)' if ips else ''))


def main(argv: Sequence[str] | None = None) -> int:
  """``eval.py``: returns the exit status (2 for a user mistake)."""
  args = build_parser().parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  is_main = jax.process_index() == 0
  try:
    if args.output:
      parent = os.path.dirname(os.path.abspath(os.path.expanduser(args.output)))
      if not os.path.isdir(parent):
        raise EvalError(f'--output {args.output}: directory {parent} does not '
                        'exist.')
    if args.images:
      if args.split is not None:
        raise EvalError('--split does not apply to --images.')
      result = classify_images(
          args.checkpoint, args.images, model=args.model,
          preprocess=args.preprocess, image_size=args.image_size,
          crop_fraction=args.crop_fraction, ema=args.ema, which=args.which,
          top_k=args.top_k, batch_size=args.batch_size or 64,
          dataset=args.dataset,
          data_dir=args.data_dir, dtype=args.dtype,
          allow_pickle=args.allow_pickle)
      if is_main:
        if result['predictions']:
          print(format_predictions(result))
        for error in result['errors']:
          print(f'error: {error}', file=sys.stderr)
        if args.output:
          write_json(args.output, result)
      if result['errors']:
        return 2
      return 0
    results = evaluate(
        args.checkpoint, model=args.model, dataset=args.dataset,
        split=args.split, data_dir=args.data_dir, preprocess=args.preprocess,
        image_size=args.image_size, crop_fraction=args.crop_fraction,
        batch_size=args.batch_size, ema=args.ema, which=args.which,
        dtype=args.dtype, allow_pickle=args.allow_pickle,
        progress=not args.no_progress, worker_count=args.worker_count,
        num_threads=args.num_threads, image_key=args.image_key,
        label_key=args.label_key)
    if is_main:
      _print_summary(results)
      if args.output:
        write_json(args.output, results)
    return 0
  except (ValueError, OSError) as e:
    # The library's errors (CheckpointError, EvalError, ImageError) are
    # ValueErrors; a missing file is an OSError.
    print(f'error: {e}', file=sys.stderr)
    return 2
