"""Classification of image files with any checkpoint (``eval.py --images``).

:func:`classify_images` classifies image files (any format PIL reads; grey,
palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB by
:func:`load_image`) and returns the top-k classes with their softmax
probabilities; :func:`predict_arrays` does it for preprocessed arrays,
sharded over this process's devices.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ghostnet_jax import eval_lib, registry
from ghostnet_jax import sharding as shd
from ghostnet_jax.class_names import NUM_IMAGENET_CLASSES, imagenet_classes
from ghostnet_jax.eval_lib import (EvalError, make_mesh, preprocessing_record,
                                   resolve_preprocessing, round_batch_size)
from ghostnet_jax.loading import LoadedCheckpoint

DEFAULT_TOP_K = 5


class ImageError(EvalError):
  """An image file that cannot be read; ``path`` names it."""

  def __init__(self, path: str, problem: str):
    self.path = path
    self.problem = problem
    super().__init__(f'{path}: {problem}')


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
  variables = eval_lib._replicate(dict(variables), mesh)
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
  loaded = eval_lib._as_loaded(checkpoint, model=model, ema=ema, which=which,
                      allow_pickle=allow_pickle)
  name, config = resolve_preprocessing(loaded, preprocess, image_size,
                                       crop_fraction)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise EvalError(f'top_k must be a positive int, got {top_k!r}.')
  names = class_names_for(loaded, dataset, data_dir)
  net = loaded.create_model(dtype=eval_lib._dtype(dtype))
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
