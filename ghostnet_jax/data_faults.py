"""Input errors that name the file: a damaged tfds shard met mid-run.

A shard truncated or overwritten while training reads it surfaces as an
error about bytes (``cannot identify image file``, ``Corrupted
Riegeli/records file``) that names no file. :func:`named_errors` wraps a
batch iterator: when fetching a batch fails, it checks every
``array_record`` shard of the split (footer and record count against the
dataset's ``shard_lengths``; this reads only the footers) and raises
:class:`InputDataError` naming the damaged file(s), chained to the original
error. If no shard is found damaged the original error propagates
unchanged.
"""

from __future__ import annotations

import os
from typing import Iterator


class InputDataError(OSError):
  """A dataset file is damaged; names it."""


def damaged_shards(dataset: str, data_dir: str | None,
                   split: str) -> list[tuple[str, str]]:
  """``(path, problem)`` for each damaged ``array_record`` shard of a split.

  Returns [] when the dataset is not a tfds ``array_record`` dataset.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from array_record.python import array_record_module as arm  # pylint: disable=g-import-not-at-top
    info = tfds.builder(dataset, data_dir=data_dir).info.splits[split]
    paths = [os.fspath(p) for p in info.filepaths]
    lengths = list(info.shard_lengths)
  except Exception:  # pylint: disable=broad-except  (not a tfds dataset)
    return []
  bad = []
  for path, want in zip(paths, lengths):
    if not os.path.exists(path):
      bad.append((path, 'missing'))
      continue
    size = os.path.getsize(path)
    try:
      reader = arm.ArrayRecordReader(path)
      got = reader.num_records()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except
      bad.append((path, f'unreadable ({size} bytes): {e}'))
      continue
    if got != want:
      bad.append((path, f'{got} records readable, {want} when the dataset '
                        f'was prepared ({size} bytes on disk: truncated?)'))
  return bad


def named_errors(batches: Iterator, *, dataset: str, data_dir: str | None,
                 split: str) -> Iterator:
  """``batches``, with a failure to fetch one turned into
  :class:`InputDataError` naming the damaged shard, when one is found."""
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except Exception as e:  # pylint: disable=broad-except
      bad = damaged_shards(dataset, data_dir, split)
      if not bad:
        raise
      raise InputDataError(
          f'Reading {dataset}:{split} failed ({type(e).__name__}: {e}); '
          'damaged file(s): ' + '; '.join(f'{p}: {why}' for p, why in bad)
          + '. Restore or re-prepare them (tfds build), then rerun the same '
          'command to resume from the last checkpoint.') from e
    yield batch
