"""Sharded training equals single-device training; two processes equal one.

Every run happens in a fresh process (tests/train_worker.py), because the
number of CPU devices is fixed per process. A tiny GhostNet (two stages) on
16x16 digits keeps compilation short.

Tolerances: the sharded programs compute the same float32 math, but every
batch reduction (loss mean, BatchNorm statistics, gradient sums) is split
into per-device partial sums that are then all-reduced, so summation order
differs. Measured after two steps: at most 1.2e-7 absolute on parameters,
BatchNorm statistics and EMA (about one float32 ulp at their magnitude), 2e-7
on the loss. We allow atol 1e-6 + rtol 1e-5, an order of magnitude above
that and far below a real difference (per-device BatchNorm moves parameters
by ~8e-3 after the same two steps).
"""

import os
import subprocess

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_test_utils
from ghostnet_jax import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  return train_test_utils.digits_dir(tmp_path_factory)


def _max_diff(a, b):
  import jax
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def _launch(spec):
  return subprocess.Popen(train_test_utils.worker_cmd(spec),
                          env=train_test_utils.worker_env(),
                          cwd=train_test_utils.ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _collect(proc, timeout=900):
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode:
    raise AssertionError(f'worker failed ({proc.returncode}):\n{out[-3000:]}'
                         f'\n{err[-6000:]}')
  return train_test_utils.parse_result(out)


@pytest.fixture(scope='module')
def parity(tmp_path_factory):
  """Two steps of the same global batch of 32 under several layouts.

  Three worker processes run side by side (compilation is mostly single
  threaded); only the runs whose top-1 is compared evaluate.
  """
  root = tmp_path_factory.mktemp('parity')
  common = dict(num_train_steps=2, checkpoint_every_steps=1,
                keep_checkpoints=2, batch_size=32, eval_batch_size=64,
                dropout=0.2, ema_decay=0.5, eval_every_steps=-1)
  # G-Ghost's grouped 3x3 convolutions under FSDP (they crashed XLA's SPMD
  # partitioner before the step all-gathered the parameters).
  gghost = {**common, 'model': 'g_ghost_regnetx_002', 'model_overrides': {},
            'num_train_steps': 1, 'warmup_steps': 0, 'ema_decay': 0.0}
  evaluated = {**common, 'eval_every_steps': 0}
  runs = {
      1: [('one', evaluated),
          ('one_groups8', {**common, 'bn_batch_groups': 8}),
          ('gghost_one', gghost)],
      8: [('dp8', {**evaluated, 'mesh_shape': [-1, 1]}),
          ('fsdp', {**common, 'mesh_shape': [2, 4], 'fsdp_min_size': 0})],
      '8b': [('dp8_groups', {**common, 'bn_batch_groups': -1}),
             ('gghost_fsdp',
              {**gghost, 'mesh_shape': [2, 4], 'fsdp_min_size': 0})],
  }
  procs = {key: _launch({
      'devices': 1 if key == 1 else 8, 'fake_input': True,
      'runs': [{'workdir': str(root / name), 'config': config}
               for name, config in specs]}) for key, specs in runs.items()}
  results = {}
  for key, proc in procs.items():
    results.update(zip([name for name, _ in runs[key]], _collect(proc)))
  return root, results


def test_eight_devices_equal_one_device(parity):
  root, results = parity
  assert results['one']['step'] == results['dp8']['step'] == 2
  np.testing.assert_allclose(results['dp8']['train_loss'],
                             results['one']['train_loss'], rtol=RTOL)
  one = ckpt_lib.restore_workdir(root / 'one', 'latest')
  dp8 = ckpt_lib.restore_workdir(root / 'dp8', 'latest')
  print('1 vs 8 devices, max abs diff: variables',
        _max_diff(one['variables'], dp8['variables']), 'ema',
        _max_diff(one['ema_variables'], dp8['ema_variables']), 'loss',
        abs(results['one']['train_loss'] - results['dp8']['train_loss']))
  chex.assert_trees_all_close(dp8['variables'], one['variables'], rtol=RTOL,
                              atol=ATOL)
  chex.assert_trees_all_close(dp8['ema_variables'], one['ema_variables'],
                              rtol=RTOL, atol=ATOL)
  assert results['dp8']['top1'] == pytest.approx(results['one']['top1'],
                                                 abs=1 / 357 + 1e-9)


def test_fsdp_equals_data_parallel(parity):
  root, results = parity
  np.testing.assert_allclose(results['fsdp']['train_loss'],
                             results['dp8']['train_loss'], rtol=RTOL)
  dp8 = ckpt_lib.restore_workdir(root / 'dp8', 'latest')
  fsdp = ckpt_lib.restore_workdir(root / 'fsdp', 'latest')
  print('FSDP (2, 4) vs data parallel (8, 1), max abs diff:',
        _max_diff(dp8['variables'], fsdp['variables']))
  chex.assert_trees_all_close(fsdp['variables'], dp8['variables'],
                              rtol=RTOL, atol=ATOL)
  # The FSDP run really sharded its state over the 'fsdp' axis.
  with ocp.CheckpointManager(
      root / 'fsdp' / 'checkpoints',
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers=ckpt_lib.item_handlers()) as mngr:
    tree = mngr.item_metadata(2)[ckpt_lib.STATE].tree
  import jax
  specs = [repr(m.sharding) for m in jax.tree_util.tree_leaves(
      tree['params'], is_leaf=lambda m: hasattr(m, 'sharding'))]
  assert sum('fsdp' in s for s in specs) > len(specs) // 2, specs[:5]


def test_fsdp_g_ghost_equals_one_device(parity):
  """G-Ghost RegNetX-200MF, one step: FSDP (2, 4) on 8 devices vs 1 device.

  At initialisation this network's gradient is ill-conditioned on 16x16
  digits: perturbing the input by 1e-7 (relative) changes the gradient by
  ~1% (measured), so summation order alone moves the 1- and 8-device
  gradients by ~0.2%. The forward pass is well conditioned: the loss and
  the BatchNorm statistics are compared tightly, the update by direction and
  size. A real error (a gradient not reduced over a mesh axis, a shard
  applied to the wrong slice) changes the update by tens of percent.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import train_lib  # pylint: disable=g-import-not-at-top
  root, results = parity
  np.testing.assert_allclose(results['gghost_fsdp']['train_loss'],
                             results['gghost_one']['train_loss'], rtol=1e-5)
  one = ckpt_lib.restore_workdir(root / 'gghost_one', 'latest')
  fsdp = ckpt_lib.restore_workdir(root / 'gghost_fsdp', 'latest')
  # Running statistics after one step: measured 3e-5 on variances of ~5.7.
  chex.assert_trees_all_close(fsdp['variables']['batch_stats'],
                              one['variables']['batch_stats'], rtol=1e-4,
                              atol=1e-5)
  # The initial parameters (what init_state computes) and the two updates.
  cfg = one['config']
  model = train_lib.model_from_config(cfg, 10)
  init = jax.jit(lambda r: model.init(r, jnp.zeros(
      (1, cfg.image_size, cfg.image_size, 3)), train=False))(
          jax.random.key(cfg.seed))['params']
  flat = lambda t: np.concatenate(
      [np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  u1 = flat(one['variables']['params']) - flat(init)
  u8 = flat(fsdp['variables']['params']) - flat(init)
  cos = float(u1 @ u8 / np.linalg.norm(u1) / np.linalg.norm(u8))
  ratio = float(np.linalg.norm(u8) / np.linalg.norm(u1))
  print(f'G-Ghost FSDP (2, 4) vs 1 device: update cosine {cos:.6f}, '
        f'norm ratio {ratio:.6f}, max abs param diff '
        f'{np.abs(u1 - u8).max():.3g} of max update {np.abs(u1).max():.3g}')
  assert np.linalg.norm(u1) > 0.1
  assert cos > 0.999
  assert abs(ratio - 1) < 0.01


def test_per_device_batchnorm_groups(parity):
  root, results = parity
  # One group per device on 8 devices is the same math as 8 groups on one.
  np.testing.assert_allclose(results['dp8_groups']['train_loss'],
                             results['one_groups8']['train_loss'], rtol=RTOL)
  g8 = ckpt_lib.restore_workdir(root / 'dp8_groups', 'latest')
  g1 = ckpt_lib.restore_workdir(root / 'one_groups8', 'latest')
  chex.assert_trees_all_close(g8['variables'], g1['variables'], rtol=RTOL,
                              atol=ATOL)
  # And it differs from global statistics. After the first step the stem
  # BatchNorm has seen the same activations in both runs: its running mean
  # (the mean of equal-sized group means) is the global mean. Everything
  # downstream differs by far more than the sharding noise (~1e-7).
  glob = ckpt_lib.restore_workdir(root / 'dp8', 1)['variables']
  grp = ckpt_lib.restore_workdir(root / 'dp8_groups', 1)['variables']
  np.testing.assert_allclose(grp['batch_stats']['bn1']['mean'],
                             glob['batch_stats']['bn1']['mean'], rtol=1e-5,
                             atol=1e-6)
  glob2 = ckpt_lib.restore_workdir(root / 'dp8', 'latest')['variables']
  diff = _max_diff(g8['variables'], glob2)
  print('per-device BN vs global BN, max abs diff:', diff)
  assert diff > 1e-3
  assert abs(results['dp8_groups']['train_loss'] -
             results['dp8']['train_loss']) > 1e-4


def test_two_processes_equal_one_process(tmp_path, digits_dir):
  """Two processes x 2 CPU devices (gloo) against one process x 4 devices."""
  config = dict(dataset='digits', data_dir=digits_dir, num_train_steps=3,
                checkpoint_every_steps=3, batch_size=16, eval_batch_size=64,
                dropout=0.2)
  port = train_test_utils.free_port()
  procs = [_launch({
      'devices': 2,
      'distributed': {'coordinator': f'localhost:{port}', 'num_processes': 2,
                      'process_id': i},
      'runs': [{'workdir': str(tmp_path / 'two'), 'config': config}],
      # Process 1 looks at the workdir late: process 0 must not create the
      # checkpoint directory before it has (they would take different
      # orbax barriers and fail).
      'check_workdir_delay_s': 3.0 * i,
  }) for i in range(2)]
  ref = _launch({'devices': 4, 'runs': [
      {'workdir': str(tmp_path / 'one'), 'config': config}]})
  two0, two1 = (_collect(p)[0] for p in procs)
  one = _collect(ref)[0]
  assert two0['step'] == one['step'] == 3
  # Both processes see the same global metrics.
  assert two0['train_loss'] == two1['train_loss']
  assert two0['top1'] == two1['top1']
  np.testing.assert_allclose(two0['train_loss'], one['train_loss'], rtol=RTOL)
  a = ckpt_lib.restore_workdir(tmp_path / 'two', 'latest')
  b = ckpt_lib.restore_workdir(tmp_path / 'one', 'latest')
  print('2 processes vs 1, max abs diff:',
        _max_diff(a['variables'], b['variables']), 'loss',
        abs(two0['train_loss'] - one['train_loss']))
  chex.assert_trees_all_close(a['variables'], b['variables'], rtol=RTOL,
                              atol=ATOL)
  assert os.path.exists(tmp_path / 'two' / 'final_metrics.json')


IMAGENET_CONFIGS = ('ghostnet_100_imagenet', 'ghostnetv2_100_imagenet',
                    'ghostnetv3_100_imagenet', 'g_ghost_regnetx_032_imagenet')


@pytest.mark.slow
def test_imagenet_configs_build_their_step_on_8_devices():
  """Every ImageNet recipe, unchanged, through the trainer's builders on 8
  CPU devices with mock imagenet2012 (tests/configs_build_worker.py)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  worker = os.path.join(os.path.dirname(__file__), 'configs_build_worker.py')
  proc = subprocess.run([sys.executable, worker, *IMAGENET_CONFIGS],
                        env=env, capture_output=True, text=True, timeout=1200,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  built = {}
  for line in proc.stdout.splitlines():
    if line.startswith('BUILT '):
      b = json.loads(line[len('BUILT '):])
      built[b['config']] = b
  assert sorted(built) == sorted(IMAGENET_CONFIGS), proc.stdout[-2000:]
  for name, b in built.items():
    config = importlib.import_module(f'configs.{name}').get_config()
    size = config.image_size
    assert b['devices'] == 8 and b['num_partitions_8'], b
    assert b['mesh'][0] * b['mesh'][1] == 8, b
    assert b['batch']['image'] == [[config.batch_size, size, size, 3],
                                   'float32'], b
    assert b['teacher'] == name.startswith('ghostnetv3'), b
    wants_augment = bool(config.rand_augment or config.color_jitter
                         or config.random_erasing or config.mixup
                         or config.cutmix)
    assert b['augment'] == wants_augment, b
    print(f"BUILT {name}: {b['model']} batch {config.batch_size} at {size}px "
          f"on mesh {b['mesh']}, {b['build_s']} s")
