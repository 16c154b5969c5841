"""Backbone use of the models: feature levels, output stride, weight transfer.

Every registered model takes three attributes for dense prediction (the
names of timm's ``create_model`` arguments)::

  model = create_model('ghostnet_100', features_only=True,
                       out_indices=(1, 2, 3, 4), output_stride=16)
  maps = model.apply(variables, images)        # list of (N, H/r, W/r, C)

* ``features_only``: ``__call__`` returns the feature maps of the chosen
  levels, a list of NHWC arrays (shallow to deep), and stops after the
  deepest one: no later layer is computed or has parameters.
* ``out_indices``: the levels to return (``None``: all of them, timm's
  default); negative indices count from the deepest level.
* ``output_stride``: 32 (the classification network), 16 or 8. The strides
  that would take the network below ``1 / output_stride`` become 1, and the
  layers after them dilate their spatial kernels by the stride they lost
  (atrous convolution): same parameters, so ImageNet weights load.

:func:`feature_info` describes the levels (channels, reduction, official
module name) without running or initialising anything;
:func:`transfer_variables` loads a classification model's variables into a
backbone (features-only, headless or with a new head).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax import utils

OUTPUT_STRIDES = (8, 16, 32)
# Top-level modules of a classification head; a backbone may lack them or
# have them with other shapes (another num_classes).
HEAD_MODULES = ('classifier', 'fc')


@dataclasses.dataclass(frozen=True)
class FeatureLevel:
  """One feature level: channels, reduction (input size / map size) and the
  official (PyTorch) name of the module whose output it is."""
  num_chs: int
  reduction: int
  module: str

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_output_stride(output_stride: int, model: str = 'model') -> None:
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f'{model}: output_stride must be one of {OUTPUT_STRIDES}'
                     f', got {output_stride!r}.')


def resolve_out_indices(out_indices: Sequence[int] | None, num_levels: int,
                        model: str = 'model') -> tuple[int, ...]:
  """``out_indices`` as sorted non-negative level numbers (ValueError if bad).

  ``None`` selects every level; negative indices count from the deepest.
  """
  if out_indices is None:
    return tuple(range(num_levels))
  if isinstance(out_indices, (int, np.integer)):
    out_indices = (out_indices,)
  resolved = []
  for i in out_indices:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
      raise ValueError(f'{model}: out_indices must be ints, got '
                       f'{out_indices!r}.')
    j = int(i) + num_levels if i < 0 else int(i)
    if not 0 <= j < num_levels:
      raise ValueError(f'{model}: out_index {i} is out of range; the model '
                       f'has {num_levels} feature levels (0..{num_levels - 1}'
                       f').')
    resolved.append(j)
  if not resolved or len(set(resolved)) != len(resolved):
    raise ValueError(f'{model}: out_indices must be non-empty and distinct, '
                     f'got {tuple(out_indices)!r}.')
  return tuple(sorted(resolved))


class StrideSchedule:
  """Turns strides into dilation past ``output_stride`` (DeepLab style).

  Walk the network's strided layers in order with :meth:`step`. Layers
  before a stride point use ``dilation_in``; layers after it use
  ``dilation_out`` (which grows by the stride when the stride is dropped).
  """

  def __init__(self, output_stride: int = 32, reduction: int = 1):
    self.output_stride = output_stride
    self.reduction = reduction
    self.dilation = 1

  def step(self, stride: int) -> tuple[int, int, int]:
    """``(effective_stride, dilation_in, dilation_out)`` of a stride point."""
    dilation_in = self.dilation
    if stride > 1 and self.reduction * stride > self.output_stride:
      self.dilation *= stride
      return 1, dilation_in, self.dilation
    self.reduction *= stride
    return stride, dilation_in, dilation_in


class FeatureTaps:
  """Collects the maps of the selected levels inside a model's ``__call__``.

  ``add(level, x)`` returns True once the deepest selected level is in (the
  caller then returns :attr:`maps`).
  """

  def __init__(self, out_indices: tuple[int, ...]):
    self.out_indices = out_indices
    self.maps: list[jax.Array] = []

  def add(self, level: int, x: jax.Array) -> bool:
    if level in self.out_indices:
      self.maps.append(x)
    return level >= self.out_indices[-1]


def feature_taps(model: nn.Module) -> FeatureTaps | None:
  """The taps of a ``features_only`` model (its ``out_indices`` resolved
  against :meth:`feature_levels`); ``None`` for a classifier, whose
  ``output_stride`` is checked instead."""
  name = type(model).__name__
  if model.features_only:
    return FeatureTaps(resolve_out_indices(
        model.out_indices, len(model.feature_levels()), name))
  check_output_stride(model.output_stride, name)
  return None


def feature_info(name: str, **kwargs) -> list[dict[str, Any]]:
  """Per selected level: ``{'num_chs', 'reduction', 'module'}`` (timm's keys).

  ``kwargs`` are :func:`ghostnet_jax.create_model`'s (``out_indices``,
  ``output_stride``, width-changing fields, ...); ``features_only`` is
  implied. Nothing is run or initialised.
  """
  from ghostnet_jax import registry  # pylint: disable=g-import-not-at-top
  kwargs = dict(kwargs, features_only=True)
  model = registry.create_model(name, **kwargs)
  return [lv.as_dict() for lv in model.feature_levels(selected=True)]


def _layout(model: nn.Module, image_size: int) -> dict:
  x = jax.ShapeDtypeStruct((1, image_size, image_size,
                            getattr(model, 'in_chans', 3)), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  return {(c,) + p: tuple(v.shape) for c in ('params', 'batch_stats')
          for p, v in utils.flatten_tree(shapes.get(c, {})).items()}


def transfer_variables(model: nn.Module, source: Mapping,
                       fresh: Mapping | None = None, *,
                       image_size: int = 64) -> dict:
  """Variables for ``model`` (a backbone) from a classification model's.

  Strict: every variable ``model`` has must be in ``source`` with the same
  shape, except the classification head (top-level ``classifier`` / ``fc``),
  which is taken from ``fresh`` (e.g. ``init_variables(model)``) when it is
  missing or has another shape (a new ``num_classes``). Variables of
  ``source`` that ``model`` lacks are ignored only if they belong to the
  same family's full classification model (the head, or the layers after a
  features-only model's deepest level); anything else is an error.

  Args:
    model: from ``create_model(name, features_only=True, ...)`` or with
      another ``num_classes`` (0 included).
    source: ``{'params': ..., 'batch_stats': ...}`` of the classification
      model (e.g. from :func:`ghostnet_jax.convert.load_torch_checkpoint`).
    fresh: variables of ``model`` to take a new head from.
    image_size: dummy input size for reading shapes (nothing is computed).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``model``; arrays from
    ``source`` are passed through untouched.

  Raises:
    ValueError: naming (up to 5 of each) missing, mis-shaped and unknown
      variables.
  """
  want = _layout(model, image_size)
  full = model.clone(features_only=False, parent=None)
  known = set(_layout(full, image_size))
  got = {}
  for c in ('params', 'batch_stats'):
    for p, v in utils.flatten_tree(source.get(c, {})).items():
      got[(c,) + p] = v
  fresh_flat = {}
  if fresh is not None:
    for c in ('params', 'batch_stats'):
      for p, v in utils.flatten_tree(fresh.get(c, {})).items():
        fresh_flat[(c,) + p] = v
  out, missing, misshaped = {}, [], []
  for path, shape in want.items():
    is_head = path[1] in HEAD_MODULES
    v = got.get(path)
    if v is not None and tuple(np.shape(v)) == shape:
      out[path] = v
    elif is_head and path in fresh_flat:
      out[path] = fresh_flat[path]
    elif v is None:
      missing.append(path)
    else:
      misshaped.append(f'{"/".join(path)} {tuple(np.shape(v))} != {shape}')
  unknown = [p for p in got if p not in want and p not in known
             and p[1] not in HEAD_MODULES]
  if missing or misshaped or unknown:
    fmt = lambda xs: sorted('/'.join(x) if isinstance(x, tuple) else x
                            for x in xs)[:5]
    head = ('' if fresh is not None else
            ' (pass `fresh` variables to initialise a new head)')
    raise ValueError(
        f'The variables do not fit {type(model).__name__}: missing '
        f'{fmt(missing)}{head}, mis-shaped {fmt(misshaped)}, unknown '
        f'{fmt(unknown)} (at most 5 of each shown).')
  flat_out: dict[str, dict] = {}
  for path, v in out.items():
    flat_out.setdefault(path[0], {})[path[1:]] = v
  return {c: utils.unflatten_tree(flat_out.get(c, {}))
          for c in ('params', 'batch_stats')}
