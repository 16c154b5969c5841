"""Whole-model speed: the Flax GhostNets against their PyTorch references.

One command prints one table. For every model and batch size (224x224,
float32) it measures

* Flax inference images/s (``model.apply(..., train=False)`` under ``jit``;
  ``--fold`` folds BatchNorm into the convolutions first with
  :mod:`ghostnet_jax.inference`) and training-step images/s (forward, backward, optax SGD with momentum,
  BatchNorm statistics, dropout; the state is donated),
* the same for the PyTorch reference in NCHW and in ``channels_last``; the
  better layout is the baseline (timm's models; for G-Ghost the test reference
  ``ghostnet_jax/testing/g_ghost_reference.py``), with ``torch.set_num_threads`` equal to the
  number of cores XLA uses,
* the ratio Flax / PyTorch (above 1: Flax is faster),
* the Flax compile time (``lower`` + ``compile``, wall seconds) of the
  inference function and of the training step,
* peak memory of a call: for Flax the bytes of XLA's buffers for one call
  beyond its arguments (``compiled.memory_analysis()``: temporaries + outputs
  - outputs aliased to donated arguments; on any backend), for PyTorch the
  rise of the process's peak resident set (``VmHWM``, reset before the first
  call) over its resident set before the first call. Both leave out the
  parameters and inputs that exist before the call.

Each (model, batch, framework, mode) cell runs in a fresh subprocess, so
compilation, allocator caches and earlier cells do not leak into its memory or
its timing; the parent prints the table. Times are the median wall time of
``--reps`` calls (at least ``--min-time`` seconds of calls) after one warm-up
call; the JSON output also has the median process CPU time per call, which is
less sensitive to other processes on a shared machine.

``ghostnetv3_100`` runs inference in its deploy form (``deploy=True``, the
re-parameterised single-branch network; PyTorch: timm's
``convert_to_deploy()``) and trains in its training form (the multi-branch
network one trains).

**Plain by default.** Each side runs as a user gets it: the Flax worker
does ``import ghostnet_jax``, ``create_model`` and ``jax.jit(model.apply)``
with no environment variables and no :mod:`ghostnet_jax.runtime` calls (what
``import ghostnet_jax`` does by itself, it does here too); the PyTorch worker
runs timm's model with ``torch.set_num_threads``. ``--tuned`` measures with
the extra settings instead: :func:`ghostnet_jax.runtime.tune_malloc` called
explicitly in both frameworks' workers before they start, and the package's
opt-in XLA:CPU flags (``GHOSTNET_JAX_XLA_FLAGS=1``) for Flax. Every cell is run
``--repeats`` times, each time in a fresh process; the table shows the
median images/s and the ratio of the medians, and the spread (min-max of the
per-repetition ratios, Flax and PyTorch repetitions paired in run order).

Device-agnostic: on GPU/TPU the Flax cells run on the default device (and
``conv_impl='auto'`` picks ``lax``); pass ``--no-torch`` where the PyTorch
references are not wanted (they run on the CPU).

Usage::

  python benchmarks/bench.py                          # everything (~20 min)
  python benchmarks/bench.py --models ghostnet_100 --batch 1,32
  python benchmarks/bench.py --quick                  # CI smoke run, tiny
  python benchmarks/bench.py --json results.json      # also write JSON
  python benchmarks/bench.py --no-torch               # Flax only (GPU/TPU)
  python benchmarks/bench.py --tuned                  # with runtime settings
  python benchmarks/bench.py --repeats 5              # more repetitions
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's package and test references, before any installed copy.
sys.path.insert(0, REPO)

MODELS = ('ghostnet_100', 'ghostnetv2_100', 'ghostnetv3_100',
          'g_ghost_regnetx_032')
BATCHES = (1, 8, 32)
# Create-model keyword arguments of the inference form, per model.
INFERENCE_KWARGS = {'ghostnetv3_100': {'deploy': True}}
# The smoke run: tiny, one process, one PyTorch thread (OpenMP spin-waiting
# on a busy CI machine costs more than the work), and XLA's backend
# optimisation level 0 (compiles the training step in about half the time;
# the numbers of a --quick run mean nothing anyway).
QUICK = dict(models=('ghostnet_050',), batches=(2,), image_size=32, reps=1,
             min_time=0.0, threads=1,
             compiler_options={'xla_backend_optimization_level': 0})


# ---------------------------------------------------------------------------
# Measurement helpers (used in the workers).
# ---------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current resident set (Linux >= 4.0)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


class PeakRss:
  """Rise of the peak resident set over the resident set at ``start()``."""

  def start(self):
    self.ok = _reset_peak_rss()
    self.before = _proc_status_kb('VmRSS')

  def mb(self) -> float | None:
    peak = _proc_status_kb('VmHWM')
    if not self.ok or peak is None or self.before is None:
      return None
    return max(0, peak - self.before) / 1024


def time_calls(fn, reps: int, min_time: float) -> dict:
  """Median wall and CPU seconds per ``fn()`` call, after one warm-up call."""
  fn()
  walls, cpus = [], []
  start = time.perf_counter()
  while len(walls) < reps or time.perf_counter() - start < min_time:
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
    if len(walls) >= 1000:
      break
  walls.sort()
  cpus.sort()
  return dict(wall_s=walls[len(walls) // 2], cpu_s=cpus[len(cpus) // 2],
              calls=len(walls))


def cpu_threads() -> int:
  """Cores this process may run on (XLA:CPU starts one thread per core)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Flax worker.
