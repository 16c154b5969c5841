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

``--tpu TOPOLOGY`` compiles for one chip of a TPU topology with libtpu
(``pip install libtpu==0.0.42.1``, the version that matches jax 0.10.2) on a
host without a TPU, and prints the TPU compiler's figures; a step that does
not fit the chip's HBM is reported as such.

Measured here (2-core CPU, g_ghost_regnetx_160, batch 256, bf16): residuals
58.79 GiB without remat, 4.41 GiB with 'blocks' (and with
'dots_with_no_batch_dims_saveable', which saves no convolution); XLA:CPU
compiled peak 45.06 vs 45.31 GiB. For TPU (2026-12-01, libtpu 0.0.42.1):
v5e (``--tpu v5e:2x2``) without remat does not fit (temporaries 16.04 GiB >
15.75 GiB HBM), with 'blocks' or the dots policy peak 6.79 GiB (temporaries
6.79, arguments 0.39, outputs 0.24); v4 (``--tpu v4:2x2x1``) 15.84 > 15.25
GiB without, 6.79 GiB with. Each TPU compile took 4-5 minutes here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tpu_device(topology: str):
  """Device 0 of a TPU ``topology`` (e.g. ``'v5e:2x2'``, ``'v4:2x2x1'``),
  described by libtpu without a TPU: enough to compile for it (deviceless
  ahead-of-time compilation; ``pip install libtpu``, the ``tpu`` extra)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(topology, platform='tpu').devices[0]


def measure(model_name: str, batch: int, image_size: int, remat_value: str,
            dtype: str, compile_step: bool = True,
            tpu_topology: str | None = None) -> dict:
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
  args = (variables['params'], variables['batch_stats'], opt_state, x, y)
  backend = jax.default_backend()
  if tpu_topology:  # one chip of the topology, compiled by libtpu
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    chip = tpu_device(tpu_topology)
    on_chip = NamedSharding(Mesh(np.array([chip]), ('chip',)),
                            PartitionSpec())
    args = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip),
        args)
    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).trace(*args).lower(
        lowering_platforms=('tpu',))
    backend = f'tpu {tpu_topology}, {chip.device_kind}'
  else:
    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler checks the HBM
    if 'Ran out of memory' not in str(e):
      raise
    return {'remat': remat_value, 'residual_gib': residual_bytes / 2.0 ** 30,
            'oom': str(e).split('RESOURCE_EXHAUSTED: ')[-1].split('\n')[0],
            'backend': backend}
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
      'backend': backend,
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='g_ghost_regnetx_160')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--no-compile', action='store_true',
                 help='only the residuals (no compilation)')
  p.add_argument('--tpu', default=None, metavar='TOPOLOGY',
                 help="compile for one chip of a TPU topology (e.g. 'v5e:2x2') "
                 'with libtpu, without a TPU (pip install libtpu)')
  p.add_argument('--remat', nargs='+',
                 default=['none', 'blocks', 'dots_with_no_batch_dims_saveable'])
  args = p.parse_args(argv)
  print(f'{args.model}, batch {args.batch}, {args.image_size}x'
        f'{args.image_size}, {args.dtype} compute; compiled memory (GiB)')
  print(f'{"remat":36s} {"resid.":>8s} {"temp":>8s} {"args":>8s} '
        f'{"out":>8s} {"peak":>8s} {"compile s":>10s}')
  for value in args.remat:
    r = measure(args.model, args.batch, args.image_size, value, args.dtype,
                compile_step=not args.no_compile, tpu_topology=args.tpu)
    if args.no_compile:
      print(f'{value:36s} {r["residual_gib"]:8.2f}', flush=True)
      continue
    if 'oom' in r:
      print(f'{value:36s} {r["residual_gib"]:8.2f}  does not fit: {r["oom"]} '
            f'({r["backend"]})', flush=True)
      continue
    print(f'{value:36s} {r["residual_gib"]:8.2f} {r["temp_gib"]:8.2f} '
          f'{r["argument_gib"]:8.2f} {r["output_gib"]:8.2f} '
          f'{r["peak_gib"]:8.2f} {r["compile_s"]:10.1f}  ({r["backend"]})',
          flush=True)


if __name__ == '__main__':
  main()
