"""One-call check of a GPU (or TPU) machine: parity, throughput, a real run.

  python benchmarks/device_check.py                    # < 8 min on one GPU
  python benchmarks/device_check.py --json device.json
  python benchmarks/device_check.py --quick            # tiny; CPU CI smoke run

Three sections, each printed as a table and written to the JSON:

1. **Parity.** For one model of every family, logits on the default device
   with the default ``conv_impl`` (``'auto'``: ``'lax'`` on GPU/TPU, the
   compiled kernels on a CPU) against a float32 reference on the CPU with
   ``conv_impl='lax'``, both at ``jax.default_matmul_precision('highest')``
   (a GPU otherwise computes float32 convolutions in TF32). Reported: the
   largest absolute difference relative to the largest reference logit, and
   top-1 agreement; a row fails above ``--tolerance``.
2. **Throughput.** Inference (``model.apply(..., train=False)`` under
   ``jit``) and training-step (forward, backward, SGD with momentum; the
   step of ``bench.py``) images/s at batch 256 in float32 and bfloat16 for
   ``ghostnet_100``, ``ghostnetv2_100`` and ``g_ghost_regnetx_032``, with
   compile seconds; the measurement is ``bench.flax_worker``'s (median of
   calls after a warm-up). Default matmul precision (what a user gets).
3. **train.py.** ``train.py`` on the embedded digits data on the default
   device: a run of ``N`` steps with checkpoints, then the same command with
   ``2N`` steps, which must resume from step ``N`` and finish at ``2N``.

Exit status 1 when a parity row or the train.py run fails. ``--quick`` uses
the smallest variants, 32x32 images, batch 2 and a few steps, so CI runs every
code path on a CPU (``tests/test_device_check.py``); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'benchmarks')]

# One model per family (parity); the throughput models; the train.py run.
FULL = dict(
    parity_models=('ghostnet_100', 'ghostnetv2_100', 'ghostnetv3_100',
                   'g_ghost_regnetx_032', 'ghost_resnet50_s4'),
    parity_batch=8, parity_image_size=224,
    models=('ghostnet_100', 'ghostnetv2_100', 'g_ghost_regnetx_032'),
    batch=256, image_size=224, dtypes=('float32', 'bfloat16'), reps=10,
    min_time=2.0, train_steps=50, train_batch=256, compiler_options=None,
    train_eval=True, train_xla_flags='')
QUICK = dict(
    parity_models=('ghostnet_050', 'ghostnetv2_100', 'ghostnetv3_050',
                   'g_ghost_regnetx_002', 'ghost_resnet50_s4'),
    parity_batch=2, parity_image_size=64,  # V2/V3 need >= 33x33
    models=('ghostnet_050',), batch=2, image_size=32,
    dtypes=('float32', 'bfloat16'), reps=1, min_time=0.0, train_steps=2,
    train_batch=8,
    # XLA's backend optimisation level 0 halves CPU compile times; the
    # figures of a --quick run mean nothing anyway.
    compiler_options={'xla_backend_optimization_level': 0},
    train_eval=False,
    train_xla_flags='--xla_backend_optimization_level=0')


def parity(name: str, batch: int, image_size: int, tolerance: float) -> dict:
  """Default device + default conv_impl against CPU + ``'lax'`` (float32)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  from bench import random_variables  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import ops  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  cpu = jax.devices('cpu')[0]
  model = ghostnet_jax.create_model(name)
  reference = ghostnet_jax.create_model(name, conv_impl='lax')
  variables = random_variables(model, image_size)
  x = np.random.RandomState(2).randn(
      batch, image_size, image_size, 3).astype(np.float32)

  def logits(m, on):
    v, xs = jax.device_put((variables, x), on)
    fn = jax.jit(lambda v, x: m.apply(v, x, train=False))
    return np.asarray(fn(v, xs), np.float64)

  t = time.perf_counter()
  with jax.default_matmul_precision('highest'):
    want = logits(reference, cpu)
    got = logits(model, device)
  scale = float(np.abs(want).max())
  diff = float(np.abs(got - want).max()) / max(scale, 1e-12)
  agree = float((got.argmax(-1) == want.argmax(-1)).mean())
  return dict(model=name, device=device.platform,
              device_kind=device.device_kind,
              conv_impl=ops.resolve_impl('auto'), batch=batch,
              image_size=image_size, max_rel_diff=diff, top1_agreement=agree,
              ok=bool(math.isfinite(diff) and diff <= tolerance),
              seconds=time.perf_counter() - t)


