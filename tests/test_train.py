"""Tests of the trainer on one device: optimisers, sharding rules, validation,
resume after preemption, the default run end to end, restore_workdir.

Multi-device and multi-process tests are in test_train_multidevice.py.
"""

import json
import os
import signal
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fake_input
import train_test_utils
from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import optim
from ghostnet_jax import sharding as shd
from ghostnet_jax import train_lib
from ghostnet_jax import train_logging


@pytest.fixture
def fake_pipeline(monkeypatch):
  monkeypatch.setattr(train_lib, 'input_pipeline', fake_input)
  return fake_input


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
    ('mesh_shape', (3, -1, 1), 'config.mesh_shape'),
    ('init_from', '/nonexistent/ckpt', 'config.init_from'),
])
def test_validate_config_names_the_field(field, value, match):
  config = train_test_utils.tiny_config(**{field: value})
  with pytest.raises(train_lib.ConfigError, match=match):
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
  assert _snapshot(workdir) == before


# ------------------------------------------------------------------------------
# Training runs (a tiny GhostNet on 16x16 digits, one device)
# ------------------------------------------------------------------------------


def _sigterm_at(step_to_stop):
  """A pipeline whose train iterator sends SIGTERM when fetching a batch."""

  def train_iterator(**kwargs):
    step = kwargs['start_step']
    for batch in fake_input.train_iterator(**kwargs):
      if step == step_to_stop - 1:  # the batch of the step_to_stop-th step
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
      step += 1

  return types.SimpleNamespace(
      get_dataset_info=fake_input.get_dataset_info,
      eval_iterator=fake_input.eval_iterator, train_iterator=train_iterator)


def test_preempt_at_10_and_resume_to_20_equals_straight_run(tmp_path,
                                                            monkeypatch):
  # EMA, dropout, label smoothing, momentum and a cosine schedule all carry
  # state across the interruption.
  config = train_test_utils.tiny_config(
      num_train_steps=20, checkpoint_every_steps=7, eval_every_steps=0,
      log_every_steps=5, ema_decay=0.9, dropout=0.2)
  monkeypatch.setattr(train_lib, 'input_pipeline', fake_input)
  straight = train_lib.train_and_evaluate(config, str(tmp_path / 'straight'))

  monkeypatch.setattr(train_lib, 'input_pipeline', _sigterm_at(10))
  first = train_lib.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert first['preempted'] and first['step'] == 10
  assert not (tmp_path / 'resumed' / 'final_metrics.json').exists()
  assert sorted(int(p) for p in os.listdir(tmp_path / 'resumed' /
                                           'checkpoints')
                if p.isdigit()) == [7, 10]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

  monkeypatch.setattr(train_lib, 'input_pipeline', fake_input)
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed['step'] == straight['step'] == 20
  # Same computation on the same device: equal up to run-to-run rounding.
  np.testing.assert_allclose(resumed['train_loss'], straight['train_loss'],
                             rtol=1e-6)
  np.testing.assert_allclose(resumed['top1'], straight['top1'], atol=1e-9)
  a = ckpt_lib.restore_workdir(tmp_path / 'straight', 'latest')
  b = ckpt_lib.restore_workdir(tmp_path / 'resumed', 'latest')
  assert a['step'] == b['step'] == 20
  chex.assert_trees_all_close(a['variables'], b['variables'], rtol=1e-6,
                              atol=1e-7)
  chex.assert_trees_all_close(a['ema_variables'], b['ema_variables'],
                              rtol=1e-6, atol=1e-7)
  # The CSV of the resumed run has each step once.
  with open(tmp_path / 'resumed' / 'metrics.csv') as f:
    steps = [int(line.split(',')[0]) for line in f.readlines()[1:]]
  assert steps == sorted(steps) and steps[-1] == 20
  assert len([s for s in steps if s == 10]) == 1


def test_bad_resume_refuses_other_architecture(tmp_path, fake_pipeline):
  config = train_test_utils.tiny_config(num_train_steps=2)
  train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  before = _snapshot(tmp_path / 'w')
  wider = train_test_utils.tiny_config(
      num_train_steps=4,
      model_overrides={'blocks': train_test_utils.TINY_BLOCKS, 'width': 1.0})
  with pytest.raises(train_lib.ConfigError, match='another model'):
    train_lib.train_and_evaluate(wider, str(tmp_path / 'w'))
  assert _snapshot(tmp_path / 'w') == before
