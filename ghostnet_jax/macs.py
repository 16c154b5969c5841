"""Multiply-accumulate counts and a per-stage model summary.

MACs are counted the way the GhostNet papers count FLOPs: the
multiply-accumulates of convolutions and linear layers only (BatchNorm,
activations, pooling and additions are not counted), for one image. They are
read off the model itself: every ``Conv2d`` / ``Dense`` call is intercepted
while the forward pass is traced abstractly (no computation).

The command line ``python -m ghostnet_jax.summary`` prints these tables.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax import registry
from ghostnet_jax.layers import Conv2d


@dataclasses.dataclass
class LayerRecord:
  path: tuple[str, ...]
  kind: str
  output_shape: tuple[int, ...]
  macs: int


def _trace(model: nn.Module, image_size: int) -> tuple[list[LayerRecord], dict,
                                                       dict]:
  """Abstractly runs ``model`` on one image, recording layers and outputs."""
  layers: list[LayerRecord] = []
  top_outputs: dict[str, tuple[int, ...]] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__':
      return out
    path = tuple(module.path)
    if isinstance(module, Conv2d):
      x = args[0]
      kh, kw = ((module.kernel_size,) * 2 if isinstance(module.kernel_size, int)
                else module.kernel_size)
      cin = x.shape[-1]
      macs = (math.prod(out.shape[1:-1]) * out.shape[-1] * kh * kw
              * (cin // module.groups))
      layers.append(LayerRecord(path, 'conv', tuple(out.shape), int(macs)))
    elif isinstance(module, nn.Dense):
      x = args[0]
      macs = math.prod(x.shape[1:]) * out.shape[-1]
      layers.append(LayerRecord(path, 'linear', tuple(out.shape), int(macs)))
    if len(path) == 1 and hasattr(out, 'shape'):
      top_outputs[path[0]] = tuple(out.shape)
    return out

  x = jax.ShapeDtypeStruct((1, image_size, image_size,
                            getattr(model, 'in_chans', 3)), jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    with nn.intercept_methods(interceptor):
      model.apply(variables, x, train=False)
    return variables

  variables = jax.eval_shape(run, x)
  return layers, top_outputs, dict(variables)


def count_macs(name_or_model: str | nn.Module, image_size: int = 224,
               **create_kwargs: Any) -> int:
  """Multiply-accumulates of one ``image_size`` x ``image_size`` image.

  Args:
    name_or_model: a registered model name or a module.
    image_size: input height and width.
    **create_kwargs: passed to :func:`ghostnet_jax.create_model` with a name.

  Returns:
    Conv + linear MACs, e.g. 141,2xx,xxx for ``ghostnet_100`` at 224.
  """
  model = (registry.create_model(name_or_model, **create_kwargs)
           if isinstance(name_or_model, str) else name_or_model)
  layers, _, _ = _trace(model, image_size)
  return sum(r.macs for r in layers)


def stage_of(top_level_name: str) -> str:
  """``'blocks_6_3'`` -> ``'blocks.6'``, ``'layer1_0'`` -> ``'layer1'``."""
  m = re.fullmatch(r'(.*?)_(\d+)(?:_(\d+))?', top_level_name)
  if m and m.group(3) is not None:
    return f'{m.group(1)}.{m.group(2)}'
  if m:
    return m.group(1)
  return top_level_name


def summarize(name: str, image_size: int = 224,
              **create_kwargs: Any) -> list[dict[str, Any]]:
  """Rows ``{stage, output_shape, params, macs}`` in forward order."""
  model = registry.create_model(name, **create_kwargs)
  layers, top_outputs, variables = _trace(model, image_size)
  params = variables.get('params', {})
  rows: dict[str, dict[str, Any]] = {}
  for top, shape in top_outputs.items():
    stage = stage_of(top)
    row = rows.setdefault(stage, {'stage': stage, 'output_shape': shape,
                                  'params': 0, 'macs': 0})
    row['output_shape'] = shape
    if top in params:
      row['params'] += int(sum(np.prod(v.shape) for v in
                               jax.tree_util.tree_leaves(params[top])))
  for rec in layers:
    stage = stage_of(rec.path[0])
    if stage in rows:
      rows[stage]['macs'] += rec.macs
  return [r for r in rows.values() if r['params'] or r['macs']]


def format_summary(name: str, rows: list[dict[str, Any]],
                   image_size: int) -> str:
  lines = [f'{name} at {image_size}x{image_size} (MACs per image: conv + '
           'linear multiply-accumulates)',
           f'{"stage":<14} {"output shape":<22} {"params":>12} {"MACs":>14}']
  lines.append('-' * len(lines[-1]))
  for r in rows:
    shape = '(' + ', '.join(str(d) for d in r['output_shape']) + ')'
    lines.append(f'{r["stage"]:<14} {shape:<22} {r["params"]:>12,} '
                 f'{r["macs"]:>14,}')
  lines.append('-' * len(lines[1]))
  total_p = sum(r['params'] for r in rows)
  total_m = sum(r['macs'] for r in rows)
  lines.append(f'{"total":<14} {"":<22} {total_p:>12,} {total_m:>14,}')
  lines.append(f'{total_p / 1e6:.2f}M parameters, {total_m / 1e6:.1f}M MACs')
  return '\n'.join(lines)
