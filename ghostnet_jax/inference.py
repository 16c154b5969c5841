"""Fast inference: BatchNorm folded into the convolutions before it.

In evaluation a BatchNorm is a per-channel affine map,
``y = x * s + (bias - mean * s)`` with ``s = scale / sqrt(var + eps)``, and
when ``x`` is a convolution's output the multiplication can move into the
kernel: ``conv(x, k) * s == conv(x, k * s)``. :func:`fold_batchnorm` does
that once, outside ``jit``, for every convolution whose output goes straight
into a BatchNorm; the BatchNorm is then only ``x + shift``. The compiled
forward loses a multiplication per element and, more importantly for small
batches, the ~80 small ``rsqrt`` computations of the statistics on every
call.

The folded variables keep the tree structure, names and shapes of the
original ones, so they can be saved, sharded and passed around like them. Each
folded BatchNorm holds ``scale = 1``, ``bias = shift``, ``mean = 0`` and
``var = 1 - eps``: the ordinary ``model.apply`` computes the same function
from them (to rounding), and :func:`folded_apply` (which knows which
BatchNorms are folded) skips the normalisation arithmetic altogether.

Usage::

  predict = ghostnet_jax.inference.make_predict_fn(model, variables)
  logits = predict(images)        # jitted; BN folded once, here

Which convolution feeds which BatchNorm is read off the model itself: its
forward pass is traced abstractly with Flax method interceptors, pairing each
``Conv2d`` output with the ``BatchNorm`` that receives it unchanged. A
BatchNorm whose input is not a convolution's output (GhostNetV3's
BatchNorm-only identity branches) is left as it is. The fold assumes that the
convolution's output has no other consumer (true of every model here; the
tests check each family end to end).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax.layers import FOLDED_BATCHNORMS, BatchNorm, Conv2d

Path = tuple[str, ...]


@contextlib.contextmanager
def folded_batchnorms(paths) -> Iterator[None]:
  """Traces inside this context treat the BatchNorms at ``paths`` as folded
  (evaluation only: ``y = x + bias``)."""
  token = FOLDED_BATCHNORMS.set(frozenset(tuple(p) for p in paths))
  try:
    yield
  finally:
    FOLDED_BATCHNORMS.reset(token)


def conv_batchnorm_pairs(model: nn.Module, variables: Mapping[str, Any],
                         image_size: int = 64,
                         **apply_kwargs) -> dict[Path, Path]:
  """``{batchnorm path: conv path}`` for every BatchNorm fed by a Conv2d.

  Traces ``model.apply(variables, x, train=False)`` abstractly (no compute)
  on an ``image_size`` image.
  """
  pairs: dict[Path, Path] = {}
  conv_outputs: dict[int, Path] = {}
  keep = []  # keeps traced values alive, so their ids stay unique

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    module = context.module
    if isinstance(module, Conv2d):
      conv_outputs[id(out)] = tuple(module.path)
      keep.append(out)
    elif isinstance(module, BatchNorm) and args:
      producer = conv_outputs.get(id(args[0]))
      if producer is not None:
        pairs[tuple(module.path)] = producer
    return out

  x = jax.ShapeDtypeStruct(
      (1, image_size, image_size, getattr(model, 'in_chans', 3)), jnp.float32)

  def run(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False, **apply_kwargs)

  jax.eval_shape(run, variables, x)
  return pairs


def _get(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _copy(tree):
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return tree


def fold_batchnorm(model: nn.Module, variables: Mapping[str, Any],
                   image_size: int = 64) -> tuple[dict, frozenset]:
  """Folds every conv-fed BatchNorm into its convolution.

  Args:
    model: the module.
    variables: its ``{'params': ..., 'batch_stats': ...}``.
    image_size: input size for the abstract trace that finds the pairs (any
      size the model accepts).

  Returns:
    ``(folded_variables, folded_paths)``: variables of the same structure
    (module docstring) and the paths of the folded BatchNorms, for
    :func:`folded_batchnorms` / :func:`folded_apply`. Computed in float64 on
    the host and cast back to the parameters' dtype.
  """
  pairs = conv_batchnorm_pairs(model, variables, image_size)
  params = _copy(jax.device_get(dict(variables['params'])))
  stats = _copy(jax.device_get(dict(variables['batch_stats'])))
  eps_of = {}

  def record_eps(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm):
      eps_of[tuple(context.module.path)] = context.module.epsilon
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_eps):
    jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables,
        jax.ShapeDtypeStruct((1, image_size, image_size,
                              getattr(model, 'in_chans', 3)), jnp.float32))

  for bn_path, conv_path in pairs.items():
    bn = _get(params, bn_path)
    st = _get(stats, bn_path)
    conv = _get(params, conv_path)
    eps = eps_of[bn_path]
    dtype = np.asarray(conv['kernel']).dtype
    var = np.asarray(st['var'], np.float64)
    s = np.asarray(bn['scale'], np.float64) / np.sqrt(var + eps)
    shift = (np.asarray(bn['bias'], np.float64)
             - np.asarray(st['mean'], np.float64) * s)
    new_conv = dict(conv)
    new_conv['kernel'] = (np.asarray(conv['kernel'], np.float64) * s).astype(
        dtype)
    if 'bias' in conv:  # conv bias goes through the BatchNorm's affine map
      new_conv['bias'] = (np.asarray(conv['bias'], np.float64) * s
                          + shift).astype(dtype)
      shift = np.zeros_like(shift)
    _set(params, conv_path, new_conv)
    bn_dtype = np.asarray(bn['scale']).dtype
    _set(params, bn_path, dict(bn, scale=np.ones_like(s).astype(bn_dtype),
                               bias=shift.astype(bn_dtype)))
    st_dtype = np.asarray(st['var']).dtype
    _set(stats, bn_path, dict(st, mean=np.zeros_like(var).astype(st_dtype),
                              var=np.full_like(var, 1 - eps).astype(st_dtype)))
  to_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)
  folded = dict(variables)
  folded['params'] = to_jax(params)
  folded['batch_stats'] = to_jax(stats)
  return folded, frozenset(pairs)


def folded_apply(model: nn.Module, folded_variables, folded_paths, x,
                 **kwargs):
  """``model.apply(folded_variables, x, train=False)`` with the folded
  BatchNorms reduced to ``x + bias``. Use under ``jit``."""
  with folded_batchnorms(folded_paths):
    return model.apply(folded_variables, x, train=False, **kwargs)


def make_predict_fn(model: nn.Module, variables: Mapping[str, Any],
                    fold: bool = True) -> Callable[[jax.Array], jax.Array]:
  """A jitted ``images -> model outputs`` function for evaluation.

  Args:
    model: the module.
    variables: its variables (``params`` and ``batch_stats``).
    fold: fold BatchNorm into the convolutions (:func:`fold_batchnorm`).

  Returns:
    ``predict(images)``; the (folded) variables are arguments of the
    compiled function, not constants baked into it.
  """
  if fold:
    variables, paths = fold_batchnorm(model, variables)
  else:
    paths = frozenset()
  apply = jax.jit(lambda v, x: folded_apply(model, v, paths, x))
  return lambda images: apply(variables, images)
