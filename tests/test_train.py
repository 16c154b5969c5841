"""Tests of the trainer on one device: optimisers, sharding rules, validation,
resume after preemption, the default run end to end, restore_workdir.

Multi-device and multi-process tests are in test_train_multidevice.py.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import train_test_utils
from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import optim
from ghostnet_jax import sharding as shd
from ghostnet_jax import train_lib
from ghostnet_jax import train_logging


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  return train_test_utils.digits_dir(tmp_path_factory)


# ------------------------------------------------------------------------------
# Optimisers and schedules
# ------------------------------------------------------------------------------


def test_cosine_schedule_warmup_then_cosine():
  s = optim.make_schedule(schedule='cosine', learning_rate=0.4,
                          total_steps=100, warmup_steps=10,
                          warmup_init_lr=0.01, end_lr=0.001)
  np.testing.assert_allclose(float(s(0)), 0.01, rtol=1e-5)
  np.testing.assert_allclose(float(s(5)), 0.01 + 0.5 * 0.39, rtol=1e-5)
  np.testing.assert_allclose(float(s(10)), 0.4, rtol=1e-5)
  t = (55 - 10) / 90
  want = 0.001 + (0.4 - 0.001) * 0.5 * (1 + np.cos(np.pi * t))
  np.testing.assert_allclose(float(s(55)), want, rtol=1e-5)
  np.testing.assert_allclose(float(s(100)), 0.001, rtol=1e-5)


def test_step_schedule_is_timm_step_decay():
  # GhostNetV2: x0.973 every 2.4 epochs (here 1 epoch = 10 steps), 3 warmup
  # epochs from 1e-6; periods counted from step 0 as timm does.
  s = optim.make_schedule(schedule='step', learning_rate=0.064,
                          total_steps=500, warmup_steps=30,
                          warmup_init_lr=1e-6, decay_steps=24.0,
                          decay_rate=0.973)
  np.testing.assert_allclose(float(s(0)), 1e-6, atol=1e-8)  # fp32
  np.testing.assert_allclose(float(s(15)), 1e-6 + 0.5 * (0.064 - 1e-6),
                             rtol=1e-5)
  for step in (30, 47, 48, 200, 499):
    want = 0.064 * 0.973 ** np.floor(step / 24.0)
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-5, err_msg=step)


def test_rmsprop_tf_matches_the_tf_update():
  lr, decay, eps, mom = 0.1, 0.9, 1e-3, 0.9
  tx = optim.make_optimizer(optimizer='rmsprop_tf',
                            schedule=optax.constant_schedule(lr),
                            momentum=mom, rmsprop_decay=decay,
                            rmsprop_eps=eps)
  params = {'w': jnp.array([1.0, -2.0, 3.0])}
  state = tx.init(params)
  ms, buf, p = np.ones(3), np.zeros(3), np.array([1.0, -2.0, 3.0])
  for i in range(3):
    g = np.array([0.5, -1.0, 2.0]) * (i + 1)
    updates, state = tx.update({'w': jnp.asarray(g, jnp.float32)}, state,
                               params)
    params = optax.apply_updates(params, updates)
    ms = decay * ms + (1 - decay) * g * g     # mean square starts at 1 (TF)
    buf = mom * buf + g / np.sqrt(ms + eps)   # eps inside the sqrt (TF)
    p = p - lr * buf
  np.testing.assert_allclose(np.asarray(params['w']), p, rtol=1e-5)


def test_weight_decay_skips_bn_and_bias_unless_asked():
  params = {'conv': {'kernel': jnp.ones((1, 1, 2, 2))},
            'bn': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  for decay_all, want_bn in ((False, 0.0), (True, -0.1 * 0.5)):
    tx = optim.make_optimizer(optimizer='sgd',
                              schedule=optax.constant_schedule(0.1),
                              momentum=0.0, weight_decay=0.5,
                              decay_all=decay_all)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates['conv']['kernel'], -0.05)
    np.testing.assert_allclose(updates['bn']['scale'], want_bn)
    np.testing.assert_allclose(updates['bn']['bias'], want_bn)


def test_grad_clipping_bounds_the_update():
  tx = optim.make_optimizer(optimizer='sgd',
                            schedule=optax.constant_schedule(1.0),
                            momentum=0.0, grad_clip_norm=1.0)
  params = {'w': jnp.zeros(4)}
  updates, _ = tx.update({'w': jnp.full(4, 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(optax.global_norm(updates), 1.0, rtol=1e-6)


def test_cross_entropy_label_smoothing_and_topk():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
  labels = jnp.array([1, 2])
  plain = train_lib.cross_entropy(logits, labels, 3)
  np.testing.assert_allclose(plain, -jax.nn.log_softmax(logits)[[0, 1],
                                                                [1, 2]],
                             rtol=1e-6)
  smooth = train_lib.cross_entropy(logits, labels, 3, 0.3)
  logp = jax.nn.log_softmax(logits)
  targets = jnp.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
  np.testing.assert_allclose(smooth, -(targets * logp).sum(-1), rtol=1e-6)
  hits = train_lib.topk_correct(logits, labels, (1, 2, 5))
  np.testing.assert_array_equal(hits[1], [0, 1])
  np.testing.assert_array_equal(hits[2], [1, 1])
  np.testing.assert_array_equal(hits[5], [1, 1])  # k capped at 3 classes


# ------------------------------------------------------------------------------
# Sharding rules
# ------------------------------------------------------------------------------


def test_fsdp_spec_shards_the_largest_divisible_dim():
  P = jax.sharding.PartitionSpec
  assert shd.fsdp_spec((3, 3, 16, 64), 4) == P(None, None, None, 'fsdp')
  assert shd.fsdp_spec((3, 3, 64, 6), 4) == P(None, None, 'fsdp', None)
  assert shd.fsdp_spec((10, 7), 4) == P()          # nothing divisible
  assert shd.fsdp_spec((), 4) == P()               # scalars replicated
  assert shd.fsdp_spec((1024,), 4, min_size=4096) == P()
  assert shd.fsdp_spec((64, 64), 1) == P()         # no fsdp axis


def test_resolve_mesh_shape():
  assert shd.resolve_mesh_shape((-1, 1), 8) == (8, 1)
  assert shd.resolve_mesh_shape((2, -1), 8) == (2, 4)
  assert shd.resolve_mesh_shape((4, 2), 8) == (4, 2)
  for bad in ((3, -1), (2, 2), (-1, -1), (0, 8), (8,)):
    with pytest.raises(ValueError, match='mesh_shape'):
      shd.resolve_mesh_shape(bad, 8)


# ------------------------------------------------------------------------------
# Validation: clear errors before any compute
# ------------------------------------------------------------------------------


@pytest.mark.parametrize('field,value,match', [
    ('model', 'ghostnet_999', 'config.model.*Unknown model'),
    ('batch_size', 0, 'config.batch_size must be > 0'),
    ('batch_size', -8, 'config.batch_size must be > 0'),
    ('eval_batch_size', -64, 'config.eval_batch_size must be > 0'),
    ('log_every_steps', 0, 'config.log_every_steps must be > 0'),
    ('label_smoothing', 1.0, r'config.label_smoothing must be in \[0, 1\)'),
    ('learning_rate', 0.0, 'config.learning_rate must be > 0'),
    ('learning_rate', -0.1, 'config.learning_rate must be > 0'),
    ('num_train_steps', 0, 'config.num_train_steps must be > 0'),
    ('checkpoint_every_steps', 0, 'config.checkpoint_every_steps must be > 0'),
    ('weight_decay', -1e-4, 'config.weight_decay must be >= 0'),
    ('optimizer', 'adam', 'config.optimizer must be one of'),
    ('schedule', 'linear', 'config.schedule must be one of'),
    ('dtype', 'float16', 'config.dtype must be one of'),
    ('ema_decay', 1.0, r'config.ema_decay must be in \[0, 1\)'),
    ('bn_batch_groups', 0, 'config.bn_batch_groups must be'),
    ('mesh_shape', (3, -1, 1), 'config.mesh_shape: mesh_shape must have 2 entries'),
    ('mesh_shape', (-1, -1), 'config.mesh_shape: mesh_shape entries must be positive'),
    ('init_from', '/nonexistent/ckpt', 'config.init_from'),
    ('lr_noise', (0.9, 0.42), r'config.lr_noise must be \(\) \(off\)'),
    ('lr_noise', (0.1, 0.5, 0.9), 'config.lr_noise must be'),
    ('lr_noise', (0.42, 1.5), 'config.lr_noise must be'),
])
def test_validate_config_names_the_field(field, value, match):
  config = train_test_utils.tiny_config(**{field: value})
  with pytest.raises(train_lib.ConfigError, match=match):
    train_lib.validate_config(config)


def test_default_config_has_exactly_the_trainer_fields():
  from configs import default  # pylint: disable=g-import-not-at-top
  assert set(default.get_config().keys()) == set(train_lib.FIELDS)


def test_config_lacking_fields_is_named():
  config = train_test_utils.tiny_config()
  del config['rmsprop_eps']
  del config['hflip']
  with pytest.raises(train_lib.ConfigError,
                     match='config lacks config.hflip, config.rmsprop_eps'):
    train_lib.validate_config(config)


def test_missing_field_is_named():
  config = train_test_utils.tiny_config()
  del config['checkpoint_every_steps']
  with pytest.raises(train_lib.ConfigError,
                     match='config.checkpoint_every_steps is missing'):
    train_lib.validate_config(config)


@pytest.mark.parametrize('field,value,devices,processes,match', [
    ('batch_size', 12, 8, 1, 'batch_size=12 is not divisible by the 8 devices'),
    ('eval_batch_size', 20, 8, 1, 'eval_batch_size=20 is not divisible'),
    ('batch_size', 40, 8, 16, 'batch_size=40 is not divisible by the 16 processes'),
    ('mesh_shape', (3, -1), 8, 1, 'config.mesh_shape.*does not fit 8 devices'),
    ('mesh_shape', (2, 2), 8, 1, 'config.mesh_shape.*there are 8'),
    ('bn_batch_groups', 5, 8, 1, 'not divisible by config.bn_batch_groups=5'),
])
def test_validate_devices_names_the_field(field, value, devices, processes,
                                          match):
  config = train_test_utils.tiny_config(
      **{'batch_size': 32, 'eval_batch_size': 32, field: value})
  with pytest.raises(train_lib.ConfigError, match=match):
    train_lib.validate_devices(config, devices, processes)


def test_batch_not_divisible_by_devices_fails_in_train_and_evaluate(
    tmp_path, fake_pipeline, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  config = train_test_utils.tiny_config(batch_size=12)
  with pytest.raises(train_lib.ConfigError, match='not divisible by the 8'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_unknown_dataset_fails_before_compute(tmp_path, fake_pipeline):
  config = train_test_utils.tiny_config(dataset='no_such_dataset')
  with pytest.raises(train_lib.ConfigError, match="config.dataset='no_such"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_bad_model_override_fails_before_compute(tmp_path, fake_pipeline):
  config = train_test_utils.tiny_config(
      model_overrides={'blocks': train_test_utils.TINY_BLOCKS, 'width': 2.0})
  with pytest.raises(train_lib.ConfigError,
                     match="config.model_overrides.*'width'"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_unknown_split_fails_before_compute(tmp_path, fake_pipeline):
  config = train_test_utils.tiny_config(eval_split='validation')
  with pytest.raises(train_lib.ConfigError,
                     match="config.eval_split='validation' is not a split"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))


def _snapshot(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
  return out


def test_workdir_of_another_model_is_refused_untouched(tmp_path,
                                                       fake_pipeline):
  workdir = tmp_path / 'w'
  mngr = ckpt_lib.train_checkpoint_manager(workdir / 'checkpoints', keep=2,
                                           keep_best=1, async_save=False)
  mngr.save(7, args=ocp.args.Composite(**{
      ckpt_lib.STATE: ocp.args.StandardSave({'step': np.int32(7)}),
      ckpt_lib.META: ocp.args.JsonSave({
          'model': 'ghostnet_100', 'num_classes': 1000,
          'signature': {'num_arrays': 1, 'shapes_sha256': 'x'}}),
  }))
  mngr.close()
  (workdir / 'config.json').write_text('{"model": "ghostnet_100"}\n')
  before = _snapshot(workdir)
  config = train_test_utils.tiny_config()
  with pytest.raises(train_lib.ConfigError,
                     match="checkpoints of another model.*'ghostnet_100'"):
    train_lib.train_and_evaluate(config, str(workdir))
  after = _snapshot(workdir)
  after.pop('train.lock')  # the writer's lock (ghostnet_jax/workdir_lock.py)
  assert after == before


# ------------------------------------------------------------------------------
# Training runs (a tiny GhostNet on 16x16 digits, one device)
# ------------------------------------------------------------------------------


def test_sigterm_sets_the_preemption_flag_and_handler_is_restored():
  import signal  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGTERM)
  from ghostnet_jax import interrupts  # pylint: disable=g-import-not-at-top
  p = interrupts.Interrupts(enable=True)
  assert not p.requested
  os.kill(os.getpid(), signal.SIGTERM)
  assert p.requested
  p.restore()
  assert signal.getsignal(signal.SIGTERM) is before
  assert not interrupts.Interrupts(enable=False).requested


@pytest.mark.slow
def test_preempt_at_10_and_resume_to_20_equals_straight_run(
    tmp_path, compilation_cache):
  # EMA, dropout, label smoothing, momentum and a cosine schedule all carry
  # state across the interruption. One worker process runs: a straight
  # 20-step run; the same config interrupted by SIGTERM during step 10; the
  # same command again, which resumes.
  config = dict(num_train_steps=20, checkpoint_every_steps=7,
                eval_every_steps=0, log_every_steps=5, ema_decay=0.9,
                dropout=0.2)
  straight, first, resumed = train_test_utils.run_worker({
      'devices': 1, 'fake_input': True,
      'compilation_cache': compilation_cache, 'runs': [
          {'workdir': str(tmp_path / 'straight'), 'config': config},
          {'workdir': str(tmp_path / 'resumed'), 'config': config,
           'sigterm_at': 10},
          {'workdir': str(tmp_path / 'resumed'), 'config': config},
      ]})
  assert first['preempted'] and first['step'] == 10
  assert resumed['step'] == straight['step'] == 20
  # Same computation on the same device: equal up to run-to-run rounding.
  np.testing.assert_allclose(resumed['train_loss'], straight['train_loss'],
                             rtol=1e-6)
  assert resumed['top1'] == straight['top1']
  a = ckpt_lib.restore_workdir(tmp_path / 'straight', 'latest')
  b = ckpt_lib.restore_workdir(tmp_path / 'resumed', 'latest')
  assert a['step'] == b['step'] == 20
  print('resume vs straight: loss', resumed['train_loss'],
        straight['train_loss'])
  chex.assert_trees_all_close(a['variables'], b['variables'], rtol=1e-6,
                              atol=1e-7)
  chex.assert_trees_all_close(a['ema_variables'], b['ema_variables'],
                              rtol=1e-6, atol=1e-7)
  # The preemption save (10) is what the resumed run started from, and the
  # CSV of the resumed run has each step once.
  with open(tmp_path / 'resumed' / 'metrics.csv') as f:
    steps = [int(line.split(',')[0]) for line in f.readlines()[1:]]
  assert steps == [5, 10, 15, 20, 20]  # train rows, then the final eval row
  with open(tmp_path / 'straight' / 'metrics.csv') as f:
    assert steps == [int(line.split(',')[0]) for line in f.readlines()[1:]]


@pytest.mark.slow
def test_init_from_converted_then_refuse_other_architecture(tmp_path,
                                                           fake_pipeline):
  # A converted checkpoint of the same (tiny) architecture with 1000 classes.
  from ghostnet_jax import utils  # pylint: disable=g-import-not-at-top
  big = train_lib.model_from_config(train_test_utils.tiny_config(), 1000)
  converted = jax.device_get(utils.init_variables(big, 7, image_size=16))
  ckpt_lib.save_converted(tmp_path / 'converted', converted,
                          {'model': 'ghostnet_050', 'num_classes': 1000})
  # Two steps at a negligible learning rate: the backbone stays the converted
  # one, the classifier is re-initialised for 10 classes.
  config = train_test_utils.tiny_config(
      num_train_steps=2, init_from=str(tmp_path / 'converted'),
      learning_rate=1e-9)
  train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  params = ckpt_lib.restore_workdir(tmp_path / 'w', 'latest')['variables'][
      'params']
  assert params['classifier']['kernel'].shape == (1280, 10)
  backbone = {k: v for k, v in params.items() if k != 'classifier'}
  chex.assert_trees_all_close(
      backbone, {k: v for k, v in converted['params'].items()
                 if k != 'classifier'}, atol=1e-6)

  # The workdir now holds this architecture: another one is refused.
  before = _snapshot(tmp_path / 'w')
  wider = train_test_utils.tiny_config(
      num_train_steps=4,
      model_overrides={'blocks': (((3, 16, 16, 0.0, 1),),
                                  ((3, 64, 32, 0.25, 2),))})
  with pytest.raises(train_lib.ConfigError, match='another model'):
    train_lib.train_and_evaluate(wider, str(tmp_path / 'w'))
  assert _snapshot(tmp_path / 'w') == before


def test_bf16_compute_keeps_float32_parameters():
  config = train_test_utils.tiny_config(dtype='bfloat16')
  model = train_lib.model_from_config(config, 10)
  tx = optax.sgd(0.1)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
  state = train_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=jax.eval_shape(tx.init, variables['params']))
  step = train_lib.make_train_step(
      model, tx, optax.constant_schedule(0.1), num_classes=10,
      label_smoothing=0.1, ema_decay=0.0, seed=0)
  batch = {'image': jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
  new_state, metrics = jax.eval_shape(step, state, batch)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(new_state.params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert metrics['train_loss'].dtype == jnp.float32
  # And the convolutions really run in bfloat16.
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, batch['image'])
  convs = [e for e in jaxpr.jaxpr.eqns
           if e.primitive.name in ('conv_general_dilated', 'dot_general')]
  assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16
                       for e in convs[:3])


@pytest.mark.parametrize('name', ['default', 'ghostnet_100_imagenet',
                                  'ghostnetv2_100_imagenet',
                                  'ghostnetv3_100_imagenet',
                                  'g_ghost_regnetx_032_imagenet'])
def test_configs_parse_and_validate(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from ghostnet_jax import registry  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  for field in train_lib.REQUIRED_FIELDS:
    assert field in config
  assert config.num_train_steps > 0 or config.num_epochs > 0
  if config.model in registry.list_models():
    train_lib.validate_config(config)
  else:  # a family merged from another branch
    with pytest.raises(train_lib.ConfigError, match='Unknown model'):
      train_lib.validate_config(config)


# ------------------------------------------------------------------------------
# The CLI end to end on the real digits pipeline
# ------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_py_end_to_end_and_restore_workdir(tmp_path, digits_dir):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(train_test_utils.ROOT, 'train.py'),
         '--config', os.path.join(train_test_utils.HERE,
                                  'tiny_digits_config.py'),
         '--workdir', str(workdir), f'--config.data_dir={digits_dir}',
         '--config.num_train_steps=6']
  proc = subprocess.run(cmd, env=train_test_utils.worker_env(),
                        cwd=train_test_utils.ROOT, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 6
  for key in ('train_loss', 'top1', 'top5'):
    assert np.isfinite(final[key]), key
  assert 0 <= final['top1'] <= final['top5'] <= 1
  assert final['eval_examples'] == 359  # the digits test split, once each
  assert f'top-1 {100 * final["top1"]:.2f}%' in proc.stdout
  assert str(workdir / 'metrics.png') in proc.stdout
  with open(workdir / 'metrics.csv') as f:
    header = f.readline().strip().split(',')
    rows = f.readlines()
  assert header == list(train_logging.CSV_COLUMNS)
  assert len(rows) == 3 + 2  # train rows at 2, 4, 6; eval rows at 3, 6
  assert any(p.startswith('events.out.tfevents')
             for p in os.listdir(workdir / 'tensorboard'))
  assert (workdir / 'metrics.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model'] == 'ghostnet_050' and config['num_train_steps'] == 6

  # The same command again finds the run finished and changes nothing (but
  # the writer's lock, ghostnet_jax/workdir_lock.py, which it takes and
  # releases).
  before = _snapshot(workdir)
  before.pop('train.lock')
  again = subprocess.run(cmd, env=train_test_utils.worker_env(),
                         cwd=train_test_utils.ROOT, capture_output=True,
                         text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-5000:]
  assert 'already holds a finished run (6 of 6 steps)' in again.stdout
  after = _snapshot(workdir)
  after.pop('train.lock')
  assert after == before

  # What eval.py does: restore the best checkpoint and its config, rebuild
  # model and data, and get the top-1 the trainer reported.
  restored = ckpt_lib.restore_workdir(workdir, 'best')
  assert restored['step'] in (3, 6)
  assert restored['metrics']['top1'] == pytest.approx(max(
      float(r.split(',')[train_logging.CSV_COLUMNS.index('eval_top1')])
      for r in rows if r.split(',')[2] == ''), rel=1e-5)  # CSV: 6 digits
  assert restored['ema_variables'] is None
  cfg, meta = restored['config'], restored['meta']
  assert meta['num_classes'] == 10 and len(meta['class_names']) == 10
  model = train_lib.model_from_config(cfg, meta['num_classes'])
  from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  correct = count = 0
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for batch in input_pipeline.eval_iterator(
      dataset=meta['dataset_name'], data_dir=cfg.data_dir,
      split=cfg.eval_split, global_batch_size=cfg.eval_batch_size,
      image_size=cfg.image_size, crop_fraction=cfg.eval_crop_fraction,
      interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std):
    pred = np.asarray(apply(restored['variables'], batch['image'])).argmax(-1)
    correct += float(((pred == batch['label']) * batch['mask']).sum())
    count += float(batch['mask'].sum())
  assert count == 359
  np.testing.assert_allclose(correct / count, restored['metrics']['top1'],
                             atol=1e-9)


def test_default_workdir_name():
  import train  # pylint: disable=g-import-not-at-top
  assert train.default_workdir('configs/default.py') == os.path.join(
      'workdirs', 'default')
  assert train.default_workdir('/x/configs/ghostnet_100_imagenet.py:smoke') == (
      os.path.join('workdirs', 'ghostnet_100_imagenet'))


def test_lr_noise_has_timms_range_and_distribution():
  """``config.lr_noise`` against timm's StepLRScheduler with ``noise``: the
  same epochs are perturbed, each epoch by one factor, with the same
  distribution of factors (timm draws with torch, we with JAX)."""
  import torch
  from ghostnet_jax.testing.torch_reference import import_timm
  import_timm()
  from timm.scheduler import StepLRScheduler as step_lr
  epochs, per_epoch, pct = 4000, 3, 0.67
  base = optim.make_schedule(schedule='step', learning_rate=0.064,
                             total_steps=epochs * per_epoch,
                             decay_steps=2.4 * per_epoch, decay_rate=0.9995)
  noisy = optim.with_lr_noise(base, steps_per_epoch=per_epoch,
                              total_epochs=epochs, noise_range=(0.42, 0.9),
                              pct=pct, seed=0)
  steps = np.arange(epochs * per_epoch)
  ours = np.asarray(jax.jit(jax.vmap(noisy))(steps)) / np.asarray(
      jax.jit(jax.vmap(base))(steps)) - 1
  ours = ours.reshape(epochs, per_epoch)
  np.testing.assert_allclose(ours, ours[:, :1].repeat(per_epoch, 1),
                             atol=1e-6)  # one factor per epoch
  ours = ours[:, 0]

  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.064)
  sched = step_lr(opt, decay_t=2.4, decay_rate=0.9995,
                  noise_range_t=(0.42 * epochs, 0.9 * epochs), noise_pct=pct,
                  noise_seed=0)
  plain = step_lr(torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                  lr=0.064), decay_t=2.4, decay_rate=0.9995)
  theirs = np.array([  # pylint: disable=protected-access
      sched._add_noise(plain._get_lr(e), e)[0] / plain._get_lr(e)[0] - 1
      for e in range(epochs)])
  on_ours, on_theirs = ours != 0, np.abs(theirs) > 0
  np.testing.assert_array_equal(on_ours, on_theirs)  # the same epochs
  assert on_ours.sum() == 1920  # [1680, 3600)
  a, b = ours[on_ours], theirs[on_theirs]
  assert np.abs(a).max() < pct and np.abs(b).max() < pct
  assert abs(a.mean()) < 0.02 and abs(b.mean()) < 0.02
  print(f"LR_NOISE std ours {a.std():.4f} timm {b.std():.4f}, mean {a.mean():.4f} {b.mean():.4f}")
  assert abs(a.std() / b.std() - 1) < 0.05, (a.std(), b.std())
  assert abs(np.mean(np.abs(a) > 0.5) - np.mean(np.abs(b) > 0.5)) < 0.03
  # Fixed by the seed; another seed, other factors.
  again = optim.with_lr_noise(base, steps_per_epoch=per_epoch,
                              total_epochs=epochs, noise_range=(0.42, 0.9),
                              pct=pct, seed=0)
  other = optim.with_lr_noise(base, steps_per_epoch=per_epoch,
                              total_epochs=epochs, noise_range=(0.42, 0.9),
                              pct=pct, seed=1)
  assert float(again(6000)) == float(noisy(6000))
  assert float(other(6000)) != float(noisy(6000))


@pytest.mark.slow
def test_ghostnetv3_is_evaluated_in_its_deploy_form(monkeypatch):
  """The trainer evaluates a GhostNetV3 trained in its re-parameterisable
  form through the folded deploy model, with the same results."""
  from ghostnet_jax import evaluation, registry
  from ghostnet_jax import sharding as shd
  model = registry.create_model('ghostnetv3_050', num_classes=10)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 40, 40, 3)).astype(np.float32)
  batch = {'image': x, 'label': rng.integers(0, 10, 8).astype(np.int32),
           'mask': np.ones(8, np.float32)}
  v = jax.jit(model.init)(jax.random.key(0), x[:1])
  # Running statistics away from (0, 1), so folding them matters.
  v['batch_stats'] = jax.tree_util.tree_map(
      lambda a: a + rng.uniform(0.1, 0.5, a.shape).astype(a.dtype),
      v['batch_stats'])
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32),
                               params=v['params'],
                               batch_stats=v['batch_stats'], opt_state=None)

  class Data:
    def eval_batches(self):
      return iter([batch])

  used = []
  compiled = evaluation.compiled_eval_step
  monkeypatch.setattr(evaluation, 'compiled_eval_step',
                      lambda m, *a, **k: used.append(m) or compiled(m, *a, **k))
  mesh = shd.make_mesh((-1, 1))
  got = train_lib.evaluate_state(model, state, Data(), 10, mesh)
  assert [m.deploy for m in used] == [True]
  want = evaluation.evaluate_batches(model, v, [batch], num_classes=10,
                                     mesh=mesh)
  np.testing.assert_allclose(got['eval_loss'], want['loss'] / 8, rtol=1e-5)
  assert got['eval_top1'] == want['top1'] / 8
  assert got['eval_top5'] == want['top5'] / 8