# ---------------------------------------------------------------------------


def make_train_step(model, tx):
  """The trainer's step (:func:`ghostnet_jax.train_lib.make_train_step`:
  forward with batch statistics and dropout, cross-entropy, backward, ``tx``
  update, metrics) as ``step(state, x, labels) -> (state, loss)`` with
  ``state = (params, batch_stats, opt_state, step)``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import train_lib  # pylint: disable=g-import-not-at-top
  step_fn = train_lib.make_train_step(
      model, tx, lambda step: jnp.zeros((), jnp.float32),
      num_classes=model.num_classes, label_smoothing=0.0, ema_decay=0.0,
      seed=0)

  def train_step(state, x, labels):
    params, batch_stats, opt_state, step = state
    new, metrics = step_fn(
        train_lib.TrainState(step=step, params=params,
                             batch_stats=batch_stats, opt_state=opt_state),
        {'image': x, 'label': labels})
    return ((new.params, new.batch_stats, new.opt_state, new.step),
            metrics['train_loss'])

  return train_step


def compiled_train_call(model, variables, x, labels,
                        compiler_options: dict | None = None):
  """``(compiled, call, compile_s)``: the training step (SGD with momentum,
  state donated) compiled for ``x`` / ``labels``, and ``call()`` running one
  step on its own state and waiting for the loss."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(0.01, momentum=0.9)
  params = variables['params']
  holder = [(params, variables['batch_stats'], tx.init(params),
             jnp.zeros((), jnp.int32))]
  fn = jax.jit(make_train_step(model, tx), donate_argnums=0)
  t = time.perf_counter()
  compiled = fn.lower(holder[0], x, labels).compile(compiler_options)
  compile_s = time.perf_counter() - t

  def call():
    holder[0], loss = compiled(holder[0], x, labels)
    loss.block_until_ready()

  return compiled, call, compile_s


