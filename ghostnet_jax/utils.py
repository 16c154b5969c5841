"""Small helpers around a model: initialisation, parameter counts, features."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax import initializers, ops


# Computation dtypes by config / command-line name: the one table of the
# trainer (``config.dtype``), ``eval.py --dtype`` and a workdir's metadata.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


def dtype_of(name: str | None) -> Any:
  """The jnp dtype named ``name`` (None stays None).

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name is None:
    return None
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f'Unknown dtype {name!r}; expected one of '
                     f'{sorted(DTYPES)}.') from None


def freeze(value: Any) -> Any:
  """JSON / ConfigDict values -> hashable module fields: lists and tuples
  become tuples (recursively), mappings stay dicts with frozen values."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: freeze(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


def write_json(path: str | os.PathLike, obj: Any, *,
               sort_keys: bool = False) -> None:
  """Writes ``obj`` as indented JSON, atomically (temp file + rename)."""
  path = os.fspath(path)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=sort_keys)
    f.write('\n')
  os.replace(tmp, path)


def dummy_input(model: nn.Module, image_size: int,
                batch_size: int = 1) -> jax.ShapeDtypeStruct:
  """The shape of the zeros a model is initialised on: ``(B, S, S, C)``."""
  return jax.ShapeDtypeStruct(
      (batch_size, image_size, image_size, getattr(model, 'in_chans', 3)),
      jnp.float32)


def init_fn(model: nn.Module, image_size: int, batch_size: int = 1):
  """``rng -> {'params', 'batch_stats'}``: ``model.init`` on zeros, pure (to
  trace under ``jax.jit`` / ``jax.eval_shape``)."""
  shape = dummy_input(model, image_size, batch_size)

  def init(rng):
    return dict(model.init(rng, jnp.zeros(shape.shape, shape.dtype),
                           train=False))

  return init


def host_variables(init: Callable[[jax.Array], dict],
                   rng: jax.Array) -> dict | None:
  """``init(rng)`` (an :func:`init_fn`) as NumPy arrays computed on the host
  without compiling, or ``None`` (see
  :func:`ghostnet_jax.initializers.host_initialise`)."""
  # Parameters do not depend on how a convolution is computed: trace the
  # plain lax convolution, the cheapest to trace.
  with ops.auto_on_cpu('lax'):
    return initializers.host_initialise(init, rng)


def init_variables(model: nn.Module, rng: jax.Array | int = 0,
                   image_size: int = 224, batch_size: int = 1) -> dict:
  """Initialises ``{'params': ..., 'batch_stats': ...}`` for ``model``.

  The family's initialisers run on the host without compiling anything
  (:func:`ghostnet_jax.initializers.host_initialise`, ~1 s); a model with
  other initialisers is initialised by compiling ``model.init``.

  Args:
    model: a module from :func:`ghostnet_jax.create_model`.
    rng: a PRNG key or an int seed.
    image_size: spatial size of the dummy input (parameters do not depend on
      it).
    batch_size: batch of the dummy input.
  """
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  init = init_fn(model, image_size, batch_size)
  host = host_variables(init, rng)
  if host is not None:
    return jax.device_put(host)
  # Initialisation runs once: on the CPU, XLA's backend optimisation level 0
  # compiles it several times faster and the result is the same.
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  return jax.jit(init).lower(rng).compile(compiler_options=options)(rng)


def abstract_variables(model: nn.Module, image_size: int = 224) -> dict:
  """Shapes and dtypes of ``model``'s variables, without computing them."""
  return jax.eval_shape(init_fn(model, image_size), jax.random.key(0))


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested mappings -> ``{path tuple: leaf}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
  """``{path tuple: leaf}`` -> nested dicts (the inverse of
  :func:`flatten_tree`)."""
  return traverse_util.unflatten_dict(dict(flat))


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree (e.g. ``variables['params']``)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def extract_features(model: nn.Module, variables: dict, images: jax.Array,
                     train: bool = False) -> dict[str, jax.Array]:
  """Intermediate feature maps for detection or segmentation heads.

  Compiled with ``jax.jit`` once per model, mode and input shape.

  Args:
    model: a module from :func:`ghostnet_jax.create_model`.
    variables: its variables.
    images: ``(N, H, W, 3)`` float images.
    train: BatchNorm on batch statistics (the updated statistics are not
      returned; use ``model.apply(..., mutable=['batch_stats',
      'intermediates'])`` directly for that).

  Returns:
    A dict ``{'stride_2': (N, H/2, W/2, C2), 'stride_4': ..., 'stride_8': ...,
    'stride_16': ..., 'stride_32': ..., 'pre_logits': (N, D)}`` (the keys a
    model records; every family records the strides it has).
  """
  return _extract_features(model, variables, images, train)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _extract_features(model, variables, images, train):
  mutable = ['intermediates'] + (['batch_stats'] if train else [])
  rngs = {'dropout': jax.random.key(0)} if train else None
  _, state = model.apply(variables, images, train=train, mutable=mutable,
                         rngs=rngs)
  return {k: v for k, v in state['intermediates'].items()
          if not isinstance(v, dict)}
