"""Optimisers and learning-rate schedules of the GhostNet papers, in optax.

Everything is built from optax pieces:

* schedules (:func:`make_schedule`): linear warmup then cosine
  (``optax.warmup_cosine_decay_schedule``; GhostNet v1, G-Ghost), linear warmup
  then staircase exponential decay (``optax.exponential_decay``; GhostNetV2's
  x0.973 every 2.4 epochs), or a constant;
* optimisers (:func:`make_optimizer`): SGD with momentum / Nesterov
  (``optax.sgd``) and TensorFlow's RMSProp (``optax.rmsprop`` with ``eps``
  inside the square root and the mean square starting at 1, as timm's
  ``rmsproptf``), preceded by optional global-norm clipping and coupled L2
  weight decay (``optax.add_decayed_weights``, added to the gradient as
  PyTorch's ``weight_decay`` does) masked off BatchNorm parameters and biases.

Schedules count optimizer steps; epochs are converted with
``steps_per_epoch`` by the caller.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'step', 'constant')
OPTIMIZERS = ('sgd', 'rmsprop_tf')


def make_schedule(*, schedule: str, learning_rate: float, total_steps: int,
                  warmup_steps: int = 0, warmup_init_lr: float = 0.0,
                  end_lr: float = 0.0, decay_steps: float = 0.0,
                  decay_rate: float = 1.0) -> optax.Schedule:
  """The learning rate as a function of the optimizer step.

  Args:
    schedule: ``'cosine'`` (linear warmup from ``warmup_init_lr`` to
      ``learning_rate`` over ``warmup_steps``, then cosine to ``end_lr`` at
      ``total_steps``), ``'step'`` (the same warmup, then ``learning_rate *
      decay_rate ** floor(step / decay_steps)``, periods counted from step 0
      as timm's ``StepLRScheduler`` does) or
      ``'constant'`` (warmup, then ``learning_rate``).
    learning_rate: peak learning rate.
    total_steps: number of training steps.
    warmup_steps: linear warmup length (0 for none).
    warmup_init_lr: learning rate at step 0 of the warmup.
    end_lr: final learning rate of the cosine.
    decay_steps: steps between two decays of the ``'step'`` schedule (may
      be fractional: 2.4 epochs).
    decay_rate: factor applied every ``decay_steps``.

  Returns:
    An ``optax.Schedule``.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f'Unknown schedule {schedule!r}; expected one of '
                     f'{SCHEDULES}.')
  if schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_init_lr, peak_value=learning_rate,
        warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
        end_value=end_lr)
  if schedule == 'step':
    after = _staircase(learning_rate, decay_steps, decay_rate)
  else:
    after = optax.constant_schedule(learning_rate)
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(warmup_init_lr, learning_rate, warmup_steps)
  # join_schedules hands the second schedule ``step - warmup_steps``; timm's
  # step decay counts periods from step 0 (warmup included), so shift back.
  return optax.join_schedules(
      [warmup, lambda step: after(step + warmup_steps)], [warmup_steps])


def with_lr_noise(schedule: optax.Schedule, *, steps_per_epoch: int,
                  total_epochs: float, noise_range: tuple[float, ...],
                  pct: float = 0.67, std: float = 1.0,
                  seed: int = 42) -> optax.Schedule:
  """``schedule`` times a random factor per epoch: timm's ``--lr-noise``.

  In epoch ``e`` (0-based, ``floor(step / steps_per_epoch)``) with
  ``noise_range[0] * total_epochs <= e < noise_range[1] * total_epochs``
  (no upper end when ``noise_range`` has one entry), the learning rate is
  multiplied by ``1 + n_e``, ``n_e ~ std * N(0, 1)`` conditioned on
  ``|n_e| < pct``: the distribution of timm's schedulers. The draws are
  JAX's (``fold_in(key(seed), e)``), not torch's, so the factors are not
  timm's numbers; they are fixed by ``seed`` and the epoch, so a resumed run
  sees the same ones. An empty ``noise_range`` returns ``schedule``.
  """
  if not noise_range:
    return schedule
  start = noise_range[0] * total_epochs
  end = noise_range[1] * total_epochs if len(noise_range) > 1 else float('inf')
  key = jax.random.key(seed)

  def noisy(step):
    epoch = jnp.floor_divide(jnp.asarray(step, jnp.int32), steps_per_epoch)
    noise = std * jax.random.truncated_normal(
        jax.random.fold_in(key, epoch), -pct / std, pct / std)
    on = (epoch >= start) & (epoch < end)
    return schedule(step) * jnp.where(on, 1.0 + noise, 1.0)

  return noisy


def _staircase(learning_rate: float, period: float,
               rate: float) -> optax.Schedule:
  """``learning_rate * rate ** floor(step / period)`` for a real ``period``.

  ``optax.exponential_decay(staircase=True)`` needs an integer period; with an
  integer period this is exactly that schedule.
  """
  if float(period).is_integer():
    return optax.exponential_decay(learning_rate, int(period), rate,
                                   staircase=True)
  # A real period (2.4 epochs of 1251 steps = 3002.4 steps): scale the step
  # count so the period is 1, then use the library's integer staircase.
  inner = optax.exponential_decay(learning_rate, 1, rate, staircase=True)
  return lambda step: inner(step / period)


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: kernels (ndim >= 2).

  BatchNorm scales/shifts and biases (ndim <= 1) are excluded, as timm's
  ``filter_bias_and_bn`` does.
  """
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(*, optimizer: str, schedule: optax.Schedule,
                   momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, decay_all: bool = False,
                   rmsprop_decay: float = 0.9, rmsprop_eps: float = 1e-3,
                   grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
  """Builds the optax optimizer.

  Args:
    optimizer: ``'sgd'`` or ``'rmsprop_tf'``.
    schedule: learning rate schedule.
    momentum: momentum of both optimisers (0 disables it for SGD).
    nesterov: Nesterov momentum.
    weight_decay: L2 coefficient added to the gradient (``grad + wd *
      param``, PyTorch/timm's coupled weight decay) before the optimizer.
    decay_all: also decay BatchNorm parameters and biases.
    rmsprop_decay: RMSProp's moving-average decay (timm's ``alpha``).
    rmsprop_eps: RMSProp's epsilon, added inside the square root (TF).
    grad_clip_norm: clip gradients to this global norm first (0: off).

  Returns:
    An ``optax.GradientTransformation``.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {optimizer!r}; expected one of '
                     f'{OPTIMIZERS}.')
  chain = []
  if grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  if weight_decay > 0:
    chain.append(optax.add_decayed_weights(
        weight_decay, mask=None if decay_all else weight_decay_mask))
  if optimizer == 'sgd':
    chain.append(optax.sgd(schedule, momentum=momentum or None,
                           nesterov=nesterov))
  else:
    chain.append(optax.rmsprop(schedule, decay=rmsprop_decay, eps=rmsprop_eps,
                               initial_scale=1.0, eps_in_sqrt=True,
                               momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*chain)
