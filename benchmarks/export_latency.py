"""Latency of the exported ghostnet_100 under each runtime, and file sizes.

Batch 1, 224x224 float32, this CPU, 1 and 2 threads. One set of weights for
every row: timm's ``ghostnet_100`` (its own random initialisation), saved as
a ``.pth`` and loaded by ``ghostnet_jax.export.prepare`` as a user's
checkpoint would be. Rows:

* Flax jit: the BatchNorm-folded deploy function under ``jax.jit`` with the
  default ``conv_impl`` (the package's CPU kernels);
* StableHLO reloaded: the ``.bin`` artifact through ``jax.export.deserialize``;
* ONNX Runtime (ours): the jax2onnx artifact;
* LiteRT fp32 / int8: the TFLite artifacts (int8: full-integer post-training
  quantization calibrated on random normal images; float input and output);
* PyTorch eager: timm's model, ``torch.inference_mode``;
* ONNX Runtime (torch.onnx.export): PyTorch's own ONNX export of the same
  model (the legacy TorchScript exporter, ``dynamo=False``: the dynamo
  exporter needs onnxscript, which is not installed), same runtime.

Threads: each thread count runs in its own child process pinned to that
many cores (``os.sched_setaffinity``; XLA sizes its CPU thread pool from
them), with ONNX Runtime (``intra_op_num_threads``), LiteRT (``num_threads``)
and PyTorch (``torch.set_num_threads``) set to the same count.

Each cell: 3 warm-up calls, then ``--repeats`` timed calls spread over
``--rounds`` rounds in which the rows take turns (a burst of load from
elsewhere hits every row, not one). The table shows the median and, in
brackets, the 25th-75th percentile in milliseconds.

  python benchmarks/export_latency.py [--repeats 30] [--json out.json]
  python benchmarks/export_latency.py --quick     # tiny smoke run (tests)

Needs the export extra, torch and timm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..'))

ROWS = ('Flax jit (BN folded)', 'StableHLO reloaded', 'ONNX Runtime (ours)',
        'LiteRT fp32', 'LiteRT int8', 'PyTorch eager',
        'ONNX Runtime (torch.onnx.export)')
WARMUP = 3


def stats(times_ms) -> dict:
  """Median and quartiles (ms) of the timed calls."""
  q25, med, q75 = np.percentile(times_ms, [25, 50, 75])
  return {'median_ms': float(med), 'q25_ms': float(q25), 'q75_ms': float(q75),
          'repeats': len(times_ms)}


def size_mb(path: str) -> float:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, fs in os.walk(path) for f in fs) / 1e6
  return os.path.getsize(path) / 1e6


def _input(image_size: int) -> np.ndarray:
  """The timed batch, ``(1, S, S, 3)`` float32 NHWC."""
  return np.random.default_rng(0).standard_normal(
      (1, image_size, image_size, 3)).astype(np.float32)


# ------------------------------------------------- timing (pinned child)


def _runners(workdir: str, model: str, image_size: int, threads: int):
  """``{row: call}``: one batch-1 inference per call, ``threads`` threads."""
  import jax  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import export  # pylint: disable=g-import-not-at-top
  from ghostnet_jax.testing.torch_reference import import_timm  # pylint: disable=g-import-not-at-top
  weights = os.path.join(workdir, 'weights.pth')
  x = _input(image_size)
  x_nchw = x.transpose(0, 3, 1, 2).copy()

  ex = export.prepare(checkpoint=weights, model=model, batch=1,
                      image_size=image_size)
  flax_fn = jax.jit(ex.fn)
  shlo = export.load_stablehlo(os.path.join(workdir, 'model.bin'))

  def ort_call(name, feed):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(workdir, name), opts,
                                providers=['CPUExecutionProvider'])
    inp = sess.get_inputs()[0].name
    return lambda: sess.run(None, {inp: feed})

  def litert_call(name):
    interp = Interpreter(model_path=os.path.join(workdir, name),
                         num_threads=threads)
    interp.allocate_tensors()
    i = interp.get_input_details()[0]['index']
    o = interp.get_output_details()[0]['index']

    def run():
      interp.set_tensor(i, x)
      interp.invoke()
      return interp.get_tensor(o)
    return run

  torch.set_num_threads(threads)
  tm = import_timm().create_model(model, pretrained=False).eval()
  tm.load_state_dict(torch.load(weights, weights_only=True))
  xt = torch.from_numpy(x_nchw)

  def torch_run():
    with torch.inference_mode():
      return tm(xt)

  return {
      ROWS[0]: lambda: flax_fn(x).block_until_ready(),
      ROWS[1]: lambda: shlo(x).block_until_ready(),
      ROWS[2]: ort_call('model.onnx', x),
      ROWS[3]: litert_call('model.tflite'),
      ROWS[4]: litert_call('model_int8.tflite'),
      ROWS[5]: torch_run,
      ROWS[6]: ort_call('torch.onnx', x_nchw),
  }


def measure(workdir: str, model: str, image_size: int, threads: int,
            repeats: int, rounds: int) -> dict:
  """Times every row with this process pinned to ``threads`` cores.

  The rows take turns: ``rounds`` rounds, each timing every row for about
  ``repeats / rounds`` calls (the order rotates), so a burst of load from
  elsewhere spreads over all rows instead of hitting one.
  """
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  runners = _runners(workdir, model, image_size, threads)
  names = list(runners)
  for name in names:
    for _ in range(WARMUP):
      runners[name]()
  per_round = max(1, -(-repeats // rounds))
  samples = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn = runners[name]
      for _ in range(per_round):
        t = time.perf_counter()
        fn()
        samples[name].append(1e3 * (time.perf_counter() - t))
  return {name: stats(times) for name, times in samples.items()}


def _run_child(args, workdir: str, threads: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--child', workdir,
         '--model', args.model, '--image-size', str(args.image_size),
         '--repeats', str(args.repeats), '--rounds', str(args.rounds),
         '--threads', str(threads)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'Timing child ({threads} threads) failed:\n'
                       f'{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------- artifacts


def build_artifacts(args, workdir: str) -> dict:
  """Writes every artifact into ``workdir``; returns sizes and parity."""
  import torch  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import export  # pylint: disable=g-import-not-at-top
  from ghostnet_jax.testing.torch_reference import import_timm  # pylint: disable=g-import-not-at-top
  s = args.image_size
  torch.manual_seed(0)
  tm = import_timm().create_model(args.model, pretrained=False).eval()
  weights = os.path.join(workdir, 'weights.pth')
  torch.save(tm.state_dict(), weights)
  ex = export.prepare(checkpoint=weights, model=args.model, batch=1,
                      image_size=s)
  x = _input(s)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.inference_mode():
    torch_logits = tm(xt).numpy()
  # Same weights: timm's eager logits against the Flax eval model's.
  _, same_weights = export.relative_diff(ex.reference(x), torch_logits)

  paths = {'StableHLO (.bin)': 'model.bin', 'ONNX (ours)': 'model.onnx',
           'TFLite fp32': 'model.tflite'}
  fmts = {'StableHLO (.bin)': 'stablehlo', 'ONNX (ours)': 'onnx',
          'TFLite fp32': 'tflite'}
  parity = {}
  for key, name in paths.items():
    meta = export.export(ex, fmts[key], os.path.join(workdir, name))
    parity[key] = meta['parity']['max_abs_diff_over_max_logit']
  sm = os.path.join(workdir, 'saved_model')
  meta = export.export(ex, 'savedmodel', sm)
  parity['SavedModel (orbax-export)'] = meta['parity'][
      'max_abs_diff_over_max_logit']
  paths['SavedModel (orbax-export)'] = 'saved_model'
  calib = np.random.default_rng(1).standard_normal(
      (args.calibration, s, s, 3)).astype(np.float32)
  export.export_tflite(ex, os.path.join(workdir, 'model_int8.tflite'),
                       quantize='int8', calibration=calib)
  paths['TFLite int8'] = 'model_int8.tflite'
  torch.onnx.export(tm, (xt,), os.path.join(workdir, 'torch.onnx'),
                    input_names=['images'], output_names=['logits'],
                    opset_version=17, dynamo=False)
  paths['ONNX (torch.onnx.export)'] = 'torch.onnx'
  torch_onnx = export.run_onnx(os.path.join(workdir, 'torch.onnx'),
                               x.transpose(0, 3, 1, 2).copy())
  _, parity['ONNX (torch.onnx.export) vs PyTorch'] = export.relative_diff(
      torch_onnx, torch_logits)
  _, parity['TFLite int8 (quantized, no 1e-4 bound)'] = export.relative_diff(
      export.run_tflite(os.path.join(workdir, 'model_int8.tflite'), x),
      ex.reference(x))
  return {
      'sizes_mb': {k: size_mb(os.path.join(workdir, v))
                   for k, v in paths.items()},
      'parity': parity,
      'torch_vs_flax': same_weights,
  }


def format_table(result: dict) -> str:
  threads = result['threads']
  lines = ['| runtime | ' + ' | '.join(
      f'{t} thread{"s" if t > 1 else ""}: ms' for t in threads) + ' |',
           '|---|' + '---:|' * len(threads)]
  for row in ROWS:
    cells = []
    for t in threads:
      c = result['cells'][str(t)][row]
      cells.append(f"{c['median_ms']:.2f} ({c['q25_ms']:.2f}-"
                   f"{c['q75_ms']:.2f})")
    lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| artifact | MB |', '|---|---:|']
  lines += [f'| {k} | {v:.2f} |' for k, v in result['sizes_mb'].items()]
  lines += ['', '| parity: max abs diff / max abs logit vs Flax | |',
            '|---|---:|']
  lines += [f'| {k} | {v:.2g} |' for k, v in result['parity'].items()]
  lines.append(f"| PyTorch eager vs Flax (same weights) | "
               f"{result['torch_vs_flax']:.2g} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='ghostnet_100')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--threads', default='1,2')
  p.add_argument('--calibration', type=int, default=16,
                 help='int8 calibration images (random normal)')
  p.add_argument('--quick', action='store_true',
                 help='ghostnet_050 at 32x32, 3 repeats, 2 calibration '
                 'images: checks that every row runs')
  p.add_argument('--json', help='also write the results here')
  p.add_argument('--rounds', type=int, default=5,
                 help='the rows take turns this many times per thread count')
  p.add_argument('--child', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.child, args.model, args.image_size,
                             int(args.threads), args.repeats, args.rounds)))
    return 0
  if args.quick:
    args.model, args.image_size, args.repeats, args.rounds = (
        'ghostnet_050', 32, 3, 1)
    args.calibration = 2
  threads = [int(t) for t in args.threads.split(',')]
  load_start = os.getloadavg()[0]
  start = time.time()
  with tempfile.TemporaryDirectory(prefix='export-latency-') as workdir:
    built = build_artifacts(args, workdir)
    build_s = time.time() - start
    cells = {}
    for t in threads:
      cells[str(t)] = _run_child(args, workdir, t)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  result = {
      'model': args.model, 'batch': 1, 'image_size': args.image_size,
      'repeats': args.repeats, 'rounds': args.rounds, 'threads': threads, 'cells': cells,
      'sizes_mb': built['sizes_mb'], 'parity': built['parity'],
      'torch_vs_flax': built['torch_vs_flax'],
      'machine': {'cpu': platform.processor() or platform.machine(),
                  'cores': os.cpu_count(), 'load_start': load_start,
                  'load_end': os.getloadavg()[0]},
      'versions': {'jax': jax.__version__, 'torch': torch.__version__},
      'build_s': build_s, 'total_s': time.time() - start,
  }
  print(f"{args.model}, batch 1, {args.image_size}x{args.image_size} "
        f"float32; median ms (25th-75th percentile) of {args.repeats}+ calls "
        f"after {WARMUP} warm-up, rows taking turns in {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs; load average "
        f"{load_start:.2f} at the start, {result['machine']['load_end']:.2f} "
        f"at the end; artifacts built in {build_s:.0f} s, total "
        f"{result['total_s']:.0f} s")
  print(format_table(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
