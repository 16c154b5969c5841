"""Compiled memory of a training step with and without block remat.

  python benchmarks/remat_memory.py --model g_ghost_regnetx_160 --batch 256

Compiles one training step (forward with batch statistics, backward, SGD
with momentum; float32 parameters, ``--dtype`` compute) for each
``config.remat`` value on this process's backend and prints
the residuals the backward pass keeps (the leaves of ``jax.vjp``'s
closure, less the parameters; backend-independent, from tracing only) and
``compiled.memory_analysis()``: temporaries (activations kept for the
backward pass plus scratch), arguments, outputs, and "peak" = temporaries +
outputs - outputs aliased to donated arguments. Nothing runs: only the
compiler's buffer assignment is read, so a batch far larger than this
machine's memory can be measured. On a CPU host the numbers are XLA:CPU's
(which expands grouped convolutions into dense ones, inflating the
temporaries of G-Ghost's grouped 3x3s), and its scheduler places the
recomputation right after the forward pass, so its compiled peak does not
show the saving; read the residual column there, and the compiled columns on
a GPU or TPU.

Measured here (2-core CPU, g_ghost_regnetx_160, batch 256, bf16): residuals
58.79 GiB without remat, 4.41 GiB with 'blocks' (and with
'dots_with_no_batch_dims_saveable', which saves no convolution); XLA:CPU
compiled peak 45.06 vs 45.31 GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(model_name: str, batch: int, image_size: int, remat_value: str,
            dtype: str, compile_step: bool = True) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import registry, remat  # pylint: disable=g-import-not-at-top
  model = registry.create_model(
      model_name, num_classes=1000, conv_impl='lax',
      dtype={'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype])
  applied = remat.wrap(model, remat_value)
  tx = optax.sgd(0.1, momentum=0.9)
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size,
                                                       image_size, 3))))
  opt_state = jax.eval_shape(tx.init, variables['params'])

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = applied.apply(
          {'params': p, 'batch_stats': batch_stats}, x, train=True,
          mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new['batch_stats']
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  def forward(p, batch_stats, images):
    return applied.apply({'params': p, 'batch_stats': batch_stats},
                         images, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(0)})[0]

  # What the backward pass keeps from the forward pass, backend-independent:
  # the residuals held by the VJP closure (jax.vjp under eval_shape; no
  # compile, no memory).
  residuals = jax.eval_shape(
      lambda p, bs, images: jax.vjp(lambda q: forward(q, bs, images), p)[1],
      variables['params'], variables['batch_stats'], x)
  params_bytes = sum(a.size * a.dtype.itemsize for a in
                     jax.tree_util.tree_leaves(variables['params']))
  residual_bytes = sum(a.size * a.dtype.itemsize for a in
                       jax.tree_util.tree_leaves(residuals)) - params_bytes
  if not compile_step:
    return {'remat': remat_value, 'residual_gib': residual_bytes / 2.0 ** 30}
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      variables['params'], variables['batch_stats'], opt_state, x, y).compile()
  m = compiled.memory_analysis()
  gib = 2.0 ** 30
  return {
      'remat': remat_value,
      'residual_gib': residual_bytes / gib,
      'temp_gib': m.temp_size_in_bytes / gib,
      'argument_gib': m.argument_size_in_bytes / gib,
      'output_gib': m.output_size_in_bytes / gib,
      'peak_gib': (m.temp_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes) / gib,
      'compile_s': time.perf_counter() - t0,
      'backend': jax.default_backend(),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='g_ghost_regnetx_160')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--no-compile', action='store_true',
                 help='only the residuals (no compilation)')
  p.add_argument('--remat', nargs='+',
                 default=['none', 'blocks', 'dots_with_no_batch_dims_saveable'])
  args = p.parse_args(argv)
  print(f'{args.model}, batch {args.batch}, {args.image_size}x'
        f'{args.image_size}, {args.dtype} compute; compiled memory (GiB)')
  print(f'{"remat":36s} {"resid.":>8s} {"temp":>8s} {"args":>8s} '
        f'{"out":>8s} {"peak":>8s} {"compile s":>10s}')
  for value in args.remat:
    r = measure(args.model, args.batch, args.image_size, value, args.dtype,
                compile_step=not args.no_compile)
    if args.no_compile:
      print(f'{value:36s} {r["residual_gib"]:8.2f}', flush=True)
      continue
    print(f'{value:36s} {r["residual_gib"]:8.2f} {r["temp_gib"]:8.2f} '
          f'{r["argument_gib"]:8.2f} {r["output_gib"]:8.2f} '
          f'{r["peak_gib"]:8.2f} {r["compile_s"]:10.1f}  ({r["backend"]})',
          flush=True)


if __name__ == '__main__':
  main()
