"""Rematerialisation of the residual blocks, applied from outside the models.

``config.remat``:

* ``'none'``: every activation the backward pass needs is kept (default);
* ``'blocks'``: each residual block (GhostNet v1/V2/V3 ``GhostBottleneck``,
  G-Ghost ``Bottleneck``, Ghost-ResNet ``GhostResNetBottleneck``) is a
  ``flax.linen.checkpoint`` (``jax.checkpoint``): only its input is kept and
  its inside is recomputed during the backward pass;
* a ``jax.checkpoint_policies`` name (``'dots_saveable'``,
  ``'dots_with_no_batch_dims_saveable'``, ``'nothing_saveable'``, ...):
  blocks are checkpointed and also keep what the policy saves.

The model code is untouched: :func:`wrap` returns an object whose ``apply``
runs the model under ``flax.linen.intercept_methods``, which routes every
block's ``__call__`` through ``nn.checkpoint``. Parameters, batch statistics
and outputs are the same as without remat (the variable tree does not
change, so checkpoints stay interchangeable); only the compiled program's
memory and recompute differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

BLOCK_CLASS_NAMES = frozenset({'GhostBottleneck', 'Bottleneck',
                               'GhostResNetBottleneck'})
POLICIES = ('nothing_saveable', 'everything_saveable', 'dots_saveable',
            'checkpoint_dots', 'dots_with_no_batch_dims_saveable',
            'checkpoint_dots_with_no_batch_dims')
CHOICES = ('none', 'blocks') + POLICIES


def check_config(config) -> None:
  """Raises ValueError naming ``config.remat`` unless it is a choice."""
  value = config.get('remat', 'none')
  if value not in CHOICES:
    raise ValueError(f'config.remat must be one of {CHOICES}; got {value!r}.')


def policy(name: str) -> Callable | None:
  """The ``jax.checkpoint`` policy of a ``config.remat`` value."""
  if name in ('none', 'blocks'):
    return None
  return getattr(jax.checkpoint_policies, name)


def _interceptor(save_policy: Callable | None) -> Callable:
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__' or
        type(module).__name__ not in BLOCK_CLASS_NAMES or
        getattr(module, '_ghostnet_remat_inside', False)):
      return next_fun(*args, **kwargs)
    kwargs = dict(kwargs)
    args = list(args)
    train = bool(kwargs.pop('train', args.pop(1) if len(args) > 1 else False))
    if len(args) != 1 or kwargs:
      return next_fun(*args, **kwargs)  # not the (x, train) call form

    def body(mdl, x):
      # The lifted copy of the block runs its own __call__ directly.
      object.__setattr__(mdl, '_ghostnet_remat_inside', True)
      return type(mdl).__call__(mdl, x, train=train)

    return nn.checkpoint(body, policy=save_policy)(module, args[0])

  return intercept


@dataclasses.dataclass(frozen=True)
class RematModel:
  """``model`` whose ``apply`` checkpoints every residual block."""
  model: nn.Module
  save_policy: Callable | None = None

  def apply(self, *args, **kwargs) -> Any:
    with nn.intercept_methods(_interceptor(self.save_policy)):
      return self.model.apply(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)


def wrap(model: nn.Module, remat: str = 'none'):
  """``model`` itself for ``'none'``, else a :class:`RematModel`."""
  if remat not in CHOICES:
    raise ValueError(f'config.remat must be one of {CHOICES}; got {remat!r}.')
  if remat == 'none':
    return model
  return RematModel(model, policy(remat))
