"""Orbax checkpoints of model variables: converted weights and their restore.

A converted checkpoint is an orbax ``CheckpointManager`` directory with one
step (0) holding two items:

* ``variables``: ``{'params': ..., 'batch_stats': ...}``
* ``metadata``: JSON, at least ``{'model': name, 'num_classes': n}``

``restore_variables(path)`` reads it back (and, once training exists, a
``train.py`` workdir).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

VARIABLES = 'variables'
METADATA = 'metadata'


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
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardRestore(),
        METADATA: ocp.args.JsonRestore(),
    }))
  return dict(restored[VARIABLES]), dict(restored[METADATA])
