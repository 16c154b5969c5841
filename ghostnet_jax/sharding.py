"""Device mesh and sharding rules of the trainer.

The trainer runs one ``jax.jit`` program over a 2D ``jax.sharding.Mesh`` with
axes ``('data', 'fsdp')``:

* the global batch is split over *all* devices (``P(('data', 'fsdp'))``):
  both axes are data parallel;
* parameters, BatchNorm statistics, optimizer state and EMA are replicated
  over ``'data'`` and, when ``'fsdp'`` has more than one device, sharded over
  it FSDP-style: each array is split along its largest dimension divisible by
  the ``'fsdp'`` size (arrays smaller than ``min_size`` elements, or with no
  divisible dimension, stay replicated). XLA inserts the all-gathers and
  reduce-scatters.

``mesh_shape=(-1, 1)`` is plain data parallelism; ``(-1, 8)`` shards the
state over groups of 8 devices (e.g. one host of 8 GPUs), which lets the big
G-GhostNet variants train with less memory per device.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
MESH_AXES = (DATA_AXIS, FSDP_AXIS)


def resolve_mesh_shape(mesh_shape: Sequence[int],
                       num_devices: int) -> tuple[int, int]:
  """Replaces one ``-1`` in ``mesh_shape`` and checks it covers the devices.

  Raises:
    ValueError: naming ``mesh_shape`` when it does not fit ``num_devices``.
  """
  shape = [int(s) for s in mesh_shape]
  if len(shape) != 2:
    raise ValueError(f'mesh_shape must have 2 entries (data, fsdp); got '
                     f'{tuple(mesh_shape)}.')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh_shape entries must be positive, with at most one '
                     f'-1; got {tuple(mesh_shape)}.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f'mesh_shape {tuple(mesh_shape)} does not fit {num_devices} '
          f'devices: {num_devices} is not divisible by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f'mesh_shape {tuple(mesh_shape)} has {math.prod(shape)} devices but '
        f'there are {num_devices}; use -1 for one axis to fill the rest.')
  return shape[0], shape[1]


def make_mesh(mesh_shape: Sequence[int],
              devices: Sequence[Any] | None = None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over ``devices`` (all devices by default).

  Axes are ``AxisType.Auto``: the step is written for the global batch and
  XLA decides the collectives (not ``jax.make_mesh``'s Explicit default).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(
        shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every device of ``mesh``."""
  return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int,
              min_size: int = 0) -> P:
  """The PartitionSpec of one state array under the FSDP rule.

  The largest dimension divisible by ``fsdp_size`` is split over ``'fsdp'``
  (the first one on ties); everything else is replicated.
  """
  if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in order:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any,
                    min_size: int = 0) -> Any:
  """NamedShardings for every leaf of ``abstract_state`` (FSDP rule)."""
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)),
      abstract_state)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Builds global arrays from this process's slice of the batch.

  Each process passes its ``global_batch // process_count`` examples
  (contiguous in the global batch, in process order);
  ``jax.make_array_from_process_local_data`` places them on the process's
  devices. This is an explicit transfer, allowed under
  ``jax.transfer_guard('disallow')``.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
