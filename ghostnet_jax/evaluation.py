"""The one evaluator: loss and top-k counts over batches, sharded over a mesh.

Training (:func:`ghostnet_jax.train_lib.train_and_evaluate`, at its eval
steps) and ``eval.py`` (:func:`ghostnet_jax.eval_lib.evaluate_model`) run the
same compiled step through the same loop:

* :func:`make_eval_step` -- ``(variables, batch) -> sums``: summed loss,
  top-1 and top-5 hits and the number of examples of one global batch; rows
  with ``batch['mask'] == 0`` (padding) count nowhere. Hits and counts are
  int32, so accuracies are exact whatever the split size.
* :func:`evaluate_batches` -- feeds every batch of an iterator of
  per-process batches (``{'image' (B, S, S, 3), 'label' (B,), 'mask' (B,)}``)
  through the step, adds the sums up on the device and returns them as
  Python numbers (and, on request, the logits and labels of the real rows).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ghostnet_jax import sharding as shd


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy ``(N,)`` with label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array,
                 ks: tuple[int, ...] = (1, 5)) -> dict[int, jax.Array]:
  """Per-example 0/1 (float32) top-k correctness ``(N,)`` for each ``k``.

  ``k`` is capped at the number of classes; ``lax.top_k`` breaks ties
  towards the lower class index.
  """
  kmax = min(max(ks), logits.shape[-1])
  _, top = jax.lax.top_k(logits, kmax)
  hits = top == labels[:, None]
  return {k: hits[:, :min(k, kmax)].any(-1).astype(jnp.float32) for k in ks}


def make_eval_step(model: nn.Module, num_classes: int,
                   gather: Callable = lambda t: t,
                   return_logits: bool = False) -> Callable:
  """``(variables, batch) -> sums`` (or ``(sums, logits)``) of one batch.

  ``sums``: ``{'loss': float32, 'top1', 'top5', 'count': int32}`` over the
  rows with ``batch['mask'] > 0``. ``gather`` maps stored variables to the
  ones the model computes with (the trainer all-gathers FSDP-sharded ones).
  ``logits``: ``(B, num_classes)`` float32, with ``return_logits``.
  """

  def eval_fn(variables: dict, batch: dict):
    logits = model.apply(gather(variables), batch['image'],
                         train=False).astype(jnp.float32)
    valid = batch['mask'] > 0
    loss = cross_entropy(logits, batch['label'], num_classes)
    hits = topk_correct(logits, batch['label'], (1, 5))
    count = lambda h: jnp.sum((h > 0) & valid, dtype=jnp.int32)
    sums = {'loss': jnp.sum(jnp.where(valid, loss, 0.0)),
            'top1': count(hits[1]), 'top5': count(hits[5]),
            'count': jnp.sum(valid, dtype=jnp.int32)}
    return (sums, logits) if return_logits else sums

  return eval_fn


@functools.lru_cache(maxsize=16)
def compiled_eval_step(model: nn.Module, num_classes: int, mesh: Mesh,
                       return_logits: bool = False) -> Callable:
  """:func:`make_eval_step` under ``jax.jit`` on ``mesh``.

  Batches are split over every device, sums come back replicated; the
  variables keep the sharding they are passed with (replicated for
  ``eval.py``, the train state's for the trainer) and are all-gathered
  inside the step. Cached per (model, classes, mesh, return_logits), so
  repeated evaluations reuse the compiled program.
  """
  replicated = shd.replicated(mesh)
  batch = shd.batch_sharding(mesh)
  gather = functools.partial(jax.lax.with_sharding_constraint,
                             shardings=replicated)
  out = (replicated, batch) if return_logits else replicated
  return jax.jit(make_eval_step(model, num_classes, gather, return_logits),
                 in_shardings=(None, batch), out_shardings=out)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole value of ``x`` on this host (gathered across processes)."""
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _device_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of an eval batch -> global arrays (labels int32,
  mask float32)."""
  return shd.put_batch({'image': local['image'],
                        'label': np.asarray(local['label'], np.int32),
                        'mask': np.asarray(local['mask'], np.float32)},
                       shd.batch_sharding(mesh))


def evaluate_batches(model: nn.Module, variables: Any,
                     batches: Iterable[Mapping[str, np.ndarray]], *,
                     num_classes: int, mesh: Mesh,
                     return_logits: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> dict:
  """One pass of ``model`` over ``batches``: the evaluator of train and eval.

  Args:
    model: maps ``(B, S, S, 3)`` images to ``(B, num_classes)`` logits.
    variables: its variables, already on ``mesh`` (any sharding).
    batches: this process's slices of global batches: ``image``, ``label``,
      ``mask`` (0 on padding rows).
    num_classes: the model's outputs.
    mesh: the devices the batches are split over.
    return_logits: also return ``logits`` ``(N, C)`` and ``labels`` ``(N,)``
      of the real rows, in order (numpy, gathered on every process).
    on_batch: called after each batch with its number of real local rows
      (progress bars).

  Returns:
    ``{'loss', 'top1', 'top5', 'count', 'compile_seconds', 'seconds'}``:
    summed loss (float), hit counts and examples (ints), the time of the
    first batch's compilation and of the whole pass (without compilation).
  """
  step = compiled_eval_step(model, num_classes, mesh, return_logits)
  totals, compiled, compile_seconds = None, {}, 0.0
  kept = []
  start = time.perf_counter()
  for local in batches:
    batch = _device_batch(local, mesh)
    shape = batch['image'].shape
    if shape not in compiled:  # once per pass (the last batch is padded)
      t0 = time.perf_counter()
      compiled[shape] = step.lower(variables, batch).compile()
      compile_seconds += time.perf_counter() - t0
    out = compiled[shape](variables, batch)
    sums = out[0] if return_logits else out
    if return_logits:
      kept.append((_to_host(out[1]), _to_host(batch['label']),
                   _to_host(batch['mask'])))
    totals = sums if totals is None else jax.tree_util.tree_map(
        jnp.add, totals, sums)
    if on_batch is not None:
      on_batch(int(np.sum(local['mask'])))
  if totals is None:
    result = {'loss': 0.0, 'top1': 0, 'top5': 0, 'count': 0}
  else:
    host = jax.device_get(totals)
    result = {'loss': float(host['loss']), 'top1': int(host['top1']),
              'top5': int(host['top5']), 'count': int(host['count'])}
  result['compile_seconds'] = compile_seconds
  result['seconds'] = time.perf_counter() - start - compile_seconds
  if return_logits:
    if kept:
      keep = np.concatenate([m for _, _, m in kept]) > 0
      result['logits'] = np.concatenate([z for z, _, _ in kept])[keep]
      result['labels'] = np.concatenate([y for _, y, _ in kept])[keep]
    else:
      result['logits'] = np.zeros((0, num_classes), np.float32)
      result['labels'] = np.zeros((0,), np.int32)
  return result
