"""The input pipeline: tfds data sources read with grain, no TensorFlow.

Any tfds image-classification dataset prepared as ``array_record`` (ImageNet
as ``imagenet2012``, the bundled digits as ``ghostnet_digits``) is read with
``tfds.data_source`` and turned into batches by a ``grain.MapDataset``:

* Training (:func:`train_iterator`): an infinite stream. The example at
  global position ``g = step * global_batch_size + j`` is element
  ``g mod N`` of the permutation of epoch ``g // N`` (``N`` the split size),
  augmented with a generator keyed on ``(seed, g)``. So the batch at ``step``
  is a pure function of ``(seed, step)``: a run resumed at ``start_step=k``
  sees exactly the batches a straight run sees from step ``k`` on, and
  process ``i`` of ``P`` reads rows ``[i * B / P, (i + 1) * B / P)`` of every
  global batch ``B``.
* Evaluation (:func:`eval_iterator`): one pass in split order, the last
  global batch padded with ``mask == 0`` rows, every example counted exactly
  once over all processes; :func:`num_eval_batches` (or ``len()``) tells all
  processes how many steps to run.

Preprocessing is plain numpy/PIL and matches torchvision on PIL images:
:func:`preprocess_eval` is ``Resize(round(size / crop_fraction))`` +
``CenterCrop(size)`` + ``ToTensor`` + ``Normalize``; :func:`preprocess_train`
is ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + the same scaling.
Images are ``(H, W, C)`` uint8 in, ``(size, size, 3)`` float32 out, NHWC
batches.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ghostnet_jax import datasets as _datasets  # noqa: F401  (registers builders)
from ghostnet_jax.datasets import folder as _folder
from ghostnet_jax.registry import IMAGENET_MEAN, IMAGENET_STD

INTERPOLATIONS = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
}

# Split names tried when tfds does not know a dataset's splits (only under
# ``tfds.testing.mock_data``, which serves any split name).
_PROBED_SPLITS = ('train', 'validation', 'test')


# ---------------------------------------------------------------------------
# Preprocessing (numpy / PIL)
# ---------------------------------------------------------------------------

def to_rgb(image: np.ndarray) -> np.ndarray:
  """A uint8 image as ``(H, W, 3)`` RGB.

  Grey ``(H, W)`` / ``(H, W, 1)`` is replicated to three channels; RGBA
  ``(H, W, 4)`` drops alpha (what PIL's ``convert('RGB')`` does).

  Raises:
    ValueError: for other shapes or a dtype other than uint8.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'Expected a uint8 image, got dtype {image.dtype} '
                     f'(shape {image.shape}).')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape:
    raise ValueError(
        f'Expected an image of shape (H, W), (H, W, 1), (H, W, 3) or '
        f'(H, W, 4) with H, W > 0, got shape {image.shape}.')
  if image.shape[2] == 1:
    return np.repeat(image, 3, axis=2)
  if image.shape[2] == 4:
    return np.ascontiguousarray(image[:, :, :3])
  return image


def _resample(interpolation: str) -> Image.Resampling:
  """PIL's filter for ``interpolation``; a ValueError naming the choices."""
  try:
    return INTERPOLATIONS[interpolation]
  except KeyError:
    raise ValueError(f'Unknown interpolation {interpolation!r}; expected one '
                     f'of {sorted(INTERPOLATIONS)}.') from None


