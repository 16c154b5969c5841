"""The model registry: ``create_model(name)`` and each model's defaults.

Every model file registers its named variants with :func:`register_model`.
A registered entry knows how to build the Flax module and carries the
model's evaluation defaults (input size, crop fraction, interpolation,
mean/std) and facts for the README table (paper top-1, official weights).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How a model expects evaluation images to be prepared.

  ``official``: resize the short side to ``input_size / crop_fraction``
  (256 for 224) with ``interpolation``, center crop ``input_size``, scale to
  [0, 1], normalise with ``mean``/``std``.
  """
  input_size: int = 224
  crop_fraction: float = 0.875
  interpolation: str = 'bilinear'
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD


# The two preprocessing presets of eval.py. ``official`` is what the official
# GhostNet validate script does (torchvision Resize(256) bilinear,
# CenterCrop(224)); ``timm`` is timm's default cfg for these models (bicubic).
PREPROCESS_PRESETS = {
    'official': EvalConfig(interpolation='bilinear'),
    'timm': EvalConfig(interpolation='bicubic'),
}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered model name."""
  name: str
  builder: Callable[..., nn.Module]
  family: str
  eval_config: EvalConfig = EvalConfig()
  default_preprocess: str = 'official'
  paper_top1: float | None = None
  weights: str | None = None
  notes: str = ''
  torch_key_map: Callable[[str], str] | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, family: str, paper_top1: float | None = None,
                   weights: str | None = None, notes: str = '',
                   eval_config: EvalConfig = EvalConfig(),
                   default_preprocess: str = 'official',
                   torch_key_map: Callable[[str], str] | None = None):
  """Decorator registering ``builder(**kwargs) -> nn.Module`` under ``name``.

  Args:
    name: registry name, e.g. ``'ghostnet_100'``.
    family: model file / family, e.g. ``'ghostnet'``.
    paper_top1: ImageNet top-1 reported by the paper, for the README.
    weights: official PyTorch weight file name, if one was released.
    notes: one line for the README.
    eval_config: evaluation defaults.
    default_preprocess: ``'official'`` or ``'timm'``.
    torch_key_map: optional rename applied to incoming PyTorch keys by the
      converter (e.g. timm's ``bn1`` -> official ``bn`` in GhostNetV3).
  """

  def decorator(builder):
    if name in _REGISTRY:
      raise ValueError(f'Model {name!r} is registered twice.')
    _REGISTRY[name] = ModelEntry(
        name=name, builder=builder, family=family, eval_config=eval_config,
        default_preprocess=default_preprocess, paper_top1=paper_top1,
        weights=weights, notes=notes, torch_key_map=torch_key_map)
    return builder

  return decorator


def list_models(pattern: str = '*') -> list[str]:
  """Registered model names matching a shell-style ``pattern``, sorted."""
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
  """The registry entry of ``name``; a ValueError listing names if unknown."""
  try:
    return _REGISTRY[name]
  except KeyError:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(
        f'Unknown model {name!r}.{hint} Known models: '
        f'{", ".join(list_models())}.') from None


def get_eval_config(name: str, preprocess: str | None = None) -> EvalConfig:
  """Evaluation defaults of ``name``, optionally under a named preset."""
  entry = get_entry(name)
  if preprocess is None:
    preprocess = entry.default_preprocess
  if preprocess not in PREPROCESS_PRESETS:
    raise ValueError(f'Unknown preprocessing {preprocess!r}; expected one of '
                     f'{sorted(PREPROCESS_PRESETS)}.')
  preset = PREPROCESS_PRESETS[preprocess]
  return dataclasses.replace(entry.eval_config,
                             interpolation=preset.interpolation)


def create_model(name: str, *, num_classes: int = 1000,
                 dtype: Any = jnp.float32, **overrides) -> nn.Module:
  """Builds the Flax module registered as ``name``.

  Args:
    name: a name from :func:`list_models`, e.g. ``'ghostnet_100'``.
    num_classes: classifier outputs; 0 returns the pre-logits features.
    dtype: computation dtype (parameters stay float32).
    **overrides: any other field of the model class, e.g.
      ``conv_impl='lax'``, ``dropout=0.0``, ``bn_batch_groups=8``.

  Returns:
    A ``flax.linen.Module``; ``model.apply(variables, images, train=False)``
    maps NHWC float images to logits ``(N, num_classes)``.
  """
  entry = get_entry(name)
  if num_classes < 0:
    raise ValueError(f'num_classes must be >= 0, got {num_classes}.')
  try:
    return entry.builder(num_classes=num_classes, dtype=dtype, **overrides)
  except TypeError as e:
    raise TypeError(f'create_model({name!r}): {e}') from e
