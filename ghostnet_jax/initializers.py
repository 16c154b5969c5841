"""Initialisers that also run on the host, and initialisation without XLA.

``model.init`` under ``jax.jit`` compiles every parameter's random-number
code as its own kernels: for ``ghostnet_100`` (432 arrays) XLA:CPU spends
~8 s compiling a program that runs in 0.2 s, and initialising eagerly is
slower still (each op compiles per shape). :func:`host_initialise` instead
traces ``model.init`` once (no compilation) with the random initialisers
drawing their values from one NumPy generator, and reads every variable off
the trace as a host constant: ~1 s for any model of the family.

The random initialisers here are ordinary Flax initialisers
(``init(key, shape, dtype)``): outside :func:`host_initialise` they call
:func:`flax.linen.initializers.variance_scaling` / ``jax.random.uniform`` and
behave exactly like them; inside it they return NumPy arrays with the same
distribution. Constant initialisers (Flax's ``zeros``/``ones``,
``jnp.zeros`` in ``self.variable``) need nothing: they appear in the trace as
broadcast constants. A module with any other initialiser (research code's own
modules) makes :func:`host_initialise` return ``None``; callers then compile
``model.init`` as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The NumPy generator the initialisers draw from while host_initialise traces.
_HOST_RNG: contextvars.ContextVar[np.random.Generator | None] = (
    contextvars.ContextVar('ghostnet_jax_host_rng', default=None))


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
  """(fan_in, fan_out) as Flax computes them: in = axis -2, out = axis -1,
  the remaining axes the receptive field."""
  if len(shape) < 2:
    raise ValueError(f'variance scaling needs a kernel of rank >= 2, got '
                     f'shape {shape}.')
  receptive = math.prod(shape[:-2])
  return shape[-2] * receptive, shape[-1] * receptive


@dataclasses.dataclass(frozen=True)
class VarianceScaling:
  """:func:`flax.linen.initializers.variance_scaling` with a host form.

  Attributes:
    scale: variance numerator.
    mode: ``'fan_in'``, ``'fan_out'`` or ``'fan_avg'``.
    distribution: ``'uniform'``, ``'normal'`` (untruncated) or
      ``'truncated_normal'``.
  """
  scale: float
  mode: str
  distribution: str

  def __post_init__(self):
    if self.mode not in ('fan_in', 'fan_out', 'fan_avg'):
      raise ValueError(f'VarianceScaling: unknown mode {self.mode!r}.')
    if self.distribution not in ('uniform', 'normal', 'truncated_normal'):
      raise ValueError(
          f'VarianceScaling: unknown distribution {self.distribution!r}.')

  def __call__(self, key: jax.Array, shape, dtype=jnp.float32):
    rng = _HOST_RNG.get()
    if rng is None:
      return nn.initializers.variance_scaling(
          self.scale, self.mode, self.distribution)(key, shape, dtype)
    shape = tuple(int(d) for d in shape)
    fan_in, fan_out = _fans(shape)
    fan = {'fan_in': fan_in, 'fan_out': fan_out,
           'fan_avg': (fan_in + fan_out) / 2}[self.mode]
    variance = self.scale / max(fan, 1.0)
    if self.distribution == 'uniform':
      limit = math.sqrt(3.0 * variance)
      x = rng.uniform(-limit, limit, shape)
    elif self.distribution == 'normal':
      x = rng.normal(0.0, math.sqrt(variance), shape)
    else:
      # N(0, 1) truncated to [-2, 2], rescaled to the requested variance
      # (the constant is the standard deviation of that truncated normal).
      x = rng.standard_normal(shape)
      bad = np.abs(x) > 2
      while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2
      x *= math.sqrt(variance) / .87962566103423978
    return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """U(-bound, bound), e.g. PyTorch's default bias init with
  ``bound = 1 / sqrt(fan_in)``."""
  bound: float

  def __call__(self, key: jax.Array, shape, dtype=jnp.float32):
    rng = _HOST_RNG.get()
    if rng is None:
      return jax.random.uniform(key, shape, dtype, -self.bound, self.bound)
    return rng.uniform(-self.bound, self.bound,
                       tuple(int(d) for d in shape)).astype(dtype)


@contextlib.contextmanager
def _host_rng(rng: np.random.Generator):
  token = _HOST_RNG.set(rng)
  try:
    yield
  finally:
    _HOST_RNG.reset(token)


def _host_constant(var, producers: dict, consts: dict) -> np.ndarray | None:
  """The value of a jaxpr output that needs no computation, else ``None``."""
  if isinstance(var, jax.extend.core.Literal):
    return np.asarray(var.val, var.aval.dtype)
  if var in consts:
    return np.asarray(consts[var])
  eqn = producers.get(var)
  if (eqn is not None and eqn.primitive.name == 'broadcast_in_dim'
      and isinstance(eqn.invars[0], jax.extend.core.Literal)):
    return np.full(var.aval.shape, eqn.invars[0].val, var.aval.dtype)
  return None


def host_initialise(init: Callable[[jax.Array], Any],
                    key: jax.Array) -> Any | None:
  """``init(key)`` computed on the host without compiling, or ``None``.

  Args:
    init: a pure ``key -> variables`` function, e.g.
      :func:`ghostnet_jax.utils.init_fn`.
    key: a PRNG key; its bits seed the NumPy generator the initialisers of
      this module draw from, in the order ``init`` calls them (the same on
      every host and every run).

  Returns:
    The pytree of NumPy arrays ``init`` returns, or ``None`` when some output
    depends on a computation (an initialiser without a host form, or a
    variable computed from the input).
  """
  seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
  with _host_rng(np.random.default_rng(seed)):
    closed, out_shape = jax.make_jaxpr(init, return_shape=True)(key)
  jaxpr = closed.jaxpr
  consts = dict(zip(jaxpr.constvars, closed.consts))
  producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  leaves = []
  for var in jaxpr.outvars:
    value = _host_constant(var, producers, consts)
    if value is None:
      return None
    leaves.append(value)
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(out_shape), leaves)