def _check_mean_std(mean: Sequence[float], std: Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """``mean`` and ``std`` as float32 ``(3,)``; a ValueError unless 3 values
  each and ``std > 0``."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(f'mean and std need 3 values each, got {mean.shape} and '
                     f'{std.shape}.')
  if float(std.min()) <= 0.0:
    raise ValueError(f'std must be positive, got {tuple(std)}.')
  return mean, std


def _check_size(image_size: int) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
      or image_size <= 0:
    raise ValueError(f'image_size must be a positive int, got {image_size!r}.')
  return int(image_size)


def normalize(image: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """uint8 ``(..., 3)`` -> float32 ``(x / 255 - mean) / std``.

  ``mean`` and ``std`` are per channel on the [0, 1] scale (torchvision's
  convention, e.g. :data:`IMAGENET_MEAN`).
  """
  mean, std = _check_mean_std(mean, std)
  image = np.asarray(image)
  if image.shape[-1:] != (3,):
    raise ValueError(f'Expected (..., 3) channels last, got shape {image.shape}.')
  # x * (1 / (255 std)) - mean / std, on rows of W * 3 values: numpy
  # broadcasting over a last axis of 3 is ~10x slower.
  row = image.shape[-2] * 3 if image.ndim >= 2 else 3
  x = image.reshape(-1, row).astype(np.float32)
  x *= np.tile(1.0 / (255.0 * std), row // 3)
  x -= np.tile(mean / std, row // 3)
  return x.reshape(image.shape)


def resize_shorter_side(image: np.ndarray, size: int,
                        interpolation: str = 'bilinear') -> np.ndarray:
  """torchvision ``Resize(size)`` on a PIL image.

  The shorter side becomes ``size``, the longer ``int(size * long / short)``
  (truncated, as torchvision does); PIL resamples, with its antialiasing
  when downscaling. ``(H, W, C)`` uint8 -> ``(h, w, C)`` uint8.
  """
  size = _check_size(size)
  h, w = image.shape[:2]
  short, long = (h, w) if h <= w else (w, h)
  new_short, new_long = size, int(size * long / short)
  new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
  if (new_h, new_w) == (h, w):
    return image
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((new_w, new_h), _resample(interpolation)))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop(size)`` of an image at least ``size`` square.

  Offsets are ``round((H - size) / 2)`` and ``round((W - size) / 2)`` with
  Python's rounding, like torchvision. ``(H, W, C)`` -> ``(size, size, C)``.
  """
  size = _check_size(size)
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f'Cannot center crop {size}x{size} from an image of '
                     f'shape {image.shape}.')
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def eval_resize_size(image_size: int, crop_fraction: float) -> int:
  """Shorter side before the center crop: ``round(image_size / crop_fraction)``.

  256 for 224 at 0.875 (timm floors instead; identical there).
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction}.')
  return int(round(_check_size(image_size) / crop_fraction))


def preprocess_eval(image: np.ndarray, image_size: int,
                    crop_fraction: float = 0.875,
                    interpolation: str = 'bilinear',
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """The official evaluation transform of one image.

  torchvision ``Resize(round(image_size / crop_fraction))``,
  ``CenterCrop(image_size)``, ``ToTensor()``, ``Normalize(mean, std)`` on a
  PIL image, in HWC.

  Args:
    image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8.
    image_size: output side.
    crop_fraction: ``image_size`` over the resized shorter side, in (0, 1].
    interpolation: a key of :data:`INTERPOLATIONS`.
    mean: per-channel mean on the [0, 1] scale.
    std: per-channel std on the [0, 1] scale.

  Returns:
    ``(image_size, image_size, 3)`` float32.
  """
  image = to_rgb(image)
  resized = resize_shorter_side(
      image, eval_resize_size(image_size, crop_fraction), interpolation)
  return normalize(center_crop(resized, image_size), mean, std)


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
  lo, hi = (float(v) for v in value)
  if not 0.0 < lo <= hi:
    raise ValueError(f'{name} must be (low, high) with 0 < low <= high, got '
                     f'{tuple(value)}.')
  return lo, hi


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3),
                            ) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)``.

  Up to 10 tries of an area fraction ``U(scale)`` and a log-uniform aspect
  ratio (width / height) in ``ratio``; a try is kept when the box fits. After
  10 misses: the largest center box whose aspect ratio is clamped to
  ``ratio``.
  """
  s_lo, s_hi = _check_range('scale', scale)
  r_lo, r_hi = _check_range('ratio', ratio)
  if s_hi > 1.0:
    raise ValueError(f'scale must lie within (0, 1], got {tuple(scale)}.')
  area = height * width
  log_lo, log_hi = math.log(r_lo), math.log(r_hi)
  for _ in range(10):
    target_area = area * rng.uniform(s_lo, s_hi)
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < r_lo:
    w, h = width, int(round(width / r_lo))
  elif in_ratio > r_hi:
    h, w = height, int(round(height * r_hi))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        image_size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = 'bilinear') -> np.ndarray:
  """Inception-style crop: torchvision ``RandomResizedCrop`` on a PIL image.

  Args:
    image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8.
    rng: the generator that draws the box.
    image_size: output side.
    scale: range of the box area as a fraction of the image area.
    ratio: range of the box aspect ratio (width / height).
    interpolation: a key of :data:`INTERPOLATIONS`.

  Returns:
    ``(image_size, image_size, 3)`` uint8.
  """
  image = to_rgb(image)
  image_size = _check_size(image_size)
  top, left, h, w = random_resized_crop_box(
      image.shape[0], image.shape[1], rng, scale, ratio)
  crop = Image.fromarray(image[top:top + h, left:left + w])
  if (h, w) == (image_size, image_size):
    return np.asarray(crop)
  return np.asarray(crop.resize((image_size, image_size),
                                _resample(interpolation)))


