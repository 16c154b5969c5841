"""Knowledge distillation for any student: the teacher, its loss, its step.

Config fields (``configs/default.py``; distillation is off while
``teacher`` is empty and no teacher module is passed):

* ``teacher``: a checkpoint of any kind ``eval.py`` reads (official PyTorch
  file, converted orbax directory, ``train.py`` workdir), loaded with
  :func:`ghostnet_jax.loading.load_checkpoint`.
* ``teacher_model``: its registry name; optional when the checkpoint says
  it, checked against it otherwise.
* ``distill_weight`` ``w``, ``distill_temperature`` ``T``, ``distill_type``:
  the training loss becomes ``CE(student, labels) + w * KD`` with

  - ``'soft'``: ``KD = T^2 * KL(softmax(t / T) || softmax(s / T))`` per
    example (Hinton et al.; with ``T = 1`` the gradient of GhostNetV3's
    official cross-entropy against the teacher's softmax);
  - ``'hard'``: ``KD = CE(s, argmax t)`` (the teacher's labels, DeiT-style).

The teacher runs inside the student's jitted, sharded train step
(:func:`jit_train_step`): eval mode (BatchNorm running statistics, no
dropout), ``stop_gradient`` on its logits, its variables placed with the
student's sharding rule (replicated, or FSDP-sharded over ``'fsdp'`` and
all-gathered in the step like the student's). It sees the student's
(augmented, mixed) input batch, so a teacher trained with another
normalisation loses accuracy: :meth:`Teacher.evaluate` gives its top-1 on
the eval split, which the trainer logs once at the start.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax import loading

DISTILL_TYPES = ('soft', 'hard')


# ---------------------------------------------------------------------------
# The loss (pure)
# ---------------------------------------------------------------------------

def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                 kind: str = 'soft', temperature: float = 1.0) -> jax.Array:
  """Per-example distillation loss, ``(B, K), (B, K) -> (B,)`` float32.

  ``'soft'``: ``T^2 * sum_k p_k (log p_k - log q_k)`` with ``p =
  softmax(t / T)``, ``q = softmax(s / T)``. ``'hard'``: cross-entropy of
  the student against ``argmax t``. No gradient flows into the teacher.
  """
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  if kind == 'soft':
    log_p = jax.nn.log_softmax(t / temperature)
    log_q = jax.nn.log_softmax(s / temperature)
    return temperature ** 2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
  if kind == 'hard':
    log_q = jax.nn.log_softmax(s)
    hard = jnp.argmax(t, axis=-1)
    return -jnp.take_along_axis(log_q, hard[:, None], axis=-1)[:, 0]
  raise ValueError(f'distill_type must be one of {DISTILL_TYPES}; got {kind!r}.')


# ---------------------------------------------------------------------------
# Config checks (no device, no file read)
# ---------------------------------------------------------------------------

def check_config(config) -> None:
  """Checks the distillation fields; absent fields mean "off".

  Raises:
    ValueError: naming the field (the trainer turns it into ConfigError).
  """
  from ghostnet_jax import registry  # pylint: disable=g-import-not-at-top
  teacher = config.get('teacher', '') or ''
  kind = config.get('distill_type', 'soft')
  weight = config.get('distill_weight', 0.0)
  temperature = config.get('distill_temperature', 1.0)
  if not isinstance(teacher, (str, os.PathLike)):
    raise ValueError(f'config.teacher must be a checkpoint path; got {teacher!r}.')
  if kind not in DISTILL_TYPES:
    raise ValueError(f'config.distill_type must be one of {DISTILL_TYPES}; '
                     f'got {kind!r}.')
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
      weight < 0:
    raise ValueError(f'config.distill_weight must be a number >= 0; got '
                     f'{weight!r}.')
  if isinstance(temperature, bool) or not isinstance(
      temperature, (int, float)) or temperature <= 0:
    raise ValueError(f'config.distill_temperature must be > 0; got '
                     f'{temperature!r}.')
  name = config.get('teacher_model', '') or ''
  if name:
    try:
      registry.get_entry(name)
    except (KeyError, ValueError) as e:
      raise ValueError(f'config.teacher_model: {e}') from None
  if teacher and not os.path.exists(os.path.expanduser(os.fspath(teacher))):
    raise ValueError(f'config.teacher: no checkpoint at {os.fspath(teacher)!r} '
                     '(expected a PyTorch file, a converted directory or a '
                     'train.py workdir).')


# ---------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Teacher:
  """A frozen classifier whose logits the student learns from.

  Attributes:
    module: the Flax module (called with ``train=False``).
    variables: its ``{'params', 'batch_stats', ...}`` (host or device).
    name: what to call it in logs (registry name or module class).
    weight, temperature, kind: the loss (see the module docstring).
  """
  module: nn.Module
  variables: Any
  name: str
  weight: float = 1.0
  temperature: float = 1.0
  kind: str = 'soft'

  def logits(self, variables, images: jax.Array,
             gather: Callable = lambda t: t) -> jax.Array:
    """Eval-mode logits ``(B, K)``, no gradient."""
    out = self.module.apply(gather(variables), images, train=False)
    return jax.lax.stop_gradient(out)

  def loss(self, student_logits: jax.Array, batch: dict) -> jax.Array:
    """``weight * mean KD`` of a batch holding ``'teacher_logits'``."""
    return self.weight * distill_loss(
        student_logits, batch['teacher_logits'], kind=self.kind,
        temperature=self.temperature).mean()


def _num_outputs(module: nn.Module, variables, image_size: int) -> int:
  out = jax.eval_shape(
      lambda v: module.apply(v, jnp.zeros((1, image_size, image_size, 3)),
                             train=False), variables)
  return int(out.shape[-1])


def load_teacher(config, num_classes: int, *,
                 teacher: tuple[nn.Module, Any] | None = None,
                 dtype: Any = None) -> Teacher | None:
  """The run's teacher, or None without one.

  Args:
    config: the trainer config (``teacher``, ``teacher_model``,
      ``distill_*``, ``image_size``).
    num_classes: the dataset's classes; the teacher must predict as many.
    teacher: a ``(flax module, variables)`` pair, used instead of
      ``config.teacher``.
    dtype: compute dtype for a registry teacher (the student's).

  Raises:
    ValueError: naming ``config.teacher`` / ``config.teacher_model``: no
      checkpoint, a checkpoint that is not ``teacher_model``, another class
      count, or a module that does not run.
  """
  check_config(config)
  kw = dict(weight=float(config.get('distill_weight', 1.0)),
            temperature=float(config.get('distill_temperature', 1.0)),
            kind=config.get('distill_type', 'soft'))
  if teacher is not None:
    module, variables = teacher
    try:
      k = _num_outputs(module, variables, config.image_size)
    except Exception as e:  # noqa: BLE001 (any failure to run is reported)
      raise ValueError(f'the teacher module passed to train_and_evaluate does '
                       f'not run on {config.image_size}x{config.image_size} '
                       f'images: {e}') from e
    name = type(module).__name__
  elif config.get('teacher'):
    path = os.fspath(config.teacher)
    try:
      loaded = loading.load_checkpoint(
          path, model=config.get('teacher_model') or None)
    except (FileNotFoundError, ValueError, KeyError) as e:
      what = 'config.teacher / config.teacher_model' \
          if config.get('teacher_model') else 'config.teacher'
      raise ValueError(f'{what}: cannot load {path!r} as the teacher: '
                       f'{e}') from None
    module = loaded.create_model(dtype=dtype)
    variables = loaded.variables
    k, name = loaded.num_classes, loaded.model
  else:
    return None
  if k != num_classes:
    raise ValueError(f'config.teacher: the teacher {name} predicts {k} classes '
                     f'but the dataset has {num_classes}.')
  if kw['weight'] == 0:
    raise ValueError('config.distill_weight is 0 but a teacher is set; give '
                     'it a weight > 0 or drop the teacher.')
  return Teacher(module=module, variables=variables, name=name, **kw)


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------

def teacher_shardings(teacher: Teacher, mesh, min_size: int) -> Any:
  """The student's rule for the teacher's variables (FSDP over 'fsdp')."""
  from ghostnet_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype),
      teacher.variables)
  return shd.state_shardings(mesh, abstract, min_size)


def jit_train_step(step_fn: Callable, teacher: Teacher | None, *,
                   in_shardings: tuple, out_shardings: Any,
                   donate_argnums: tuple = (), gather: Callable = lambda t: t,
                   fsdp_min_size: int = 0) -> Callable:
  """``jax.jit(step_fn, ...)``, with the teacher inside when there is one.

  ``step_fn(state, *rest, batch)`` takes the batch last. With a teacher the
  jitted program also takes the teacher's variables (sharded by
  :func:`teacher_shardings`, put on the devices once), computes their
  logits on ``batch['image']`` and hands ``batch['teacher_logits']`` to
  ``step_fn``; the returned callable keeps ``step_fn``'s signature.
  """
  if teacher is None:
    return jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=out_shardings, donate_argnums=donate_argnums)
  mesh = in_shardings[-1].mesh
  tshard = teacher_shardings(teacher, mesh, fsdp_min_size)

  def with_teacher(*args):
    *rest, batch, tvars = args
    logits = teacher.logits(tvars, batch['image'], gather)
    return step_fn(*rest, {**batch, 'teacher_logits': logits})

  jitted = jax.jit(with_teacher, in_shardings=tuple(in_shardings) + (tshard,),
                   out_shardings=out_shardings, donate_argnums=donate_argnums)
  tvars = jax.device_put(teacher.variables, tshard)
  teacher.variables = tvars  # on the devices from now on

  def step(*args):
    return jitted(*args, tvars)

  step.jitted = jitted
  step.teacher_variables = tvars
  return step