def random_variables(model, image_size: int, seed: int = 0) -> dict:
  """The model's variables filled with numpy random numbers, without running
  its initialisers (speed does not depend on the values); see
  ``ghostnet_jax.testing.torch_reference``'s ``random_flax_variables``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ghostnet_jax.testing.torch_reference import random_flax_variables  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return random_flax_variables(model, x, seed=seed, train=False)


def _memory_mb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes) / 2**20
  except Exception:  # pylint: disable=broad-except
    return None


def flax_worker(name: str, batch: int, mode: str, image_size: int, reps: int,
                min_time: float, conv_impl: str,
                compiler_options: dict | None = None,
                fold: bool = False, dtype: str | None = None) -> dict:
  """Compiles and times one Flax cell; returns its measurements.

  ``dtype``: the model's computation dtype (``'bfloat16'``; parameters stay
  float32); None keeps the model's default (float32).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import inference, ops  # pylint: disable=g-import-not-at-top

  kwargs = dict(conv_impl=conv_impl)
  if dtype is not None:
    kwargs['dtype'] = jnp.dtype(dtype)
  if mode == 'infer':
    kwargs.update(INFERENCE_KWARGS.get(name, {}))
  model = ghostnet_jax.create_model(name, **kwargs)
  variables = random_variables(model, image_size)
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(batch, image_size, image_size, 3), jnp.float32)
  labels = jnp.asarray(rs.randint(0, 1000, batch), jnp.int32)
  rss = PeakRss()
  out = dict(impl=ops.resolve_impl(conv_impl), backend=jax.default_backend(),
             device=str(jax.devices()[0].device_kind))

  if mode == 'infer':
    # --fold: BatchNorm folded into the convolutions once, outside jit
    # (ghostnet_jax.inference); by default the plain apply, which XLA:CPU
    # schedules better (BENCHMARKS.md).
    paths = frozenset()
    if fold:
      variables, paths = inference.fold_batchnorm(model, variables)
    fn = jax.jit(lambda v, x: inference.folded_apply(model, v, paths, x))
    out['folded_batchnorms'] = len(paths)
    t = time.perf_counter()
    compiled = fn.lower(variables, x).compile(compiler_options)
    out['compile_s'] = time.perf_counter() - t
    rss.start()
    timing = time_calls(lambda: compiled(variables, x).block_until_ready(),
                        reps, min_time)
  else:
    compiled, call, out['compile_s'] = compiled_train_call(
        model, variables, x, labels, compiler_options)
    rss.start()
    timing = time_calls(call, reps, min_time)
  out.update(timing)
  out['images_per_s'] = batch / timing['wall_s']
  out['memory_mb'] = _memory_mb(compiled)
  out['rss_rise_mb'] = rss.mb()
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      out['device_peak_mb'] = stats['peak_bytes_in_use'] / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def first_logits_worker(name: str, batch: int, image_size: int) -> dict:
  """Time to first logits through the plain API, in a fresh process.

  ``import ghostnet_jax``, ``create_model(name)``, ``init_variables(model,
  rng=0)``, then the first ``jax.jit(model.apply)(variables, x)`` (trace,
  compile, run), each in wall seconds, and their total.
  """
  t0 = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  t1 = time.perf_counter()
  model = ghostnet_jax.create_model(name)
  t2 = time.perf_counter()
  variables = ghostnet_jax.init_variables(model, rng=0)
  jax.block_until_ready(variables)
  t3 = time.perf_counter()
  x = np.zeros((batch, image_size, image_size, 3), np.float32)
  logits = jax.jit(model.apply)(variables, x)
  logits.block_until_ready()
  t4 = time.perf_counter()
  return dict(import_s=t1 - t0, create_s=t2 - t1, init_s=t3 - t2,
              first_logits_s=t4 - t3, total_s=t4 - t1,
              backend=jax.default_backend())


# ---------------------------------------------------------------------------
# PyTorch worker.
# ---------------------------------------------------------------------------


def torch_model(name: str, mode: str):
  """The PyTorch reference of ``name`` (random weights)."""
  if name.startswith('g_ghost'):
    from ghostnet_jax.testing import g_ghost_reference  # pylint: disable=g-import-not-at-top
    return g_ghost_reference.build(name)
  from ghostnet_jax.testing.torch_reference import import_timm  # pylint: disable=g-import-not-at-top
  model = import_timm().create_model(name, pretrained=False)
  if mode == 'infer' and INFERENCE_KWARGS.get(name, {}).get('deploy'):
    model.convert_to_deploy()
  return model


