"""Where a step's time goes, by op class: Flax (XLA:CPU) next to PyTorch.

    python benchmarks/op_profile.py --model ghostnet_100 --mode train --batch 32

Flax: the step as ``bench.py`` builds it (plain API), profiled with
``jax.profiler`` over ``--calls`` calls; every XLA:CPU thunk is classed by
what its HLO computes (a fusion: the ops of the computation it calls) and
its duration summed per class. PyTorch: the same step under
``torch.profiler``, each ATen op's self time classed by name and weight shape
(depthwise = one input channel per group). Both columns are op wall times
(an op may use both cores inside); *cores busy* is the process's CPU time
over wall time for the profiled calls. PyTorch's BatchNorm is one op (its
statistics and normalisation), XLA's normalisation lands in
``elementwise``.

Both sides run in this process one after the other (PyTorch first, so
XLA's thread pool does not compete with its OpenMP threads).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ('dense conv / matmul', 'depthwise conv', 'BN stats / reductions',
           'elementwise', 'copies / transposes', 'other')


def _hlo_index(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
  """``({instruction: its line}, {computation: its body})`` of a compiled
  module's text."""
  lines, bodies, current = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if head and not line.startswith(' '):
      current = head.group(1)
      bodies[current] = ''
      continue
    m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=', line)
    if m:
      lines[m.group(1)] = line
      if current is not None:
        bodies[current] += line + '\n'
  return lines, bodies


def xla_class(name: str, lines: dict[str, str], bodies: dict[str, str]
              ) -> str:
  """The class of the XLA:CPU thunk ``name`` (an HLO instruction), from
  what it computes (a fusion: the ops of the computation it calls)."""
  line = lines.get(name, '')
  called = re.search(r'calls=%?([\w.\-]+)', line)
  text = line + (bodies.get(called.group(1), '') if called else '')
  if 'custom-call' in text or name.startswith(('ffi_call', 'custom-call')):
    return 'depthwise conv'
  if ' convolution(' in text or ' dot(' in text:
    return 'dense conv / matmul'
  if ' reduce(' in text or ' reduce-window(' in text:
    return 'BN stats / reductions'
  if not text:
    return 'other'
  ops = set(re.findall(r'=\s*\S+\s+([\w\-]+)\(', text))
  if ops and ops <= {'copy', 'transpose', 'bitcast', 'parameter', 'slice',
                     'concatenate', 'reshape', 'tuple', 'get-tuple-element'}:
    return 'copies / transposes'
  return 'elementwise'


