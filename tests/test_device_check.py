"""``benchmarks/device_check.py --quick`` on the CPU, so the script cannot rot.

One subprocess run (tiny models and sizes): parity rows for every family
(default ``conv_impl``, here the compiled CPU kernels, against ``'lax'``),
throughput cells in float32 and bfloat16, and a ``train.py`` run that
checkpoints and then resumes. Asserts the results are real, not speed.
"""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'device_check.py')
FAMILY_PREFIXES = ('ghostnet_', 'ghostnetv2_', 'ghostnetv3_', 'g_ghost_',
                   'ghost_resnet')

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('device_check') / 'quick.json'
  env = dict(os.environ, GHOSTNET_JAX_CACHE_DIR='off')
  proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--json',
                         str(out)], capture_output=True, text=True,
                        timeout=1800, cwd=REPO, env=env, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return proc.stdout, json.load(f)


def test_parity_for_every_family(quick):
  stdout, result = quick
  assert result['quick'] and not result['errors']
  models = [r['model'] for r in result['parity']]
  for prefix in FAMILY_PREFIXES:
    assert any(m.startswith(prefix) for m in models), (prefix, models)
  for r in result['parity']:
    assert r['ok'] and math.isfinite(r['max_rel_diff'])
    assert 0 <= r['max_rel_diff'] <= 1e-3, r
    assert r['top1_agreement'] == 1.0, r
  assert 'Parity' in stdout


def test_throughput_cells_in_both_dtypes(quick):
  _, result = quick
  cells = {(c['model'], c['dtype'], c['mode']): c
           for c in result['throughput']}
  assert {(d, m) for _, d, m in cells} == {
      (d, m) for d in ('float32', 'bfloat16') for m in ('infer', 'train')}
  for c in cells.values():
    assert c['images_per_s'] > 0 and c['compile_s'] > 0, c


def test_train_py_checkpoints_and_resumes(quick):
  _, result = quick
  t = result['train_py']
  first, second = t['runs']
  assert (first['returncode'], second['returncode']) == (0, 0)
  assert first['final_step'] == t['steps'] and first['resumed_from'] is None
  assert second['resumed_from'] == t['steps']
  assert second['final_step'] == 2 * t['steps']
  assert {t['steps'], 2 * t['steps']} <= set(t['checkpoints'])
  assert math.isfinite(second['train_loss']) and t['ok']
