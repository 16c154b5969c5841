"""Depthwise convolution speed on the CPU: JAX lowerings against PyTorch.

Prints one table, from one process run, of forward and forward+backward
(output, input gradient and weight gradient) times in milliseconds for
depthwise convolutions of GhostNet's shapes, float32, in:

* ``lax``: ``lax.conv_general_dilated(feature_group_count=C)``;
* ``xla``: :func:`ghostnet_jax.ops.depthwise_conv2d_xla` (shifted slices);
* ``ffi``: :func:`ghostnet_jax.kernels.depthwise_conv2d` (compiled kernels);
* ``torch``: ``nn.Conv2d(groups=C)`` in NCHW, and ``torch_cl`` in
  ``channels_last``, with ``torch.set_num_threads`` set to JAX's CPU threads.

Each time is the median of a few runs after a warm-up (budgeted per cell;
``lax``, 12-30x slower than the rest, is run once after compiling);
``ffi/cl`` is the torch channels_last time over ours (above 1: we are faster).
The machine is shared and noisy: compare ratios within one run, and repeat.
``--cpu-time`` reports the process CPU time per call instead of wall time
(less sensitive to other processes, but it counts spinning worker threads).

Usage::

  python benchmarks/depthwise.py            # about a minute on 2 idle cores
  python benchmarks/depthwise.py --quick    # smoke run, two small shapes
  python benchmarks/depthwise.py --no-lax   # skip the (slow) lax column
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from ghostnet_jax import kernels, ops

# (N, H, W, C, k, stride): depthwise convolutions of GhostNet's sizes at
# 224x224 (ghostnet_100 has (32,112,112,8) k3 s1 twice, as the cheap operation
# of its first ghost modules, and (32,56,56,72) k5 s2 in a bottleneck).
SHAPES = [
    (32, 112, 112, 16, 3, 1),
    (32, 112, 112, 8, 3, 1),
    (32, 56, 56, 48, 3, 2),
    (32, 56, 56, 72, 3, 1),
    (32, 56, 56, 72, 5, 2),
    (32, 28, 28, 120, 5, 1),
    (32, 14, 14, 480, 3, 1),
    (32, 7, 7, 960, 5, 1),
    (1, 112, 112, 16, 3, 1),
    (1, 56, 56, 72, 3, 1),
    (1, 14, 14, 480, 3, 1),
]
QUICK_SHAPES = [(4, 28, 28, 24, 3, 1), (2, 14, 14, 40, 5, 2)]


def jax_threads() -> int:
  """Threads of XLA:CPU's intra-op pool (one per core JAX can use)."""
  return len(os.sched_getaffinity(0))


CLOCK = time.perf_counter  # or time.process_time with --cpu-time


def timeit(fn, budget_s: float, max_reps: int, warmup: bool = True) -> float:
  """Median time of fn() in ms, over up to max_reps calls within budget_s."""
  if warmup:
    fn()
  time.sleep(0.02)  # let other threads' spin-waiting end
  times = []
  start = time.perf_counter()
  while not times or (len(times) < max_reps and
                      time.perf_counter() - start < budget_s):
    t = CLOCK()
    fn()
    times.append(CLOCK() - t)
  return 1e3 * float(np.median(times))


def jax_fns(name, strides, padding):
  """The depthwise convolution ``(x, w) -> y`` of one JAX lowering."""
  if name == 'lax':
    return lambda x, w: lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1])
  if name == 'xla':
    return lambda x, w: ops.depthwise_conv2d_xla(x, w, strides, padding)
  return lambda x, w: kernels.depthwise_conv2d(x, w, strides, padding)


def bench_jax(name, x, w, ct, strides, padding, budget_s, max_reps,
              warmup=True):
  f = jax_fns(name, strides, padding)

  def fwd_bwd(x, w, ct):
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(ct)

  fwd = jax.jit(f).lower(x, w).compile()
  fwd_bwd = jax.jit(fwd_bwd).lower(x, w, ct).compile()
  t_fwd = timeit(lambda: jax.block_until_ready(fwd(x, w)), budget_s, max_reps,
                 warmup)
  t_fb = timeit(lambda: jax.block_until_ready(fwd_bwd(x, w, ct)), budget_s,
                max_reps, warmup)
  return t_fwd, t_fb


