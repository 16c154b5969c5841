"""Image-folder datasets: ``dataset='folder:/path'``, read without TensorFlow.

Layout (the one most people have for ImageNet and their own data)::

  /path/train/<class>/<image>     # any depth below <class>
  /path/val/<class>/<image>       # also 'validation' or 'test'

Classes are the sub-folders of ``train/`` in sorted order (label = index);
an evaluation split may hold a subset of them, never another name. Files
are listed once per process in sorted order, so every process sees the same
examples in the same order and the input pipeline shards them exactly as it
shards a tfds split.

Bad files are found when the split is listed: a file whose suffix is not an
image format, or that PIL cannot open (its header), is *bad*. With
``bad_files='fail'`` the listing raises, naming every bad path (up to 20);
with ``'skip'`` they are left out and counted (:attr:`FolderSplit.skipped`)
and a warning names them. A file that opens but fails to decode later
(truncated data) raises, naming its path, in either mode.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

PREFIX = 'folder:'
SPLITS = ('train', 'val', 'validation', 'test')
IMAGE_SUFFIXES = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif',
                            '.tiff', '.webp', '.ppm', '.pgm', '.jfif'})
BAD_FILES = ('fail', 'skip')
_SHOW = 20


class FolderError(ValueError):
  """An unusable image folder; the message names the path."""


def is_folder(dataset: Any) -> bool:
  return isinstance(dataset, str) and dataset.startswith(PREFIX)


def folder_root(dataset: str) -> str:
  root = os.path.abspath(os.path.expanduser(dataset[len(PREFIX):]))
  if not dataset[len(PREFIX):]:
    raise FolderError(f'dataset {dataset!r}: give a path after "folder:".')
  if not os.path.isdir(root):
    raise FolderError(f'dataset {dataset!r}: no directory {root}.')
  return root


def _files_below(directory: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames.sort()
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if not f.startswith('.'))
  return out


def _is_bad(path: str) -> str | None:
  """Why ``path`` is not a readable image, or None."""
  if os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
    return 'not an image file type'
  try:
    with Image.open(path) as im:
      im.size  # noqa: B018  (header only)
  except Exception as e:  # noqa: BLE001 (any failure is reported with the path)
    return f'cannot be opened as an image ({type(e).__name__}: {e})'
  return None


@functools.lru_cache(maxsize=None)
def class_names(root: str) -> tuple[str, ...]:
  """Sorted class folder names of ``root/train``."""
  train = os.path.join(root, 'train')
  if not os.path.isdir(train):
    raise FolderError(f'{root} has no train/ folder (expected '
                      f'{root}/train/<class>/<image>).')
  names = tuple(sorted(d for d in os.listdir(train)
                       if os.path.isdir(os.path.join(train, d))
                       and not d.startswith('.')))
  if not names:
    raise FolderError(f'{train} holds no class folders (expected '
                      f'{train}/<class>/<image>).')
  return names


def available_splits(root: str) -> tuple[str, ...]:
  return tuple(s for s in SPLITS if os.path.isdir(os.path.join(root, s)))


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """A random-access source: ``source[i] -> {'image': uint8 (H, W, 3),
  'label': int}``; picklable (grain workers)."""
  paths: tuple[str, ...]
  labels: tuple[int, ...]
  skipped: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = self.paths[int(index)]
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert('RGB'))
    except Exception as e:  # noqa: BLE001
      raise FolderError(f'cannot decode image {path}: {type(e).__name__}: '
                        f'{e}') from e
    return {'image': image, 'label': self.labels[int(index)]}

  def __repr__(self) -> str:
    return f'FolderSplit({len(self.paths)} images)'


@functools.lru_cache(maxsize=None)
def open_split(root: str, split: str, bad_files: str = 'fail') -> FolderSplit:
  """Lists ``root/split/<class>/*`` (cached per process).

  Raises:
    FolderError: no such split, a class folder without images, a class not
      in ``train/``, no images at all, or (``bad_files='fail'``) bad files.
  """
  if bad_files not in BAD_FILES:
    raise FolderError(f'config.folder_bad_files must be one of {BAD_FILES}; '
                      f'got {bad_files!r}.')
  names = class_names(root)
  directory = os.path.join(root, split)
  if not os.path.isdir(directory):
    raise FolderError(f'{root} has no {split}/ folder (splits there: '
                      f'{list(available_splits(root))}).')
  index = {n: i for i, n in enumerate(names)}
  paths, labels, bad = [], [], []
  classes = sorted(d for d in os.listdir(directory)
                   if os.path.isdir(os.path.join(directory, d))
                   and not d.startswith('.'))
  if not classes:
    raise FolderError(f'{directory} holds no class folders.')
  for name in classes:
    if name not in index:
      raise FolderError(f'{os.path.join(directory, name)}: class {name!r} is '
                        f'not a class of {os.path.join(root, "train")}.')
    good = 0
    for path in _files_below(os.path.join(directory, name)):
      why = _is_bad(path)
      if why:
        bad.append(f'{path}: {why}')
        continue
      paths.append(path)
      labels.append(index[name])
      good += 1
    if not good:
      raise FolderError(f'class folder {os.path.join(directory, name)} holds '
                        'no readable images.')
  if bad:
    shown = '\n  '.join(bad[:_SHOW])
    more = f'\n  ... and {len(bad) - _SHOW} more' if len(bad) > _SHOW else ''
    if bad_files == 'fail':
      raise FolderError(
          f'{len(bad)} bad file(s) in {directory} (set '
          f"config.folder_bad_files='skip' to leave them out):\n  {shown}{more}")
    logging.warning('Skipping %d bad file(s) in %s:\n  %s%s', len(bad),
                    directory, shown, more)
  return FolderSplit(tuple(paths), tuple(labels),
                     tuple(b.split(': ')[0] for b in bad))


class FolderBuilder:
  """What :mod:`ghostnet_jax.input_pipeline` asks of a tfds builder."""

  def __init__(self, dataset: str, bad_files: str = 'fail'):
    self.dataset = dataset
    self.root = folder_root(dataset)
    self.bad_files = bad_files
    self.class_names = class_names(self.root)

  def is_prepared(self) -> bool:
    return True

  def splits(self) -> dict[str, int]:
    return {s: len(open_split(self.root, s, self.bad_files))
            for s in available_splits(self.root)}

  def as_data_source(self, split: str) -> FolderSplit:
    return open_split(self.root, split, self.bad_files)