def preprocess_train(image: np.ndarray, rng: np.random.Generator,
                     image_size: int,
                     scale: Sequence[float] = (0.08, 1.0),
                     ratio: Sequence[float] = (3 / 4, 4 / 3),
                     interpolation: str = 'bilinear', hflip: bool = True,
                     mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD,
                     augment: Any = None) -> np.ndarray:
  """Training augmentation of one image.

  :func:`random_resized_crop`, then (if ``hflip``) a horizontal flip with
  probability 1/2, then scaling to [0, 1] and normalisation. Every random
  draw comes from ``rng``. ``augment`` (an :class:`ghostnet_jax.augment.Augment`)
  adds RandAugment / colour jitter after the flip and random erasing after
  the normalisation; without it the draws are unchanged.

  Returns:
    ``(image_size, image_size, 3)`` float32.
  """
  crop = random_resized_crop(image, rng, image_size, scale, ratio,
                             interpolation)
  if hflip and rng.random() < 0.5:
    crop = crop[:, ::-1]
  if augment is None:
    return normalize(crop, mean, std)
  crop = augment.image_ops(np.ascontiguousarray(crop), rng)
  return augment.erase(normalize(crop, mean, std), rng)


# ---------------------------------------------------------------------------
# Dataset metadata
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline and the trainer need to know about a dataset.

  Attributes:
    name: tfds name as given (may carry ``/config`` and ``:version``).
    num_classes: classes of the label feature.
    splits: ``{split name: number of examples}``.
    image_key: image feature key (``'image'``).
    label_key: ``ClassLabel`` feature key (``'label'``).
    class_names: names of the classes, when tfds has them.
    data_dir: tfds data directory it was found in (``None``: tfds default).
    image_shape: the image feature's shape, ``None`` for unknown sides.
  """
  name: str
  num_classes: int
  splits: dict[str, int]
  image_key: str = 'image'
  label_key: str = 'label'
  class_names: tuple[str, ...] | None = None
  data_dir: str | None = None
  image_shape: tuple[int | None, ...] | None = None

  @property
  def eval_split(self) -> str:
    """``'validation'`` if the dataset has it, else ``'test'``."""
    for split in ('validation', 'test'):
      if split in self.splits:
        return split
    raise ValueError(f'Dataset {self.name!r} has neither a validation nor a '
                     f'test split (splits: {sorted(self.splits)}).')


def _make_builder(dataset: str, data_dir: str | None):
  """``tfds.builder``, with a short error naming close matches."""
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f'dataset must be a tfds name, got {dataset!r}.')
  try:
    return tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = dataset.split('/')[0].split(':')[0]
    names = sorted(set(tfds.list_builders(with_community_datasets=False)))
    close = difflib.get_close_matches(base, names, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown tfds dataset {dataset!r}.{hint} '
                     '(tfds.list_builders() lists the known names.)') from None
  except ModuleNotFoundError as e:
    if 'tensorflow' not in str(e):
      raise
    raise ValueError(
        f'tfds\'s builder code for {dataset!r} needs TensorFlow even to describe '
        'the dataset, and this pipeline does not use TensorFlow. Datasets '
        'whose builders work without it include imagenet2012 and '
        'ghostnet_digits.') from e


def _not_prepared_error(dataset: str, data_dir: str | None,
                        builder) -> ValueError:
  root = os.fspath(builder.data_dir_root)
  lines = [
      f'Dataset {dataset!r} is not prepared in data_dir {root!r} '
      f'(looked for {os.fspath(builder.data_path)}/dataset_info.json'
      + ('' if data_dir else '; data_dir was None, so the tfds default')
      + ').',
  ]
  base = dataset.split('/')[0].split(':')[0]
  if base == _datasets.DIGITS_NAME:
    lines.append('Build it with ghostnet_jax.datasets.prepare_digits'
                 f'({root!r}).')
  else:
    lines.append(f'Prepare it once with: tfds build {base} --data_dir {root} '
                 '--file_format array_record')
    if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
      manual = os.path.join(root, 'downloads', 'manual')
      lines.append(
          f'{base} needs a manual download into {manual} (or pass '
          f'--manual_dir): {" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
    if base.startswith('imagenet'):
      lines.append('(tfds\'s ImageNet builder itself uses TensorFlow to '
                   'prepare the files; reading them here does not.)')
  return ValueError('\n'.join(lines))


def _open_source(builder, dataset: str, data_dir: str | None, split: str):
  """The tfds random-access data source of ``split``, with clear errors."""
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:
    if builder.is_prepared():
      raise ValueError(
          f'Dataset {dataset!r} in {os.fspath(builder.data_path)} is stored '
          f'as {builder.info.file_format}, which grain cannot read at random. '
          f'Rebuild it with --file_format array_record (tfds build), or convert '
          f'it with tfds convert_format.') from e
    raise _not_prepared_error(dataset, data_dir, builder) from e
  except (KeyError, ValueError) as e:
    raise ValueError(f'Cannot read split {split!r} of {dataset!r}: {e}') from e


def _feature_keys(builder, dataset: str, image_key: str | None,
                  label_key: str | None) -> tuple[str, str]:
  features = builder.info.features
  keys = list(features.keys()) if hasattr(features, 'keys') else []
  supervised = builder.info.supervised_keys
  if isinstance(supervised, tuple) and len(supervised) == 2 and \
      all(isinstance(k, str) for k in supervised):
    default_image, default_label = supervised
  else:
    default_image, default_label = 'image', 'label'
  image_key = image_key or ('image' if 'image' in keys else default_image)
  label_key = label_key or ('label' if 'label' in keys else default_label)
  if image_key not in keys or not isinstance(features[image_key],
                                             tfds.features.Image):
    raise ValueError(f'Dataset {dataset!r} has no Image feature {image_key!r} '
                     f'(features: {keys}); pass image_key=.')
  if label_key not in keys or not isinstance(features[label_key],
                                             tfds.features.ClassLabel):
    raise ValueError(f'Dataset {dataset!r} has no ClassLabel feature '
                     f'{label_key!r} to classify (features: {keys}); pass '
                     'label_key= naming one.')
  return image_key, label_key


def _load_folder(dataset: str, bad_files: str):
  """``(FolderBuilder, DatasetInfo)`` of ``'folder:/path'``."""
  builder = _folder.FolderBuilder(dataset, bad_files)
  names = builder.class_names
  info = DatasetInfo(name=dataset, num_classes=len(names),
                     splits=builder.splits(), class_names=names,
                     data_dir=builder.root)
  return builder, info


def _load(dataset: str, data_dir: str | None, image_key: str | None = None,
          label_key: str | None = None, bad_files: str = 'fail'):
  """``(builder, DatasetInfo)``; raises the errors documented below."""
  if _folder.is_folder(dataset):
    return _load_folder(dataset, bad_files)
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  builder = _make_builder(dataset, data_dir)
  image_key, label_key = _feature_keys(builder, dataset, image_key, label_key)
  if builder.is_prepared():
    splits = {name: int(s.num_examples)
              for name, s in builder.info.splits.items()}
  else:
    # Nothing on disk. tfds.testing.mock_data still serves data sources with
    # unknown split names: probe the usual ones; a real dataset fails here.
    splits, cause = {}, None
    for split in _PROBED_SPLITS:
      try:
        splits[split] = len(builder.as_data_source(split=split))
      except Exception as e:  # noqa: BLE001 (reported below)
        cause = cause or e
    if not splits:
      raise _not_prepared_error(dataset, data_dir, builder) from cause
  label = builder.info.features[label_key]
  names = tuple(label.names) if label.names else None
  shape = builder.info.features[image_key].shape
  info = DatasetInfo(
      name=dataset, num_classes=int(label.num_classes), splits=splits,
      image_key=image_key, label_key=label_key, class_names=names,
      data_dir=data_dir, image_shape=tuple(shape) if shape else None)
  return builder, info


def get_dataset_info(dataset: str, data_dir: str | None = None, *,
                     image_key: str | None = None,
                     label_key: str | None = None,
                     bad_files: str = 'fail') -> DatasetInfo:
  """Metadata of a prepared tfds image-classification dataset.

  ``dataset='folder:/path'`` is an image folder instead
  (:mod:`ghostnet_jax.datasets.folder`; ``bad_files``: 'fail' or 'skip').

  Args:
    dataset: tfds name, e.g. ``'imagenet2012'`` or ``'ghostnet_digits'``.
    data_dir: tfds data directory; ``None`` for tfds's default.
    image_key: image feature; default ``'image'`` (else the supervised key).
    label_key: ``ClassLabel`` feature; default ``'label'``.

  Raises:
    ValueError: unknown dataset; not prepared in ``data_dir`` (the message
      says where it looked and how to prepare it); no image or label feature.
  """
  return _load(dataset, data_dir, image_key, label_key, bad_files)[1]


def _checked_split(builder, info: DatasetInfo, split: str, data_dir):
  """Opens ``split`` after checking its name; ``(source, size)``."""
  if not isinstance(split, str) or not split:
    raise ValueError(f'split must be a non-empty string, got {split!r}.')
  if builder.is_prepared():
    names = [s.split('[')[0].strip() for s in split.split('+')]
    unknown = [n for n in names if n not in info.splits]
    if unknown:
      raise ValueError(f'Unknown split {split!r} of {info.name!r}; splits: '
                       f'{sorted(info.splits)}.')
  source = _open_source(builder, info.name, data_dir, split)
  size = len(source)
  if size == 0:
    raise ValueError(f'Split {split!r} of {info.name!r} is empty.')
  return source, size


# ---------------------------------------------------------------------------
# Iterators
# ---------------------------------------------------------------------------

def _processes(process_index: int | None,
               process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only when the caller leaves it to JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index < process_count, got '
                     f'process_index={process_index}, process_count={process_count}.')
  return int(process_index), int(process_count)


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if isinstance(global_batch_size, bool) or not isinstance(
      global_batch_size, (int, np.integer)) or global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be a positive int, got '
                     f'{global_batch_size!r}.')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by process_count {process_count}.')
  return int(global_batch_size) // process_count


def _derive_seed(seed: int, purpose: int) -> int:
  """A 32-bit seed for one use of ``seed`` (grain wants [0, 2**32))."""
  return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


class _IndexedSource:
  """A random-access source returning ``(index, example)``.

  Pads with ``(index, None)`` past the source's end up to ``length``
  (evaluation padding); pickles with its source (grain workers).
  """

  def __init__(self, source, length: int | None = None):
    self._source = source
    self._size = len(source)
    self._length = self._size if length is None else length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    index = int(index)
    if index < self._size:
      return index, self._source[index]
    return index, None

  def __repr__(self) -> str:
    return f'_IndexedSource({self._source!r}, length={self._length})'


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
  """``((index, example), rng) -> batch row`` of :func:`train_iterator`."""
  image_key: str
  label_key: str
  image_size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  interpolation: str
  hflip: bool
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  with_index: bool
  augment: Any = None  # ghostnet_jax.augment.Augment

  def __call__(self, element, rng: np.random.Generator) -> dict[str, Any]:
    index, example = element
    row = {
        'image': preprocess_train(
            example[self.image_key], rng, self.image_size, self.scale,
            self.ratio, self.interpolation, self.hflip, self.mean, self.std,
            self.augment),
        'label': np.int32(example[self.label_key]),
    }
    if self.with_index:
      row['index'] = np.int32(index)
    return row


@dataclasses.dataclass(frozen=True)
class _EvalTransform:
  """``(index, example or None) -> batch row`` of :func:`eval_iterator`."""
  image_key: str
  label_key: str
  image_size: int
  crop_fraction: float
  interpolation: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  with_index: bool

  def __call__(self, element) -> dict[str, Any]:
    index, example = element
    if example is None:  # Padding: counted by nobody.
      row = {'image': np.zeros((self.image_size,) * 2 + (3,), np.float32),
             'label': np.int32(0), 'mask': np.float32(0.0)}
      index = -1
    else:
      row = {
          'image': preprocess_eval(
              example[self.image_key], self.image_size, self.crop_fraction,
              self.interpolation, self.mean, self.std),
          'label': np.int32(example[self.label_key]),
          'mask': np.float32(1.0),
      }
    if self.with_index:
      row['index'] = np.int32(index)
    return row


class BatchIterator:
  """An iterator over batches (dicts of numpy arrays) with an optional length.

  ``len()`` is the number of batches for evaluation iterators; training
  iterators are infinite and have no length.
  """

  def __init__(self, dataset: grain.IterDataset, num_batches: int | None):
    self._iter = iter(dataset)
    self._num_batches = num_batches
    self._remaining = num_batches

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._remaining is not None:
      if self._remaining <= 0:
        raise StopIteration
      self._remaining -= 1
    return next(self._iter)

  def __len__(self) -> int:
    if self._num_batches is None:
      raise TypeError('A training iterator is infinite and has no length.')
    return self._num_batches


def _to_iter(ds: grain.MapDataset, num_threads: int, prefetch_batches: int,
             worker_count: int) -> grain.IterDataset:
  if num_threads < 0 or prefetch_batches < 0 or worker_count < 0:
    raise ValueError('num_threads, prefetch_batches and worker_count must be '
                     '>= 0.')
  options = grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=prefetch_batches)
  it = ds.to_iter_dataset(options)
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside absl.app.run (e.g. under
      # pytest) nothing parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def train_iterator(*, dataset: str, data_dir: str | None, split: str = 'train',
                   global_batch_size: int, image_size: int, seed: int,
                   start_step: int = 0,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = 'bilinear',
                   scale: Sequence[float] = (0.08, 1.0),
                   ratio: Sequence[float] = (3 / 4, 4 / 3),
                   hflip: bool = True,
                   process_index: int | None = None,
                   process_count: int | None = None,
                   worker_count: int = 0, num_threads: int = 2,
                   prefetch_batches: int = 2, with_index: bool = False,
                   image_key: str | None = None,
                   label_key: str | None = None,
                   augment: Any = None,
                   bad_files: str = 'fail') -> BatchIterator:
  """Infinite, resumable, per-process training batches.

  The global batch at step ``s`` holds the examples at global positions
  ``[s * B, (s + 1) * B)``; position ``g`` is example ``perm_e[g mod N]`` of
  epoch ``e = g // N`` (a new permutation each epoch, from ``seed``),
  augmented by :func:`preprocess_train` with a generator keyed on
  ``(seed, g)``. This process yields rows ``[i * B / P, (i + 1) * B / P)``.

  Args:
    dataset: tfds name.
    data_dir: tfds data directory (``None``: tfds default).
    split: tfds split, slicing allowed (``'train[:90%]'``).
    global_batch_size: ``B``, summed over processes; divisible by ``P``.
    image_size: output side.
    seed: non-negative int; shuffling and augmentation derive from it.
    start_step: first step to yield (resuming at ``k`` yields what a straight
      run yields from step ``k``).
    mean, std: normalisation on the [0, 1] scale.
    interpolation, scale, ratio, hflip: see :func:`preprocess_train`.
    process_index, process_count: ``i`` and ``P``; ``None``: from JAX.
    worker_count: grain worker processes (0: threads in this process).
    num_threads: threads preparing batches concurrently.
    prefetch_batches: batches prepared ahead.
    with_index: also yield ``'index'``, int32 ``(B / P,)`` example indices in
      the split (for tests and debugging).
    image_key, label_key: feature keys (default ``'image'``, ``'label'``).
    bad_files: for ``'folder:/path'`` datasets, 'fail' or 'skip'.
    augment: a :class:`ghostnet_jax.augment.Augment` (None: crop and flip
      only). Its ``mix`` mixes each local batch with a generator keyed on
      ``(seed, step, process)`` and adds ``'target'``.

  Returns:
    An infinite iterator of ``{'image': float32 (B / P, S, S, 3),
    'label': int32 (B / P,)}`` (plus ``'target'``, float32 ``(B / P, K)``
    soft labels, with mixup / CutMix).
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
  if isinstance(start_step, bool) or not isinstance(
      start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f'start_step must be a non-negative int, got {start_step!r}.')
  image_size = _check_size(image_size)
  _resample(interpolation)  # a known name
  scale = _check_range('scale', scale)
  ratio = _check_range('ratio', ratio)
  _check_mean_std(mean, std)
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch(global_batch_size, process_count)
  builder, info = _load(dataset, data_dir, image_key, label_key, bad_files)
  source, _ = _checked_split(builder, info, split, data_dir)

  transform = _TrainTransform(
      image_key=info.image_key, label_key=info.label_key,
      image_size=image_size, scale=scale, ratio=ratio,
      interpolation=interpolation, hflip=bool(hflip),
      mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
      with_index=with_index, augment=augment)
  ds = grain.MapDataset.source(_IndexedSource(source))
  ds = ds.shuffle(seed=_derive_seed(seed, 0)).repeat(None)
  ds = ds.random_map(transform, seed=_derive_seed(seed, 1))
  # Row blocks of size B / P: global block s * P + i is process i's step s.
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  if augment is not None and augment.mix is not None:
    from ghostnet_jax.augment import BatchMix  # pylint: disable=g-import-not-at-top
    # Element s of this dataset is this process's step s: keyed on it.
    ds = ds.random_map(BatchMix(augment.mix),
                       seed=_derive_seed(seed, 2 + process_index))
  ds = ds[int(start_step):]
  return BatchIterator(
      _to_iter(ds, num_threads, prefetch_batches, worker_count), None)


