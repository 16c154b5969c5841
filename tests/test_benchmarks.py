"""Smoke tests of ``benchmarks/bench.py --quick`` (one tiny run, no timing)
and ``benchmarks/export_latency.py --quick``.

The benchmark runs as a subprocess (as CI would run it), prints its table and
writes JSON; the test checks the rows, the columns and that every measured
number is finite and positive. It asserts nothing about speed.
"""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, 'benchmarks', 'bench.py')


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'quick.json'
  proc = subprocess.run(
      [sys.executable, BENCH, '--quick', '--json', str(out)],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(out) as f:
    return proc.stdout, json.load(f)


def test_table_has_the_columns_and_one_row(quick_run):
  stdout, _ = quick_run
  lines = stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith('model'))
  for column in ('inference img/s', 'training step img/s', 'compile s',
                 'peak MB'):
    assert column in lines[header], column
  for column in ('flax', 'torch', 'x', 'inf', 'train'):
    assert column in lines[header + 1].split(), column
  rows = [line for line in lines if line.startswith('ghostnet_050')]
  assert len(rows) == 1
  fields = rows[0].replace('|', ' ').split()
  assert fields[1] == '2'  # the batch
  numbers = [float(f) for f in fields[2:] if f.replace('.', '', 1).isdigit()]
  assert len(numbers) >= 8 and all(n >= 0 for n in numbers)


def test_json_has_finite_positive_measurements(quick_run):
  _, result = quick_run
  assert result['image_size'] == 32
  assert result['versions']['jax'] and result['machine']['cores'] >= 1
  (row,) = result['rows']
  assert (row['model'], row['batch']) == ('ghostnet_050', 2)
  for cell in ('flax_infer', 'flax_train', 'torch_infer_nchw',
               'torch_infer_channels_last', 'torch_train_nchw',
               'torch_train_channels_last'):
    assert 'error' not in row[cell], row[cell]
    for key in ('images_per_s', 'wall_s', 'cpu_s'):
      assert _positive(row[cell][key]), (cell, key, row[cell][key])
  for cell in ('flax_infer', 'flax_train'):
    assert _positive(row[cell]['compile_s'])
    assert row[cell]['memory_mb'] >= 0
  for mode in ('infer', 'train'):
    assert _positive(row[f'{mode}_ratio'])
    assert row[f'torch_{mode}_best_layout'] in ('nchw', 'channels_last')
    best = row[f'torch_{mode}_images_per_s']
    assert math.isclose(row[f'{mode}_ratio'],
                        row[f'flax_{mode}']['images_per_s'] / best)


def test_first_logits_table(tmp_path):
  out = tmp_path / 'first.json'
  proc = subprocess.run(
      [sys.executable, BENCH, '--first-logits', '--models', 'ghostnet_050',
       '--batch', '1', '--image-size', '32', '--repeats', '1', '--json',
       str(out)], capture_output=True, text=True, timeout=600, cwd=REPO,
      check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert any(line.startswith('ghostnet_050') for line in
             proc.stdout.splitlines())
  with open(out) as f:
    (row,) = json.load(f)['first_logits']
  parts = [row[k] for k in ('create_s', 'init_s', 'first_logits_s')]
  assert all(_positive(v) for v in parts + [row['total_s']])
  assert math.isclose(sum(parts), row['total_s'], rel_tol=1e-6)


EXPORT_LATENCY = os.path.join(REPO, 'benchmarks', 'export_latency.py')


@pytest.mark.slow
def test_export_latency_quick(tmp_path):
  """``benchmarks/export_latency.py --quick``: every row runs at 1 and 2
  threads, the artifacts are the model (parity), the int8 file is smaller."""
  import extras
  for module in ('tensorflow', 'ai_edge_litert', 'onnxruntime', 'jax2onnx',
                 'orbax.export'):
    try:
      __import__(module)
    except ImportError:
      extras.missing(f"{module} missing: install the 'export' extra (bash "
                     'setup.sh --test, or pip install -e .[export])')
  out = tmp_path / 'latency.json'
  proc = subprocess.run(
      [sys.executable, EXPORT_LATENCY, '--quick', '--json', str(out)],
      capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  with open(out) as f:
    result = json.load(f)
  rows = [line for line in proc.stdout.splitlines()
          if line.startswith('| ') and '(' in line and 'thread' not in line]
  assert result['threads'] == [1, 2]
  for t in ('1', '2'):
    cells = {k: v for k, v in result['cells'][t].items()
             if isinstance(v, dict)}
    assert len(cells) == 7, sorted(cells)
    for name, cell in cells.items():
      assert cell['repeats'] == 3
      assert _positive(cell['median_ms']), (t, name, cell)
      assert cell['q25_ms'] <= cell['median_ms'] <= cell['q75_ms'], cell
      assert any(line.startswith(f'| {name} |') for line in rows), name
  sizes = result['sizes_mb']
  assert all(_positive(v) for v in sizes.values()), sizes
  assert sizes['TFLite int8'] < 0.5 * sizes['TFLite fp32'], sizes
  for name, rel in result['parity'].items():
    if 'int8' not in name:
      assert rel <= 1e-4, (name, rel)
  # One set of weights: PyTorch eager computes the Flax model's logits.
  assert result['torch_vs_flax'] <= 1e-4, result['torch_vs_flax']


OP_PROFILE = os.path.join(REPO, 'benchmarks', 'op_profile.py')


def test_op_profile_classes_the_thunks_of_a_training_step(tmp_path):
  out = tmp_path / 'ops.json'
  proc = subprocess.run(
      [sys.executable, OP_PROFILE, '--model', 'ghostnet_050', '--mode',
       'train', '--batch', '2', '--image-size', '32', '--calls', '1',
       '--json', str(out)], capture_output=True, text=True, timeout=600,
      cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(out) as f:
    result = json.load(f)
  flax, torch_row = result['flax'], result['torch']
  # A GhostNet step has all of these; each must have been recognised.
  for cls in ('dense conv / matmul', 'depthwise conv',
              'BN stats / reductions', 'elementwise'):
    assert _positive(flax['cpu_ms'].get(cls)), (cls, flax['cpu_ms'])
  for cls in ('dense conv / matmul', 'depthwise conv'):
    assert _positive(torch_row['cpu_ms'].get(cls)), (cls, torch_row)
  for row in (flax, torch_row):
    assert _positive(row['wall_ms']) and _positive(row['ops'])
    assert 0 < row['cores_busy'] < 2 * os.cpu_count() + 1
  assert 'total' in proc.stdout and 'cores busy' in proc.stdout


def test_op_profile_reads_what_each_fusion_computes():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(OP_PROFILE))
  import op_profile  # pylint: disable=import-outside-toplevel

  def f(x, w):
    y = jnp.tanh(x @ w)              # a matmul, then elementwise
    return y - y.mean(0), y.T.copy()   # a reduction; a transpose
  compiled = jax.jit(f).lower(jnp.ones((64, 64)), jnp.ones((64, 64))
                              ).compile()
  lines, bodies = op_profile._hlo_index(compiled.as_text())
  classes = {op_profile.xla_class(name, lines, bodies) for name in lines}
  assert {'dense conv / matmul', 'BN stats / reductions'} <= classes, classes