def bench_torch(x_nhwc, w_hwio, ct_nhwc, k, stride, channels_last, budget_s,
                max_reps):
  import torch  # pylint: disable=g-import-not-at-top
  c = x_nhwc.shape[-1]
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  conv = torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.transpose(w_hwio, (3, 2, 0, 1))))
  conv = conv.to(memory_format=fmt)
  x = torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2))).contiguous(
      memory_format=fmt).requires_grad_()
  ct = torch.from_numpy(np.transpose(ct_nhwc, (0, 3, 1, 2))).contiguous(
      memory_format=fmt)

  def fwd():
    with torch.no_grad():
      return conv(x)

  def fwd_bwd():
    x.grad = None
    conv.weight.grad = None
    y = conv(x)
    y.backward(ct)
    return y

  return (timeit(fwd, budget_s, max_reps), timeit(fwd_bwd, budget_s, max_reps))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: two small shapes, one run each')
  parser.add_argument('--no-lax', action='store_true',
                      help='skip lax.conv (12-30x slower than the others)')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--cpu-time', action='store_true',
                      help='report process CPU time instead of wall time')
  args = parser.parse_args(argv)
  global CLOCK
  if args.cpu_time:
    CLOCK = time.process_time

  shapes = QUICK_SHAPES if args.quick else SHAPES
  budget_s, max_reps = (0.0, 1) if args.quick else (0.3, 5)
  threads = jax_threads()
  impls = (['xla', 'ffi'] if args.no_lax else ['lax', 'xla', 'ffi'])
  if not kernels.is_available():
    print(f'ffi kernels unavailable ({kernels.load_error()}); skipping them')
    impls.remove('ffi')
  torch_impls = []
  if not args.no_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(threads)
      torch_impls = ['torch', 'torch_cl']
    except ImportError:
      print('torch not installed; skipping it')
  cols = impls + torch_impls
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{threads} threads (XLA:CPU and torch), float32, '
        f'{"CPU" if args.cpu_time else "wall"} times in ms (median), '
        f'fwd = forward, f+b = forward + dx + dw')

  head = (f"{'N,H,W,C':>16} {'k':>2} {'s':>2} | " +
          ' '.join(f'{c + " fwd":>12}' for c in cols) + ' | ' +
          ' '.join(f'{c + " f+b":>12}' for c in cols))
  if 'ffi' in cols and 'torch_cl' in cols:
    head += f" | {'ffi/cl fwd':>10} {'ffi/cl f+b':>10}"
  print(head)
  print('-' * len(head))
  rng = np.random.RandomState(0)
  for n, h, w, c, k, s in shapes:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
    strides = (s, s)
    x_np = rng.randn(n, h, w, c).astype(np.float32)
    w_np = (rng.randn(k, k, 1, c) / k).astype(np.float32)
    ho = (h + 2 * (k // 2) - k) // s + 1
    wo = (w + 2 * (k // 2) - k) // s + 1
    ct_np = rng.randn(n, ho, wo, c).astype(np.float32)
    x, wj, ct = jnp.asarray(x_np), jnp.asarray(w_np), jnp.asarray(ct_np)
    res = {}
    for name in impls:
      slow = name == 'lax'
      res[name] = bench_jax(name, x, wj, ct, strides, padding,
                            0.0 if slow else budget_s,
                            1 if slow else max_reps, warmup=not slow)
    for name in torch_impls:
      res[name] = bench_torch(x_np, w_np, ct_np, k, s, name == 'torch_cl',
                              budget_s, max_reps)
    row = (f'{f"{n},{h},{w},{c}":>16} {k:>2} {s:>2} | ' +
           ' '.join(f'{res[c_][0]:12.2f}' for c_ in cols) + ' | ' +
           ' '.join(f'{res[c_][1]:12.2f}' for c_ in cols))
    if 'ffi' in cols and 'torch_cl' in cols:
      row += (f" | {res['torch_cl'][0] / res['ffi'][0]:10.2f}"
              f" {res['torch_cl'][1] / res['ffi'][1]:10.2f}")
    print(row, flush=True)


if __name__ == '__main__':
  main()