def num_eval_batches(*, dataset: str, data_dir: str | None, split: str,
                     global_batch_size: int, bad_files: str = 'fail') -> int:
  """Steps of one evaluation pass: ``ceil(split size / global_batch_size)``."""
  _local_batch(global_batch_size, 1)
  builder, info = _load(dataset, data_dir, bad_files=bad_files)
  _, size = _checked_split(builder, info, split, data_dir)
  return -(-size // int(global_batch_size))


def eval_iterator(*, dataset: str, data_dir: str | None, split: str,
                  global_batch_size: int, image_size: int,
                  crop_fraction: float = 0.875,
                  interpolation: str = 'bilinear',
                  mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  worker_count: int = 0, num_threads: int = 2,
                  prefetch_batches: int = 2, with_index: bool = False,
                  image_key: str | None = None,
                  label_key: str | None = None,
                  bad_files: str = 'fail') -> BatchIterator:
  """One pass over ``split`` in order, padded so every example counts once.

  Global batch ``s`` holds split examples ``[s * B, (s + 1) * B)``; rows past
  the end are padding (zero image, label 0, ``mask`` 0). This process yields
  rows ``[i * B / P, (i + 1) * B / P)`` of each. Every process runs
  ``len(iterator) == num_eval_batches(...)`` steps.

  Args:
    dataset, data_dir, split: as :func:`train_iterator`.
    global_batch_size: ``B``; divisible by ``process_count``.
    image_size, crop_fraction, interpolation, mean, std: see
      :func:`preprocess_eval`.
    process_index, process_count: ``i`` and ``P``; ``None``: from JAX.
    worker_count, num_threads, prefetch_batches: see :func:`train_iterator`.
    with_index: also yield ``'index'`` (int32; -1 for padding).
    image_key, label_key: feature keys.
    bad_files: for ``'folder:/path'`` datasets, 'fail' or 'skip'.

  Returns:
    A finite iterator with ``len()`` of ``{'image': float32 (B / P, S, S, 3),
    'label': int32 (B / P,), 'mask': float32 (B / P,)}``.
  """
  image_size = _check_size(image_size)
  eval_resize_size(image_size, crop_fraction)
  _resample(interpolation)  # a known name
  _check_mean_std(mean, std)
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch(global_batch_size, process_count)
  builder, info = _load(dataset, data_dir, image_key, label_key, bad_files)
  source, size = _checked_split(builder, info, split, data_dir)
  num_batches = -(-size // int(global_batch_size))

  transform = _EvalTransform(
      image_key=info.image_key, label_key=info.label_key,
      image_size=image_size, crop_fraction=float(crop_fraction),
      interpolation=interpolation, mean=tuple(float(m) for m in mean),
      std=tuple(float(s) for s in std), with_index=with_index)
  padded = _IndexedSource(source, num_batches * int(global_batch_size))
  ds = grain.MapDataset.source(padded).map(transform)
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  return BatchIterator(
      _to_iter(ds, num_threads, prefetch_batches, worker_count), num_batches)