def torch_step(model, x, labels, mode: str):
  """``call()`` running one PyTorch cell's work on ``model``: the forward
  under ``inference_mode`` (``'infer'``), or a training step: forward,
  cross-entropy, backward, SGD with momentum."""
  import torch  # pylint: disable=g-import-not-at-top
  if mode == 'infer':
    model.eval()

    def call():
      with torch.inference_mode():
        model(x)
  else:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def call():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), labels)
      loss.backward()
      opt.step()

  return call


def torch_worker(name: str, batch: int, mode: str, layout: str,
                 image_size: int, reps: int, min_time: float,
                 threads: int) -> dict:
  """Times one PyTorch cell; returns its measurements."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  fmt = (torch.channels_last if layout == 'channels_last'
         else torch.contiguous_format)
  model = torch_model(name, mode).to(memory_format=fmt)
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(batch, 3, image_size, image_size, generator=gen).contiguous(
      memory_format=fmt)
  labels = torch.randint(0, 1000, (batch,), generator=gen)
  rss = PeakRss()
  call = torch_step(model, x, labels, mode)
  rss.start()
  timing = time_calls(call, reps, min_time)
  out = dict(timing, images_per_s=batch / timing['wall_s'],
             rss_rise_mb=rss.mb(), threads=torch.get_num_threads())
  out['memory_mb'] = out['rss_rise_mb']
  return out


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


def _worker_main(args) -> None:
  spec = json.loads(args.worker)
  if spec.pop('tuned'):
    # Before JAX or PyTorch start their threads (see ghostnet_jax.runtime);
    # the package's opt-in XLA:CPU flags apply when it is first imported.
    os.environ['GHOSTNET_JAX_XLA_FLAGS'] = '1'
    from ghostnet_jax import runtime  # pylint: disable=g-import-not-at-top
    runtime.tune_malloc()
  kind = spec.pop('kind')
  try:
    if kind == 'flax':
      result = flax_worker(**spec)
    elif kind == 'first':
      result = first_logits_worker(**spec)
    else:
      result = torch_worker(**spec)
  except Exception as e:  # pylint: disable=broad-except
    result = dict(error=f'{type(e).__name__}: {e}')
  print('RESULT ' + json.dumps(result), flush=True)


def run_cell_here(spec: dict) -> dict:
  """Runs one cell in this process (``--in-process``)."""
  spec = dict(spec)
  spec.pop('tuned')
  kind = spec.pop('kind')
  try:
    return flax_worker(**spec) if kind == 'flax' else torch_worker(**spec)
  except Exception as e:  # pylint: disable=broad-except
    return dict(error=f'{type(e).__name__}: {e}')


def run_cell(spec: dict, timeout: float, in_process: bool = False) -> dict:
  """Runs one cell in a fresh Python process; returns its result dict."""
  if in_process:
    return run_cell_here(spec)
  cmd = [sys.executable, os.path.abspath(__file__), '--worker',
         json.dumps(spec)]
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(error=f'timed out after {timeout:.0f} s')
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return dict(error=f'worker exited {proc.returncode}: ' + ' | '.join(tail))


def run_repeated(spec: dict, repeats: int, timeout: float,
                 in_process: bool = False) -> dict:
  """``run_cell`` ``repeats`` times; the median run, with the spread.

  Returns the run with the median images/s (all its fields) plus
  ``images_per_s_min`` / ``images_per_s_max``, ``repeats`` and ``runs``
  (every run's images/s, in run order; None for a failed run). When every
  run failed, the first run's error.
  """
  runs = [run_cell(spec, timeout, in_process) for _ in range(max(repeats, 1))]
  good = [r for r in runs if 'images_per_s' in r]
  if not good:
    return runs[0]
  good.sort(key=lambda r: r['images_per_s'])
  out = dict(good[(len(good) - 1) // 2])
  out.update(images_per_s_min=good[0]['images_per_s'],
             images_per_s_max=good[-1]['images_per_s'], repeats=len(runs),
             runs=[r.get('images_per_s') for r in runs])
  return out


def machine_info() -> dict:
  info = dict(platform=platform.platform(), python=platform.python_version(),
              cores=cpu_threads())
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        info['cpu'] = line.split(':', 1)[1].strip()
  except OSError:
    pass
  mem = None
  try:
    with open('/proc/meminfo') as f:
      mem = int(f.readline().split()[1]) / 2**20
  except OSError:
    pass
  info['memory_gib'] = mem
  try:
    info['loadavg_start'] = os.getloadavg()
  except OSError:
    pass
  return info


def versions(torch_wanted: bool) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  # No jax.devices() here: the parent must not claim an accelerator that
  # the workers need.
  v = dict(jax=jax.__version__, jaxlib=jaxlib.__version__,
           flax=flax.__version__, optax=optax.__version__)
  if torch_wanted:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      v['torch'] = torch.__version__
      from ghostnet_jax.testing.torch_reference import import_timm  # pylint: disable=g-import-not-at-top
      v['timm'] = import_timm().__version__
    except ImportError:
      pass
  return v


def _fmt(v, spec='.1f', width=7):
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return f'{"-":>{width}}'
  return f'{v:{width}{spec}}'


def summarize(row: dict) -> dict:
  """Adds the best PyTorch layout and the ratios to a row of cells."""
  for mode in ('infer', 'train'):
    flax = row.get(f'flax_{mode}', {})
    best = None
    for layout in ('nchw', 'channels_last'):
      cell = row.get(f'torch_{mode}_{layout}')
      if cell and 'images_per_s' in cell and (
          best is None or cell['images_per_s'] > best[1]['images_per_s']):
        best = (layout, cell)
    if best:
      row[f'torch_{mode}_best_layout'] = best[0]
      row[f'torch_{mode}_images_per_s'] = best[1]['images_per_s']
      row[f'torch_{mode}_memory_mb'] = best[1].get('memory_mb')
      if 'images_per_s' in flax:
        row[f'{mode}_ratio'] = flax['images_per_s'] / best[1]['images_per_s']
        pairs = [f / t for f, t in zip(flax.get('runs', ()),
                                       best[1].get('runs', ())) if f and t]
        if pairs:
          row[f'{mode}_ratio_min'] = min(pairs)
          row[f'{mode}_ratio_max'] = max(pairs)
  return row


HEADER = (
    f'{"model":<20} {"batch":>5} | {"inference img/s":^40} | '
    f'{"training step img/s":^40} | {"compile s":^13} | '
    f'{"peak MB flax/torch":^27}\n'
    f'{"":<20} {"":>5} | {"flax":>7} {"torch":>7} {"":>4} {"x":>6} '
    f'{"spread":>11} | '
    f'{"flax":>7} {"torch":>7} {"":>4} {"x":>6} {"spread":>11} | '
    f'{"inf":>6} {"train":>6} | '
    f'{"inf":>13} {"train":>13}')
LAYOUT_TAG = {'nchw': 'nchw', 'channels_last': 'cl'}


def format_row(row: dict) -> str:
  parts = [f'{row["model"]:<20} {row["batch"]:>5} |']
  for mode in ('infer', 'train'):
    flax = row.get(f'flax_{mode}', {})
    tag = LAYOUT_TAG.get(row.get(f'torch_{mode}_best_layout'), '')
    lo, hi = row.get(f'{mode}_ratio_min'), row.get(f'{mode}_ratio_max')
    spread = f'{lo:.2f}-{hi:.2f}' if lo is not None else '-'
    parts.append(f'{_fmt(flax.get("images_per_s"))} '
                 f'{_fmt(row.get(f"torch_{mode}_images_per_s"))} {tag:>4} '
                 f'{_fmt(row.get(f"{mode}_ratio"), ".2f", 6)} '
                 f'{spread:>11} |')
  parts.append(f'{_fmt(row.get("flax_infer", {}).get("compile_s"), ".1f", 6)} '
               f'{_fmt(row.get("flax_train", {}).get("compile_s"), ".1f", 6)} |')
  mems = []
  for mode in ('infer', 'train'):
    f = row.get(f'flax_{mode}', {}).get('memory_mb')
    t = row.get(f'torch_{mode}_memory_mb')
    mems.append(f'{_fmt(f, ".0f", 6)}/{_fmt(t, ".0f", 6)}')
  parts.append(' '.join(mems))
  return ' '.join(parts)


def errors_of(row: dict) -> list[str]:
  return [f'{row["model"]} b{row["batch"]} {k}: {v["error"]}'
          for k, v in row.items() if isinstance(v, dict) and 'error' in v]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default=','.join(MODELS),
                 help='comma-separated registry names')
  p.add_argument('--batch', default=','.join(map(str, BATCHES)),
                 help='comma-separated batch sizes')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--reps', type=int, default=5,
                 help='timed calls per cell (at least), after one warm-up')
  p.add_argument('--min-time', type=float, default=2.0,
                 help='keep calling until this many seconds have passed')
  p.add_argument('--quick', action='store_true',
                 help='CI smoke run: ghostnet_050, batch 2, 32x32, 1 call, '
                      'in one process, 1 torch thread, XLA -O0 (not timing)')
  p.add_argument('--json', default=None,
                 help="also write the results as JSON to this path ('-': "
                      'stdout, instead of the table)')
  p.add_argument('--no-torch', action='store_true',
                 help='skip the PyTorch references')
  p.add_argument('--no-train', action='store_true')
  p.add_argument('--no-infer', action='store_true')
  p.add_argument('--conv-impl', default='auto',
                 help="Flax convolution lowering ('auto', 'lax', 'xla', 'ffi')")
  p.add_argument('--fold', action='store_true',
                 help='Flax inference with BatchNorm folded into the '
                      'convolutions (ghostnet_jax.inference)')
  p.add_argument('--threads', type=int, default=None,
                 help='torch threads (default: the cores XLA uses)')
  p.add_argument('--tuned', action='store_true',
                 help='call ghostnet_jax.runtime.tune_malloc in both '
                 "frameworks' workers (default: each side as a user runs it)")
  p.add_argument('--repeats', type=int, default=3,
                 help='fresh-process runs per cell (median and min-max)')
  p.add_argument('--cell-timeout', type=float, default=1800)
  p.add_argument('--in-process', action='store_true',
                 help='run every cell in this process (faster start, but '
                      'cells share allocator state: timings and memory are '
                      'less clean; --quick does this)')
  p.add_argument('--first-logits', action='store_true',
                 help='only time create_model + init_variables + the first '
                 'jax.jit(model.apply) call per model and batch, each '
                 '--repeats times in a fresh process')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def first_logits_main(args, models, batches) -> int:
  """``--first-logits``: the time-to-first-logits table (plain API)."""
  print('Time to first logits, plain API, fresh process per run (wall s; '
        f'median of {args.repeats}, min-max of total)')
  print(f'{"model":<20} {"batch":>5} {"import":>7} {"create":>7} '
        f'{"init":>7} {"1st jit":>7} {"total":>7} {"min-max":>11}')
  rows, failed = [], False
  for name in models:
    for batch in batches:
      runs = [run_cell(dict(kind='first', tuned=False, name=name, batch=batch,
                            image_size=args.image_size), args.cell_timeout)
              for _ in range(max(args.repeats, 1))]
      good = sorted((r for r in runs if 'total_s' in r),
                    key=lambda r: r['total_s'])
      if not good:
        print(f'{name:<20} {batch:>5} error: {runs[0].get("error")}')
        failed = True
        continue
      med = good[(len(good) - 1) // 2]
      rows.append(dict(med, model=name, batch=batch, runs=runs))
      print(f'{name:<20} {batch:>5} {med["import_s"]:7.2f} '
            f'{med["create_s"]:7.2f} {med["init_s"]:7.2f} '
            f'{med["first_logits_s"]:7.2f} {med["total_s"]:7.2f} '
            f'{good[0]["total_s"]:5.1f}-{good[-1]["total_s"]:<5.1f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(first_logits=rows), f, indent=1)
  return 1 if failed else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker is not None:
    _worker_main(args)
    return 0
  models = [m for m in args.models.split(',') if m]
  batches = [int(b) for b in args.batch.split(',') if b]
  if args.first_logits:
    return first_logits_main(args, models, batches)
  image_size, reps, min_time = args.image_size, args.reps, args.min_time
  if args.quick:
    models, batches = list(QUICK['models']), list(QUICK['batches'])
    image_size, reps = QUICK['image_size'], QUICK['reps']
    min_time = QUICK['min_time']
    args.in_process = True
    args.threads = args.threads or QUICK['threads']
    compiler_options = QUICK['compiler_options']
  else:
    compiler_options = None
  if args.quick:
    args.repeats = 1
  if args.in_process and args.tuned:
    from ghostnet_jax import runtime  # pylint: disable=g-import-not-at-top
    runtime.tune_malloc()  # before any JAX or PyTorch computation
  threads = args.threads or cpu_threads()
  modes = [m for m in ('infer', 'train')
           if not getattr(args, f'no_{m}')]
  info = dict(machine=machine_info(), versions=versions(not args.no_torch),
              command=' '.join([os.path.basename(sys.executable),
                                os.path.relpath(__file__, REPO)]
                               + (argv if argv is not None else sys.argv[1:])),
              image_size=image_size, reps=reps, min_time_s=min_time,
              torch_threads=threads, tuned=args.tuned, repeats=args.repeats,
              conv_impl=args.conv_impl, compiler_options=compiler_options,
              fold_batchnorm=args.fold)
  to_stdout = args.json == '-'
  if not to_stdout:
    m, v = info['machine'], info['versions']
    print(f'{m.get("cpu", "?")}, {m["cores"]} cores, '
          f'{_fmt(m.get("memory_gib"), ".0f", 0)} GiB; jax {v["jax"]}, '
          f'flax {v["flax"]}'
          + (f', torch {v["torch"]} ({threads} threads)' if 'torch' in v
             else '')
          + f'; {image_size}x{image_size} float32; load average '
          f'{m.get("loadavg_start", ("?",))[0]}')
    print(HEADER)
    print('-' * len(HEADER.splitlines()[1]))
  rows = []
  base = dict(image_size=image_size, reps=reps, min_time=min_time,
              tuned=args.tuned)
  for name in models:
    for batch in batches:
      row = dict(model=name, batch=batch)
      for mode in modes:
        if mode == 'train' and batch < 2 and name.startswith('g_ghost'):
          row[f'flax_{mode}'] = dict(skipped='G-Ghost trains with batch >= 2')
          continue
        row[f'flax_{mode}'] = run_repeated(
            dict(base, kind='flax', name=name, batch=batch, mode=mode,
                 conv_impl=args.conv_impl, compiler_options=compiler_options,
                 fold=args.fold),
            args.repeats, args.cell_timeout, args.in_process)
        if args.no_torch:
          continue
        for layout in ('nchw', 'channels_last'):
          row[f'torch_{mode}_{layout}'] = run_repeated(
              dict(base, kind='torch', name=name, batch=batch, mode=mode,
                   layout=layout, threads=threads), args.repeats,
              args.cell_timeout, args.in_process)
      summarize(row)
      rows.append(row)
      if not to_stdout:
        print(format_row(row), flush=True)
  try:
    info['machine']['loadavg_end'] = os.getloadavg()
  except OSError:
    pass
  errors = [e for row in rows for e in errors_of(row)]
  if not to_stdout:
    settings = ('--tuned (tune_malloc in both workers, '
                'GHOSTNET_JAX_XLA_FLAGS=1 for Flax)' if args.tuned
                else 'plain API, no runtime settings')
    print(f'ratio x = Flax / PyTorch medians over {args.repeats} fresh-'
          f'process runs (better of NCHW and channels_last: "cl" = '
          f'channels_last); spread = min-max of the paired per-run ratios; '
          f'{settings}; load average at the end '
          f'{info["machine"].get("loadavg_end", ("?",))[0]}')
    for e in errors:
      print('ERROR', e)
  if args.json:
    payload = json.dumps(dict(info, rows=rows), indent=1)
    if to_stdout:
      print(payload)
    else:
      with open(args.json, 'w') as f:
        f.write(payload + '\n')
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
