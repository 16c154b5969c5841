"""Latency of the exported ghostnet_100 under each runtime, and file sizes.

Batch 1, 224x224, this CPU, 1 and 2 threads: the Flax model under jit, the
reloaded StableHLO artifact, our ONNX under ONNX Runtime, LiteRT fp32 and
int8, PyTorch eager (timm's ghostnet_100, same architecture, its own random
weights) and
PyTorch's own ONNX export under the same ONNX Runtime. Prints a table of
median milliseconds and artifact sizes.

  python benchmarks/export_latency.py [--repeats 30] [--image-size 224]

Thread counts: ONNX Runtime and LiteRT take them per session; XLA:CPU and
PyTorch are set with their process-wide knobs (torch.set_num_threads; XLA
uses its own pool, reported as is). Needs the export extra and timm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from ghostnet_jax import export  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def _size_mb(path: str) -> float:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, fs in os.walk(path) for f in fs) / 1e6
  return os.path.getsize(path) / 1e6


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--model', default='ghostnet_100')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--threads', default='1,2')
  p.add_argument('--no-torch', action='store_true')
  args = p.parse_args(argv)
  threads = [int(t) for t in args.threads.split(',')]
  s = args.image_size
  ex = export.prepare(model=args.model, batch=1, image_size=s)
  x = ex.parity_batch()
  tmp = tempfile.mkdtemp(prefix='export-latency-')
  paths = {
      'stablehlo': os.path.join(tmp, 'm.bin'),
      'onnx': os.path.join(tmp, 'm.onnx'),
      'tflite': os.path.join(tmp, 'm.tflite'),
  }
  for fmt, path in paths.items():
    export.export(ex, fmt, path)
  int8 = os.path.join(tmp, 'm_int8.tflite')
  calib = np.random.default_rng(0).standard_normal(
      (16, s, s, 3)).astype(np.float32)
  export.export_tflite(ex, int8, quantize='int8', calibration=calib)
  sizes = {k: _size_mb(v) for k, v in paths.items()}
  sizes['tflite int8'] = _size_mb(int8)

  flax_fn = jax.jit(ex.fn)
  shlo = export.load_stablehlo(paths['stablehlo'])
  rows = {}
  rows['Flax jit (BN folded)'] = lambda t: _median_ms(
      lambda: flax_fn(x).block_until_ready(), args.repeats)
  rows['StableHLO reloaded'] = lambda t: _median_ms(
      lambda: shlo(x).block_until_ready(), args.repeats)

  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

  def ort_ms(path, t):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = t
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts,
                                providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return _median_ms(lambda: sess.run(None, {name: x}), args.repeats)

  def litert_ms(path, t):
    interp = Interpreter(model_path=path, num_threads=t)
    interp.allocate_tensors()
    i = interp.get_input_details()[0]['index']

    def run():
      interp.set_tensor(i, x)
      interp.invoke()
    return _median_ms(run, args.repeats)

  rows['ONNX Runtime (ours)'] = lambda t: ort_ms(paths['onnx'], t)
  rows['LiteRT fp32'] = lambda t: litert_ms(paths['tflite'], t)
  rows['LiteRT int8'] = lambda t: litert_ms(int8, t)
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top
    tm = timm.create_model(args.model, pretrained=False).eval()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    torch_onnx = os.path.join(tmp, 'torch.onnx')
    torch.onnx.export(tm, (xt,), torch_onnx, input_names=['images'],
                      opset_version=17, dynamo=False)
    sizes['torch.onnx'] = _size_mb(torch_onnx)

    def torch_ms(t):
      torch.set_num_threads(t)
      with torch.inference_mode():
        return _median_ms(lambda: tm(xt), args.repeats)

    def torch_ort_ms(t):
      opts = ort.SessionOptions()
      opts.intra_op_num_threads = t
      sess = ort.InferenceSession(torch_onnx, opts,
                                  providers=['CPUExecutionProvider'])
      xn = x.transpose(0, 3, 1, 2).copy()
      return _median_ms(lambda: sess.run(None, {'images': xn}), args.repeats)

    rows['PyTorch eager'] = torch_ms
    rows['ONNX Runtime (torch.onnx.export)'] = torch_ort_ms

  print(f'{args.model}, batch 1, {s}x{s}, median ms over {args.repeats} '
        f'runs ({os.cpu_count()} CPUs)')
  print('| runtime | ' + ' | '.join(f'{t} thread(s)' for t in threads) + ' |')
  print('|---|' + '---|' * len(threads))
  for name, fn in rows.items():
    print(f'| {name} | ' + ' | '.join(f'{fn(t):.2f}' for t in threads) + ' |')
  print('\n| artifact | MB |\n|---|---|')
  for k, v in sizes.items():
    print(f'| {k} | {v:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
