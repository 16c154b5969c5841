"""The training step as an accelerator sees it: FLOPs, bytes, layout ops.

For each model this lowers the training step (forward, backward, SGD with
momentum; the same step as ``bench.py``) with the ``'lax'`` convolution
lowering, the one GPUs and TPUs use, and reports per image:

* the analytic FLOPs: ``count_macs`` x 2 (multiply + add) x 3 (forward, input
  gradient, weight gradient);
* XLA's cost analysis of the lowered (unoptimised, device-independent)
  module, ``jax.jit(step).lower(...).cost_analysis()``: FLOPs and bytes
  accessed with no fusion (every op reads its inputs and writes its output);
* XLA's cost analysis of the module compiled for this backend,
  ``.compile().cost_analysis()``: FLOPs and bytes after the backend's fusion
  and rewrites (on XLA:CPU, grouped convolutions are expanded to dense ones,
  which inflates FLOPs; on a GPU or TPU this column is the one to read);
* transposes in the lowered module and transposes / copies in the compiled
  one (alone or as the root of a fusion: the kernels that only move data),
  split into activation-sized ones (with the batch and two spatial sizes) and
  the rest (kernels, vectors), with what consumes the activation-sized ones;

and, from these, a roofline estimate of the step time and images/s of the
ImageNet configurations on a TPU v4-32 and on 8 A100s (``--scale``; the
assumptions are printed with the table and argued in BENCHMARKS.md).

Usage::

  python benchmarks/accelerator.py                      # 4 models, batch 8
  python benchmarks/accelerator.py --models ghostnet_100 --batch 16 --json -

Runs unchanged on CPU, GPU and TPU (the compiled column then describes that
backend). Compiling four training steps takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]

MODELS = ('ghostnet_100', 'ghostnetv2_100', 'ghostnetv3_100',
          'g_ghost_regnetx_032')

# name: (chips, peak bf16 FLOP/s per chip, HBM bytes/s per chip)
SYSTEMS = {
    'TPU v4-32': (16, 275e12, 1.2e12),
    '8x A100 (bf16)': (8, 312e12, 1.8e12),
    '8x A100 (fp32)': (8, 19.5e12, 1.8e12),
}
# ImageNet training configurations: model -> global batches.
CONFIGS = {
    'ghostnet_100': (1024,),
    'ghostnetv2_100': (1024,),
    'ghostnetv3_100': (1024,),
    'g_ghost_regnetx_032': (256, 1024),
}
# Roofline assumptions (BENCHMARKS.md): share of peak FLOP/s reached by the
# convolutions and matmuls, share of HBM bandwidth reached by the memory-bound
# ops, and how many bytes an activation takes relative to float32.
MFU = 0.40
BW_EFFICIENCY = 0.60
BYTES_SCALE = {'TPU v4-32': 0.5, '8x A100 (bf16)': 0.5, '8x A100 (fp32)': 1.0}


def _first(ca):
  return ca[0] if isinstance(ca, (list, tuple)) else ca


def _dims(shape_text: str) -> list[int]:
  m = re.search(r'\[([\d,]*)\]', shape_text) or re.search(
      r'tensor<([\dx]*)x?[a-z]', shape_text)
  if not m or not m.group(1):
    return []
  return [int(d) for d in re.split(r'[,x]', m.group(1)) if d]


def _is_activation(dims: list[int], batch: int, min_spatial: int = 7) -> bool:
  """An operand with the batch size and at least one spatial size >= 7."""
  return (batch in dims and len(dims) >= 3
          and sum(d >= min_spatial and d != batch for d in dims) >= 2)


def layout_ops(lowered_text: str, compiled_text: str, batch: int) -> dict:
  """Transposes / copies in both modules, activation-sized or not."""
  out = {}
  lowered = [line for line in lowered_text.splitlines()
             if 'stablehlo.transpose' in line]
  act = [line for line in lowered
         if _is_activation(_dims(line.rsplit('->', 1)[-1]), batch)]
  out['lowered_transposes'] = len(lowered)
  out['lowered_activation_transposes'] = len(act)
  counts = collections.Counter()
  sources = collections.Counter()
  entry = compiled_text[compiled_text.find('ENTRY'):]
  defs, users = {}, collections.defaultdict(list)
  for line in entry.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) (\w+)\((.*?)\)(?:,|$)', line)
    if m:
      defs[m.group(1)] = (m.group(2), m.group(3), line)
      for arg in re.findall(r'%([\w.\-]+)', m.group(4)):
        users[arg].append(m.group(1))

  def final_users(name, depth=0):
    """Users of ``name``, looking through copies, transposes, bitcasts."""
    found = []
    for u in users.get(name, ()):
      op = defs[u][1]
      if op in ('copy', 'transpose', 'bitcast') and depth < 4:
        found += final_users(u, depth + 1)
      else:
        found.append(u)
    return found

  for name, (shape, op, line) in defs.items():
    # A copy or transpose, alone or as the root of a fusion (XLA names a
    # fusion after its ops: transpose_copy_fusion, copy_bitcast_fusion).
    if op == 'fusion' and re.match(r'(transpose|copy)', name):
      op = re.match(r'(transpose|copy)', name).group(1)
    elif op not in ('transpose', 'copy'):
      continue
    sized = 'activation' if _is_activation(_dims(shape), batch) else 'other'
    counts[f'{op}_{sized}'] += 1
    if sized == 'activation':
      kinds = sorted({re.sub(r'\.\d+$', '', u) if defs[u][1] == 'fusion'
                      else defs[u][1] for u in final_users(name)})
      sources[f'{op} -> {"/".join(kinds) or "output"}'] += 1
  out['compiled'] = dict(counts)
  out['compiled_activation_sources'] = dict(sources.most_common(8))
  return out


def analyse(name: str, batch: int, image_size: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  from bench import make_train_step, random_variables  # pylint: disable=g-import-not-at-top

  model = ghostnet_jax.create_model(name, conv_impl='lax')
  variables = random_variables(model, image_size)
  tx = optax.sgd(0.01, momentum=0.9)
  params = variables['params']
  state = (params, variables['batch_stats'], tx.init(params),
           jnp.zeros((), jnp.int32))
  x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32)
  lowered = jax.jit(make_train_step(model, tx), donate_argnums=0).lower(
      state, x, labels)
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  lca, cca = _first(lowered.cost_analysis()), _first(compiled.cost_analysis())
  macs = ghostnet_jax.count_macs(name, image_size=image_size)
  n_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(
      params)))
  return dict(
      model=name, batch=batch, image_size=image_size, params=n_params,
      macs_per_image=macs, analytic_flops_per_image=6 * macs,
      lowered_flops_per_image=lca.get('flops', float('nan')) / batch,
      lowered_bytes_per_image=lca.get('bytes accessed', float('nan')) / batch,
      compiled_flops_per_image=cca.get('flops', float('nan')) / batch,
      compiled_bytes_per_image=cca.get('bytes accessed', float('nan')) / batch,
      backend=jax.default_backend(), compile_s=compile_s,
      **layout_ops(lowered.as_text(), compiled.as_text(), batch))


def scale(row: dict, bytes_key: str) -> list[dict]:
  """Roofline step time of the ImageNet configurations of ``row['model']``."""
  out = []
  for global_batch in CONFIGS.get(row['model'], ()):
    for system, (chips, peak, bw) in SYSTEMS.items():
      per_chip = global_batch / chips
      flops = row['analytic_flops_per_image'] * per_chip
      data = row[bytes_key] * per_chip * BYTES_SCALE[system]
      t_flops = flops / (peak * MFU)
      t_bytes = data / (bw * BW_EFFICIENCY)
      t = max(t_flops, t_bytes)
      out.append(dict(model=row['model'], global_batch=global_batch,
                      system=system, per_chip_batch=per_chip,
                      compute_ms=1e3 * t_flops, memory_ms=1e3 * t_bytes,
                      step_ms=1e3 * t, images_per_s=global_batch / t,
                      bound='memory' if t_bytes > t_flops else 'compute'))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default=','.join(MODELS))
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--bytes', choices=('compiled', 'lowered'),
                 default='compiled',
                 help='bytes per image used for the roofline estimate')
  p.add_argument('--json', default=None, help="path, or '-' for stdout")
  args = p.parse_args(argv)
  rows = [analyse(m, args.batch, args.image_size)
          for m in args.models.split(',') if m]
  bytes_key = f'{args.bytes}_bytes_per_image'
  estimates = [e for r in rows for e in scale(r, bytes_key)]
  if args.json == '-':
    print(json.dumps(dict(rows=rows, estimates=estimates), indent=1))
    return 0
  print(f'Training step, conv_impl=lax, batch {args.batch}, '
        f'{args.image_size}x{args.image_size}, backend {rows[0]["backend"]}; '
        'per image: GFLOP, GB accessed')
  print(f'{"model":<20} {"MMACs":>7} {"6xMACs":>7} {"lowered":>8} '
        f'{"compiled":>8} | {"GB low.":>7} {"GB comp.":>8} | '
        f'{"T low.":>6} {"T act.":>6} | compiled: transposes/copies '
        '(activation-sized)')
  for r in rows:
    c = r['compiled']
    print(f'{r["model"]:<20} {r["macs_per_image"] / 1e6:7.1f} '
          f'{r["analytic_flops_per_image"] / 1e9:7.2f} '
          f'{r["lowered_flops_per_image"] / 1e9:8.2f} '
          f'{r["compiled_flops_per_image"] / 1e9:8.2f} | '
          f'{r["lowered_bytes_per_image"] / 1e9:7.3f} '
          f'{r["compiled_bytes_per_image"] / 1e9:8.3f} | '
          f'{r["lowered_transposes"]:6d} '
          f'{r["lowered_activation_transposes"]:6d} | '
          f'{c.get("transpose_activation", 0)}+{c.get("transpose_other", 0)} '
          f'transposes, {c.get("copy_activation", 0)}+{c.get("copy_other", 0)}'
          ' copies')
    if r['compiled_activation_sources']:
      print(f'{"":<20} activation-sized, by consumer: '
            + ', '.join(f'{k} x{v}' for k, v in
                        r['compiled_activation_sources'].items()))
  print(f'\nRoofline estimate ({args.bytes} bytes; MFU {MFU:.0%} of peak, '
        f'{BW_EFFICIENCY:.0%} of HBM bandwidth; bf16 activations take half '
        'the bytes; step = max(compute, memory); gradient all-reduce and '
        'input pipeline not included)')
  print(f'{"model":<20} {"batch":>5} {"system":<16} {"per chip":>8} '
        f'{"compute ms":>10} {"memory ms":>9} {"step ms":>8} {"img/s":>9}')
  for e in estimates:
    print(f'{e["model"]:<20} {e["global_batch"]:>5} {e["system"]:<16} '
          f'{e["per_chip_batch"]:>8.0f} {e["compute_ms"]:>10.2f} '
          f'{e["memory_ms"]:>9.2f} {e["step_ms"]:>8.2f} '
          f'{e["images_per_s"]:>9.0f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(rows=rows, estimates=estimates), f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
