"""An in-memory stand-in for ghostnet_jax.input_pipeline (tests only).

scikit-learn's 8x8 digits, upscaled by pixel repetition to ``image_size``,
grey copied to RGB; the batch at step ``s`` is a pure function of
``(seed, s)`` and each process takes its contiguous slice, as the real
pipeline does. Used where a test must not depend on tfds files.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  splits: dict
  class_names: tuple


@functools.lru_cache(maxsize=None)
def _arrays():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  return {'train': (x[:1440], y[:1440]), 'test': (x[1440:], y[1440:])}


def get_dataset_info(dataset, data_dir=None):
  if dataset != 'fake_digits':
    raise ValueError(f'Unknown dataset {dataset!r}.')
  a = _arrays()
  return DatasetInfo('fake_digits', 10, {k: len(v[1]) for k, v in a.items()},
                     tuple(str(i) for i in range(10)))


def _images(x, image_size, mean, std):
  k = max(image_size // 8, 1)
  x = np.repeat(np.repeat(x, k, axis=1), k, axis=2)
  pad = image_size - x.shape[1]
  x = np.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
  x = np.stack([x] * 3, axis=-1)
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
          ).astype(np.float32)


def _local(n, process_index, process_count):
  if process_index is None:
    process_index, process_count = 0, 1
  size = n // process_count
  return slice(process_index * size, (process_index + 1) * size)


def train_iterator(*, dataset, data_dir, split='train', global_batch_size,
                   image_size, seed, start_step=0, mean, std,
                   interpolation='bilinear', scale=(0.08, 1.0),
                   ratio=(3 / 4, 4 / 3), hflip=True, process_index=None,
                   process_count=None, worker_count=0):
  del data_dir, interpolation, scale, ratio, hflip, worker_count, dataset
  x, y = _arrays()[split]
  sl = _local(global_batch_size, process_index, process_count)
  step = start_step
  while True:
    rng = np.random.default_rng([seed, step])
    idx = rng.choice(len(y), global_batch_size, replace=False)[sl]
    yield {'image': _images(x[idx], image_size, mean, std), 'label': y[idx]}
    step += 1


class _Eval:

  def __init__(self, x, y, global_batch_size, sl):
    self.x, self.y, self.b, self.sl = x, y, global_batch_size, sl

  def __len__(self):
    return -(-len(self.y) // self.b)

  def __iter__(self):
    for i in range(len(self)):
      idx = np.arange(i * self.b, (i + 1) * self.b)
      mask = idx < len(self.y)
      idx = np.where(mask, idx, 0)
      yield {'image': self.x[idx][self.sl], 'label': self.y[idx][self.sl],
             'mask': mask[self.sl]}


def eval_iterator(*, dataset, data_dir, split, global_batch_size, image_size,
                  crop_fraction=1.0, interpolation='bilinear', mean, std,
                  process_index=None, process_count=None):
  del dataset, data_dir, crop_fraction, interpolation
  x, y = _arrays()[split]
  return _Eval(_images(x, image_size, mean, std), y, global_batch_size,
               _local(global_batch_size, process_index, process_count))
