"""``ghostnet_digits``: scikit-learn's handwritten digits as a tfds dataset.

The only image data available offline: the 1797 real 8x8 grey digits that
scikit-learn bundles (``sklearn.datasets.load_digits``, 10 classes, pixel
values 0..16, light ink on a dark background). The builder upsamples them
with PIL bicubic to ``image_size`` x ``image_size`` (default 32), replicates
the grey channel to RGB, encodes PNG and writes ``array_record`` files that
:mod:`ghostnet_jax.input_pipeline` reads exactly like any tfds dataset, so the
default training run goes through the real data path.

Why 32x32 (config ``'32'``): GhostNet downsamples by 32, so 32x32 inputs end
on a 1x1 map before the global pool, the smallest size at which every stage
still runs on at least one pixel; the 8x8 digits carry no detail that a larger
upsampling would add, and a training step costs roughly (size / 224)^2 of an
ImageNet step, about 1/49. Config ``'64'`` exists for runs that want 2x2
final maps at four times the cost.

Split (deterministic, stratified, no randomness that depends on library
versions): within each class, the examples in scikit-learn's order are
permuted with ``np.random.RandomState(0)`` (a frozen legacy stream) and the
first ``round(0.2 * class_count)`` go to ``test``: 1438 train / 359 test.
Each example keeps its scikit-learn index in the ``index`` feature.

Augmenting: train with ``hflip=False`` (a mirrored 2, 3, 7 or 9 is not that
digit) and a milder ``scale`` than ImageNet's (0.08, 1), e.g. (0.35, 1): a
crop of 8% of a digit rarely shows which digit it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

DIGITS_NAME = 'ghostnet_digits'
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_SOURCE_SIZE = 8
_SOURCE_MAX = 16


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  """A ``ghostnet_digits`` variant; ``image_size`` is the stored side length."""
  image_size: int = 32


def digits_split_indices(labels: np.ndarray,
                         test_fraction: float = TEST_FRACTION,
                         seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """The stratified train/test split of ``labels``.

  Args:
    labels: ``(N,)`` integer class of each example.
    test_fraction: share of each class that goes to ``test``.
    seed: seed of the ``np.random.RandomState`` that permutes each class.

  Returns:
    ``{'train': (N_train,), 'test': (N_test,)}`` sorted int64 indices into
    ``labels``; disjoint, covering every example.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}.')
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  rs = np.random.RandomState(seed)
  train, test = [], []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    members = members[rs.permutation(len(members))]
    n_test = int(round(test_fraction * len(members)))
    test.append(members[:n_test])
    train.append(members[n_test:])
  return {'train': np.sort(np.concatenate(train)),
          'test': np.sort(np.concatenate(test))}


def _digit_png(pixels: np.ndarray, image_size: int) -> bytes:
  """``(8, 8)`` values in 0..16 -> PNG bytes of an RGB ``image_size`` square."""
  from PIL import Image
  grey = np.round(pixels.astype(np.float64) * (255.0 / _SOURCE_MAX))
  grey = Image.fromarray(grey.astype(np.uint8), mode='L')
  if image_size != _SOURCE_SIZE:
    grey = grey.resize((image_size, image_size), Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  grey.convert('RGB').save(buf, format='PNG')
  return buf.getvalue()


class GhostnetDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 1797 handwritten digits, upsampled to RGB squares."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      DigitsConfig(name='32', image_size=32,
                   description='32x32 RGB (the default training size).'),
      DigitsConfig(name='64', image_size=64, description='64x64 RGB.'),
  ]
  DEFAULT_CONFIG_NAME = '32'
  # tfds derives this path through importlib_resources, which is not
  # installed (tfds does not require it); this file is the answer anyway.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=('scikit-learn handwritten digits (UCI optdigits test '
                     'set, 8x8, 0..16) upsampled with PIL bicubic to '
                     f'{size}x{size} RGB; stratified 80/20 split.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            'index': tfds.features.Scalar(dtype=np.int32,
                                          doc='index in load_digits()'),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images, digits.target
    splits = digits_split_indices(labels)
    return {name: self._generate_examples(images, labels, idx)
            for name, idx in splits.items()}

  def _generate_examples(self, images, labels, indices):
    size = self.builder_config.image_size
    for i in indices:
      yield int(i), {'image': _digit_png(images[i], size),
                     'label': int(labels[i]), 'index': int(i)}


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive advisory lock on ``path`` (no-op where fcntl is missing)."""
  try:
    import fcntl
  except ImportError:  # pragma: no cover (not POSIX)
    yield
    return
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def config_size_for(image_size: int) -> int:
  """The digits builder config (32 or 64) a run at ``image_size`` reads:
  32 up to 32 pixels, else 64 (images are resized down, never up)."""
  return 32 if image_size <= 32 else 64


def prepare_digits(data_dir: str, image_size: int = 32):
  """Builds ``ghostnet_digits`` into ``data_dir`` once; a no-op when built.

  Safe to call from several processes at once (a file lock serialises them).

  Args:
    data_dir: tfds data directory (created if missing).
    image_size: 32 or 64, the builder config to build.

  Returns:
    The built dataset's tfds name (``'ghostnet_digits/32'``): what to pass as
    ``dataset`` to :func:`ghostnet_jax.input_pipeline.get_dataset_info` and
    the iterators.
  """
  configs = {c.image_size: c.name for c in GhostnetDigits.BUILDER_CONFIGS}
  if image_size not in configs:
    raise ValueError(f'ghostnet_digits has no {image_size}x{image_size} '
                     f'config; available sizes: {sorted(configs)}.')
  if not data_dir:
    raise ValueError('prepare_digits needs a data_dir to build into.')
  data_dir = os.fspath(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  name = f'{DIGITS_NAME}/{configs[image_size]}'
  with _file_lock(os.path.join(data_dir, f'.{DIGITS_NAME}.lock')):
    builder = GhostnetDigits(config=configs[image_size], data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_dir=os.path.join(data_dir, 'downloads'),
          file_format='array_record')
  return name
