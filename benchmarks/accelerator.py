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

``--readiness`` needs no accelerator: for every family it exports
(``jax.export``, ``platforms=('tpu',)`` and ``('cuda',)``) the train and eval
steps exactly as ``train.py`` builds them (:func:`train_py_steps`) over a
``jax.sharding.AbstractMesh`` of 32 devices, ``mesh_shape=(8, 4)`` (data,
fsdp), with the default ``conv_impl``, and reports custom calls, host
callbacks, float64 and the lowered FLOPs and bytes per image next to the
analytic FLOPs. ``tests/test_accelerator_readiness.py`` asserts the same,
plus the shardings of every parameter and optimizer-state array::

  python benchmarks/accelerator.py --readiness --json readiness.json
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
sys.path.insert(0, REPO)

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


# ------------------------------------------------------------------------------
# Readiness: train.py's own steps exported for TPU and GPU from this host
# ------------------------------------------------------------------------------

# One case per family: (smallest registered variant, the config it trains
# with). Families without an ImageNet recipe use the default config.
READINESS_CASES = {
    'ghostnet': ('ghostnet_050', 'ghostnet_100_imagenet'),
    'ghostnetv2': ('ghostnetv2_100', 'ghostnetv2_100_imagenet'),
    'ghostnetv3': ('ghostnetv3_050', 'default'),
    'g_ghost': ('g_ghost_regnetx_002', 'g_ghost_regnetx_032_imagenet'),
    'ghost_resnet': ('ghost_resnet50_s4', 'default'),
}
READINESS_MESH = (8, 4)  # (data, fsdp): 32 devices
# Host callbacks (jax.pure_callback, io_callback, jax.debug.print) lower to a
# custom call whose target names a callback, or, on TPU, to send / recv ops
# marked as host transfers; infeed / outfeed also talk to the host.
_HOST_OPS = re.compile(r'stablehlo\.(send|recv|infeed|outfeed)\b|'
                       r'_xla_host_transfer')


def readiness_config(family: str, image_size: int = 64,
                     per_device_batch: int = 2):
  """The config of ``family``'s case, on a (8, 4) mesh at a small size."""
  import importlib  # pylint: disable=g-import-not-at-top
  model, module = READINESS_CASES[family]
  config = importlib.import_module(f'configs.{module}').get_config()
  config.model = model
  config.image_size = image_size
  devices = READINESS_MESH[0] * READINESS_MESH[1]
  config.batch_size = per_device_batch * devices
  config.eval_batch_size = per_device_batch * devices
  config.mesh_shape = READINESS_MESH
  return config


def train_py_steps(config, mesh, num_classes: int,
                   steps_per_epoch: int = 1000) -> dict:
  """The train and eval steps exactly as ``train_lib.train_and_evaluate``
  builds them (its own builders: ``RunLength``, ``build_model``,
  ``build_optimizer``, ``StateFactory``, ``compile_train_step`` and the
  evaluator's ``compiled_eval_step``), over ``mesh`` (a ``Mesh`` or an
  ``AbstractMesh`` with axes ``('data', 'fsdp')``).

  Returns:
    dict with ``model``, ``train_step`` and ``eval_step`` (the jitted
    functions), ``train_args`` / ``eval_args`` (abstract arguments:
    ``jax.ShapeDtypeStruct`` trees carrying the shardings train.py gives
    them) and ``state_sharding``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import evaluation  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import train_lib  # pylint: disable=g-import-not-at-top

  length = train_lib.RunLength.of(config, steps_per_epoch * config.batch_size)
  model = train_lib.build_model(config, num_classes, mesh.size)
  schedule, tx = train_lib.build_optimizer(config, length)
  factory = train_lib.StateFactory(config, model, tx, mesh)
  train_step = train_lib.compile_train_step(model, tx, schedule, config,
                                            num_classes, factory, mesh)
  eval_step = evaluation.compiled_eval_step(model, num_classes, mesh)
  abstract_state = factory.abstract_sharded()
  state_sharding = factory.sharding

  size, b, eb = config.image_size, config.batch_size, config.eval_batch_size
  batch_sharding = shd.batch_sharding(mesh)
  replicated = shd.replicated(mesh)

  def spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  train_batch = {'image': spec((b, size, size, 3), jnp.float32, batch_sharding),
                 'label': spec((b,), jnp.int32, batch_sharding)}
  eval_batch = {'image': spec((eb, size, size, 3), jnp.float32,
                              batch_sharding),
                'label': spec((eb,), jnp.int32, batch_sharding),
                'mask': spec((eb,), jnp.bool_, batch_sharding)}
  health = {'first_step': spec((), jnp.int32, replicated),
            'count': spec((), jnp.int32, replicated)}
  eval_vars = train_lib.eval_variables(abstract_state)
  return dict(model=model, train_step=train_step, eval_step=eval_step,
              train_args=(abstract_state, health, train_batch),
              eval_args=(eval_vars, eval_batch),
              state_sharding=state_sharding, abstract_state=abstract_state)


def module_problems(text: str) -> dict:
  """Custom calls, host callbacks and float64 in a StableHLO module's text."""
  custom = sorted(set(re.findall(
      r'(?:stablehlo\.)?custom_call\s*@([\w.$-]+)', text)))
  # Ops only: source locations (loc(...)) may name anything.
  code = re.sub(r'loc\((?:[^()]|\([^()]*\))*\)', '', text)
  callbacks = sorted({t for t in custom if 'callback' in t.lower()} |
                     {m.group(0) for m in _HOST_OPS.finditer(code)})
  f64 = len(re.findall(r'\bf64\b', text))
  convs = re.findall(r'stablehlo\.convolution.*?feature_group_count = (\d+)',
                     text)
  return dict(custom_calls=custom, callbacks=callbacks, f64_mentions=f64,
              convolutions=len(convs),
              grouped_convolutions=sum(int(g) > 1 for g in convs))