def throughput(name: str, dtype: str, mode: str, cfg: dict) -> dict:
  """One ``bench.flax_worker`` cell in this process."""
  from bench import flax_worker  # pylint: disable=g-import-not-at-top
  out = flax_worker(name, cfg['batch'], mode, cfg['image_size'], cfg['reps'],
                    cfg['min_time'], 'auto', cfg['compiler_options'],
                    dtype=dtype)
  return dict(model=name, dtype=dtype, mode=mode, batch=cfg['batch'],
              image_size=cfg['image_size'], **out)


def _train_cmd(workdir: str, steps: int, batch: int,
               evaluate: bool) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'train.py'),
          '--workdir', workdir,
          f'--config.num_train_steps={steps}',
          f'--config.batch_size={batch}',
          f'--config.checkpoint_every_steps={steps}',
          f'--config.log_every_steps={steps}',
          f'--config.eval_every_steps={0 if evaluate else -1}',
          '--config.progress_bar=False']


def train_run(steps: int, batch: int, workdir: str | None = None,
              timeout: float = 900, evaluate: bool = True,
              xla_flags: str = '') -> dict:
  """``train.py`` for ``steps`` steps, then rerun to ``2 * steps``.

  ``evaluate=False`` skips the eval step (one compile less); ``xla_flags``
  are appended to ``XLA_FLAGS`` in the runs' environment.
  """
  own = workdir is None
  tmp = tempfile.TemporaryDirectory(prefix='device_check_') if own else None
  workdir = os.path.join(tmp.name if own else workdir, 'run')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
                if p]))
  if xla_flags:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
  out = dict(steps=steps, batch=batch, runs=[])
  try:
    for target in (steps, 2 * steps):
      t = time.perf_counter()
      try:
        proc = subprocess.run(_train_cmd(workdir, target, batch, evaluate),
                              cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
      except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(
            e.cmd, 124, _text(e.stdout),
            _text(e.stderr) + f'\ntimed out after {timeout:.0f} s')
      text = proc.stdout + proc.stderr
      run = dict(target=target, returncode=proc.returncode,
                 seconds=time.perf_counter() - t)
      m = re.search(r'on (\d+) (\w+) device\(s\)', text)
      run['platform'] = m.group(2) if m else None
      m = re.search(r'resuming from step (\d+)', text)
      run['resumed_from'] = int(m.group(1)) if m else None
      m = re.search(r'First step \(with compilation\) took ([\d.]+)s', text)
      run['first_step_s'] = float(m.group(1)) if m else None
      final_path = os.path.join(workdir, 'final_metrics.json')
      if proc.returncode == 0 and os.path.exists(final_path):
        with open(final_path) as f:
          final = json.load(f)
        run['final_step'] = final.get('step')
        run['train_loss'] = final.get('train_loss')
        run['top1'] = final.get('top1')
      else:
        run['tail'] = text[-3000:]
      out['runs'].append(run)
      if proc.returncode:
        break
    ckpt = os.path.join(workdir, 'checkpoints')
    out['checkpoints'] = sorted(int(n) for n in (
        os.listdir(ckpt) if os.path.isdir(ckpt) else ()) if n.isdigit())
    runs = out['runs']
    out['ok'] = bool(
        len(runs) == 2 and all(r['returncode'] == 0 for r in runs)
        and runs[0].get('final_step') == steps
        and runs[1].get('resumed_from') == steps
        and runs[1].get('final_step') == 2 * steps
        and {steps, 2 * steps} <= set(out['checkpoints']))
  finally:
    if tmp is not None:
      tmp.cleanup()
  return out


def _text(b) -> str:
  return b.decode(errors='replace') if isinstance(b, bytes) else (b or '')


def print_tables(result: dict) -> None:
  print(f'Device: {result["device"]} ({result["device_kind"]}); '
        f'jax {result["jax"]}')
  print(f'\nParity: logits on {result["device"]} (default conv_impl) vs CPU '
        "conv_impl='lax', float32, precision 'highest'; rel = max |diff| / "
        'max |logit|')
  print(f'{"model":<22} {"impl":<5} {"batch":>5} {"size":>4} '
        f'{"max rel diff":>12} {"top-1 agree":>11}  ok')
  for r in result['parity']:
    print(f'{r["model"]:<22} {r["conv_impl"]:<5} {r["batch"]:>5} '
          f'{r["image_size"]:>4} {r["max_rel_diff"]:>12.2e} '
          f'{r["top1_agreement"]:>11.2f}  {"yes" if r["ok"] else "NO"}')
  print('\nThroughput (images/s; compile s)')
  print(f'{"model":<22} {"dtype":<9} {"batch":>5} | {"infer":>8} '
        f'{"compile":>7} | {"train":>8} {"compile":>7}')
  cells = {(r['model'], r['dtype'], r['mode']): r
           for r in result['throughput']}
  for (model, dtype) in dict.fromkeys((m, d) for m, d, _ in cells):
    row = f'{model:<22} {dtype:<9} {result["config"]["batch"]:>5} |'
    for mode in ('infer', 'train'):
      c = cells.get((model, dtype, mode), {})
      ips, comp = c.get('images_per_s'), c.get('compile_s')
      row += (f' {ips:>8.1f} {comp:>7.1f} |' if ips else
              f' {"error":>8} {"":>7} |')
    print(row.rstrip(' |'))
  t = result.get('train_py')
  if t:
    print('\ntrain.py on the digits data (run, then rerun to resume)')
    for r in t['runs']:
      print(f'  to step {r["target"]:>4}: rc {r["returncode"]}, '
            f'{r["seconds"]:.1f}s (first step {r.get("first_step_s")}s), '
            f'platform {r["platform"]}, resumed from {r["resumed_from"]}, '
            f'final step {r.get("final_step")}, loss {r.get("train_loss")}')
    print(f'  checkpoints: {t["checkpoints"]}; ok: {t["ok"]}')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='tiny sizes (CI smoke run on a CPU)')
  p.add_argument('--json', default=None, help='write the results here')
  p.add_argument('--tolerance', type=float, default=1e-3,
                 help='parity: largest allowed max |diff| / max |logit|')
  p.add_argument('--skip', default='',
                 help='comma-separated sections to skip: parity, '
                 'throughput, train')
  args = p.parse_args(argv)
  cfg = dict(QUICK if args.quick else FULL)
  skip = {s for s in args.skip.split(',') if s}

  from ghostnet_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.tune_malloc()
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  result = dict(device=jax.devices()[0].platform,
                device_kind=jax.devices()[0].device_kind,
                jax=jax.__version__, quick=args.quick,
                config={k: v for k, v in cfg.items()
                        if k not in ('compiler_options', 'train_xla_flags')},
                parity=[], throughput=[], errors=[])
  if 'parity' not in skip:
    for name in cfg['parity_models']:
      try:
        result['parity'].append(parity(name, cfg['parity_batch'],
                                       cfg['parity_image_size'],
                                       args.tolerance))
      except Exception as e:  # pylint: disable=broad-except
        result['errors'].append(f'parity {name}: {type(e).__name__}: {e}')
  if 'throughput' not in skip:
    for name in cfg['models']:
      for dtype in cfg['dtypes']:
        for mode in ('infer', 'train'):
          try:
            result['throughput'].append(throughput(name, dtype, mode, cfg))
          except Exception as e:  # pylint: disable=broad-except
            result['errors'].append(
                f'throughput {name} {dtype} {mode}: {type(e).__name__}: {e}')
  if 'train' not in skip:
    result['train_py'] = train_run(cfg['train_steps'], cfg['train_batch'],
                                   evaluate=cfg['train_eval'],
                                   xla_flags=cfg['train_xla_flags'])
  result['seconds'] = time.perf_counter() - start
  print_tables(result)
  for e in result['errors']:
    print(f'error: {e}')
  print(f'\n{result["seconds"]:.0f}s in all')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1, default=str)
  ok = (not result['errors'] and all(r['ok'] for r in result['parity'])
        and result.get('train_py', {'ok': True})['ok'])
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
