"""Shape arithmetic shared by the layers, the lowerings and the kernels.

The lowest module of the package: it imports nothing of ``ghostnet_jax``, so
model files, :mod:`ghostnet_jax.ops` and :mod:`ghostnet_jax.kernels` can all
use it without importing each other.
"""

from __future__ import annotations

import numbers
from typing import Any


def is_int(v: Any) -> bool:
  """An integral number that is not a bool."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(v: Any, what: str = 'value', name: str | None = None,
         minimum: int | None = None) -> tuple[int, int]:
  """``v`` or ``(v, v)`` as a pair of ints.

  Args:
    v: an int or a sequence of two ints.
    what, name: the argument and the layer, for the error message.
    minimum: the smallest allowed entry (``None``: no check).

  Raises:
    ValueError: naming ``what`` (and ``name``) when ``v`` is not one int or
      two ints (each ``>= minimum``).
  """
  try:
    p = (v, v) if is_int(v) else tuple(v)
  except TypeError:
    p = ()
  if len(p) != 2 or not all(is_int(x) for x in p) or (
      minimum is not None and not all(x >= minimum for x in p)):
    where = f'{name}: ' if name else ''
    kind = ('int or a pair of ints' if minimum is None else
            'positive int or a pair of positive ints' if minimum == 1 else
            f'int >= {minimum} or a pair of them')
    raise ValueError(f'{where}{what} must be a {kind}, got {v!r}.')
  return int(p[0]), int(p[1])


def conv_out_size(size: int, kernel: int, stride: int,
                  pad: tuple[int, int], dilation: int = 1) -> int:
  """Output length of a convolution along one axis: ``(size + pad -
  dilation * (k - 1) - 1) // stride + 1`` with ``pad = (before, after)``."""
  return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1