def export_step(jitted, args, platform: str) -> dict:
  """``jax.export`` of ``jitted`` for ``platform``, with XLA's cost analysis.

  Returns:
    dict with the ``jax.export.Exported`` (``exported``), the module
    problems (:func:`module_problems`), the lowered ``flops`` and ``bytes``
    (XLA's cost analysis of the platform's lowering, before partitioning:
    the whole global batch) and ``seconds``.
  """
  from jax import export  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  exported = export.export(jitted, platforms=(platform,))(*args)
  seconds = time.perf_counter() - t
  lowered = jitted.trace(*args).lower(lowering_platforms=(platform,))
  ca = _first(lowered.cost_analysis()) or {}
  return dict(exported=exported, seconds=seconds,
              flops=ca.get('flops', float('nan')),
              bytes=ca.get('bytes accessed', float('nan')),
              **module_problems(exported.mlir_module()))


def readiness(family: str, platforms=('tpu', 'cuda'), image_size: int = 64,
              num_classes: int = 1000) -> dict:
  """Exports ``family``'s train.py steps for each platform; one report row.

  The mesh is a ``jax.sharding.AbstractMesh`` of ``READINESS_MESH`` (no
  devices needed); ``conv_impl`` is the config's (``'auto'``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import macs as macs_lib  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  config = readiness_config(family, image_size)
  mesh = jax.sharding.AbstractMesh(
      READINESS_MESH, shd.MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * 2)
  steps = train_py_steps(config, mesh, num_classes)
  macs = macs_lib.count_macs(config.model, image_size=image_size,
                             num_classes=num_classes)
  row = dict(family=family, model=config.model, config=READINESS_CASES[
      family][1], conv_impl=config.conv_impl, dtype=config.dtype,
             image_size=image_size, mesh_shape=READINESS_MESH,
             batch=config.batch_size, macs_per_image=macs, steps={},
             _steps=steps, _mesh=mesh)
  for kind, analytic in (('train', 6 * macs), ('eval', 2 * macs)):
    jitted, args = steps[f'{kind}_step'], steps[f'{kind}_args']
    batch = args[-1]['image'].shape[0]
    for platform in platforms:
      r = export_step(jitted, args, platform)
      row['steps'][(kind, platform)] = dict(
          r, analytic_flops_per_image=analytic,
          flops_per_image=r['flops'] / batch,
          bytes_per_image=r['bytes'] / batch)
  return row


def print_readiness(rows: list[dict]) -> None:
  print(f'jax.export of train.py\'s steps, AbstractMesh {READINESS_MESH} '
        '(data, fsdp) = 32 devices, default conv_impl; per image: GFLOP '
        '(analytic = 2 x MACs forward, 6 x MACs train), GB accessed '
        '(XLA cost analysis of the lowered module, no fusion)')
  print(f'{"model":<20} {"step":<5} {"platform":<8} {"analytic":>8} '
        f'{"lowered":>8} {"GB":>7} | custom calls / callbacks / f64')
  for row in rows:
    for (kind, platform), r in row['steps'].items():
      print(f'{row["model"]:<20} {kind:<5} {platform:<8} '
            f'{r["analytic_flops_per_image"] / 1e9:8.3f} '
            f'{r["flops_per_image"] / 1e9:8.3f} '
            f'{r["bytes_per_image"] / 1e9:7.3f} | '
            f'{len(r["custom_calls"])} / {len(r["callbacks"])} / '
            f'{r["f64_mentions"]}')


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
  p.add_argument('--readiness', action='store_true',
                 help="export train.py's train and eval steps of every "
                 'family for TPU and GPU on an abstract (8, 4) mesh and '
                 'report custom calls, callbacks, float64, FLOPs and bytes')
  args = p.parse_args(argv)
  if args.readiness:
    rows = [readiness(f, image_size=min(args.image_size, 64))
            for f in READINESS_CASES]
    print_readiness(rows)
    if args.json:
      keep = ('flops_per_image', 'bytes_per_image', 'analytic_flops_per_image',
              'custom_calls', 'callbacks', 'f64_mentions', 'convolutions',
              'grouped_convolutions', 'seconds')
      out = [dict({k: v for k, v in r.items() if not k.startswith('_')
                   and k != 'steps'},
                  steps={f'{k}/{p}': {f: v[f] for f in keep}
                         for (k, p), v in r['steps'].items()}) for r in rows]
      with open(args.json, 'w') as f:
        json.dump(out, f, indent=1)
    return 0
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
