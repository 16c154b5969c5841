"""Small helpers around a model: initialisation, parameter counts, features."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def init_variables(model: nn.Module, rng: jax.Array | int = 0,
                   image_size: int = 224, batch_size: int = 1) -> dict:
  """Initialises ``{'params': ..., 'batch_stats': ...}`` for ``model``.

  Args:
    model: a module from :func:`ghostnet_jax.create_model`.
    rng: a PRNG key or an int seed.
    image_size: spatial size of the dummy input (parameters do not depend on
      it).
    batch_size: batch of the dummy input.
  """
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  x = jnp.zeros((batch_size, image_size, image_size,
                 getattr(model, 'in_chans', 3)), jnp.float32)
  init = jax.jit(lambda r, x: model.init(r, x, train=False))
  # Initialisation runs once: on the CPU, XLA's backend optimisation level 0
  # compiles it several times faster (the random number generation of a few
  # hundred initialisers dominates) and the result is the same.
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  variables = init.lower(rng, x).compile(compiler_options=options)(rng, x)
  return dict(variables)


def abstract_variables(model: nn.Module, image_size: int = 224) -> dict:
  """Shapes and dtypes of ``model``'s variables, without computing them."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size,
                            getattr(model, 'in_chans', 3)), jnp.float32)
  return dict(jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x))


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree (e.g. ``variables['params']``)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def extract_features(model: nn.Module, variables: dict, images: jax.Array,
                     train: bool = False) -> dict[str, jax.Array]:
  """Intermediate feature maps for detection or segmentation heads.

  Args:
    model: a module from :func:`ghostnet_jax.create_model`.
    variables: its variables.
    images: ``(N, H, W, 3)`` float images.
    train: BatchNorm in training mode (then ``batch_stats`` are not updated
      here; use ``model.apply(..., mutable=[...])`` directly for that).

  Returns:
    A dict ``{'stride_2': (N, H/2, W/2, C2), 'stride_4': ..., 'stride_8': ...,
    'stride_16': ..., 'stride_32': ..., 'pre_logits': (N, D)}`` (the keys a
    model records; every family records the strides it has).
  """
  mutable = ['intermediates'] + (['batch_stats'] if train else [])
  rngs = {'dropout': jax.random.key(0)} if train else None
  _, state = model.apply(variables, images, train=train, mutable=mutable,
                         rngs=rngs)
  inter = state['intermediates']
  return {k: v for k, v in inter.items() if not isinstance(v, dict)}