def profile_flax(name: str, mode: str, batch: int, image_size: int,
                 calls: int) -> dict:
  """Op ms per class per call, wall ms per call, thunks per call."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  kwargs = bench.INFERENCE_KWARGS.get(name, {}) if mode == 'infer' else {}
  model = ghostnet_jax.create_model(name, **kwargs)
  variables = bench.random_variables(model, image_size)
  x = jnp.ones((batch, image_size, image_size, 3), jnp.float32)
  if mode == 'infer':
    compiled = jax.jit(model.apply).lower(variables, x).compile()
    run = lambda: compiled(variables, x).block_until_ready()
  else:
    compiled, run, _ = bench.compiled_train_call(
        model, variables, x, jnp.zeros((batch,), jnp.int32))

  lines, bodies = _hlo_index(compiled.as_text())
  run()
  run()
  trace_dir = tempfile.mkdtemp(prefix='op_profile_')
  try:
    jax.profiler.start_trace(trace_dir)
    t, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
      run()
    wall = (time.perf_counter() - t) / calls
    busy = (time.process_time() - cpu0) / calls / wall
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                     recursive=True)[0]
    data = ProfileData.from_file(path)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  per_class = collections.Counter()
  thunks = 0
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLAEigen'):
        continue  # XLA:CPU's worker threads run the thunks
      for event in line.events:
        if event.name.startswith(('ThunkExecutor', 'end: ')):
          continue  # the executor's wrappers, completion markers
        per_class[xla_class(event.name, lines, bodies)] += (
            event.duration_ns / 1e6)
        thunks += 1
  return dict(wall_ms=wall * 1e3, ops=thunks / calls, cores_busy=busy,
              cpu_ms={k: v / calls for k, v in per_class.items()})


def torch_class(op: str, input_shapes) -> str:
  """The class of one ATen op, by name and (for convolutions) weight shape."""
  if 'conv' in op:
    weight = input_shapes[1] if len(input_shapes) > 1 else []
    depthwise = len(weight) == 4 and weight[1] == 1 and weight[0] > 1
    if op.endswith('convolution_backward'):
      weight = input_shapes[2] if len(input_shapes) > 2 else []
      depthwise = len(weight) == 4 and weight[1] == 1 and weight[0] > 1
    return 'depthwise conv' if depthwise else 'dense conv / matmul'
  if any(k in op for k in ('addmm', 'matmul', '::mm', 'linear', '::bmm')):
    return 'dense conv / matmul'
  if any(k in op for k in ('mean', 'sum', 'pool', 'max', 'batch_norm',
                           'var', 'nll', 'log_softmax', 'cross_entropy')):
    return 'BN stats / reductions'
  if any(k in op for k in ('copy', 'contiguous', 'clone', 'transpose',
                           'permute', 'cat', 'to_')):
    return 'copies / transposes'
  return 'elementwise'


def profile_torch(name: str, mode: str, batch: int, image_size: int,
                  calls: int, threads: int) -> dict:
  """Self ms per class per call (ops' wall time), wall ms per call."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import profiler  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  fmt = torch.channels_last
  model = bench.torch_model(name, mode).to(memory_format=fmt)
  x = torch.randn(batch, 3, image_size, image_size).contiguous(
      memory_format=fmt)
  labels = torch.zeros(batch, dtype=torch.long)
  run = bench.torch_step(model, x, labels, mode)
  run()
  run()
  t, cpu0 = time.perf_counter(), time.process_time()
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU],
                        record_shapes=True) as prof:
    for _ in range(calls):
      run()
  wall = (time.perf_counter() - t) / calls
  busy = (time.process_time() - cpu0) / calls / wall
  per_class = collections.Counter()
  ops = 0
  for evt in prof.key_averages(group_by_input_shape=True):
    if not evt.key.startswith('aten::') or evt.self_cpu_time_total <= 0:
      continue
    per_class[torch_class(evt.key, evt.input_shapes)] += (
        evt.self_cpu_time_total / 1e3)
    ops += evt.count
  return dict(wall_ms=wall * 1e3, ops=ops / calls, cores_busy=busy,
              cpu_ms={k: v / calls for k, v in per_class.items()})


def format_table(model: str, mode: str, batch: int, flax: dict,
                 torch_row: dict | None) -> str:
  rows = [f'{model} {mode} batch {batch}: ms per call',
          f'{"class":22s} {"Flax op":>9s} {"share":>6s}'
          + (f' {"PyTorch op":>10s} {"share":>6s}' if torch_row else '')]
  f_total = sum(flax['cpu_ms'].values())
  t_total = sum(torch_row['cpu_ms'].values()) if torch_row else 0
  for c in CLASSES:
    fv = flax['cpu_ms'].get(c, 0.0)
    row = f'{c:22s} {fv:9.1f} {fv / f_total:6.0%}'
    if torch_row:
      tv = torch_row['cpu_ms'].get(c, 0.0)
      row += f' {tv:10.1f} {tv / max(t_total, 1e-9):6.0%}'
    rows.append(row)
  rows.append(f'{"total":22s} {f_total:9.1f} {"":6s}'
              + (f' {t_total:10.1f}' if torch_row else ''))
  rows.append(f'{"wall":22s} {flax["wall_ms"]:9.1f} {"":6s}'
              + (f' {torch_row["wall_ms"]:10.1f}' if torch_row else ''))
  rows.append(f'Flax: {flax["cores_busy"]:.2f} cores busy, '
              f'{flax["ops"]:.0f} XLA thunks per call'
              + (f'; PyTorch: {torch_row["cores_busy"]:.2f} cores busy, '
                 f'{torch_row["ops"]:.0f} ATen ops per call'
                 if torch_row else ''))
  return '\n'.join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='ghostnet_100')
  p.add_argument('--mode', choices=('infer', 'train'), default='train')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--calls', type=int, default=3)
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--json', default=None, help='also write the numbers here')
  args = p.parse_args(argv)
  torch_row = None
  if not args.no_torch:
    torch_row = profile_torch(args.model, args.mode, args.batch,
                              args.image_size, args.calls,
                              bench.cpu_threads())
  flax = profile_flax(args.model, args.mode, args.batch, args.image_size,
                      args.calls)
  print(format_table(args.model, args.mode, args.batch, flax, torch_row))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(model=args.model, mode=args.mode, batch=args.batch,
                     flax=flax, torch=torch_row), f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
