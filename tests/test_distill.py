"""Knowledge distillation (ghostnet_jax.distill) and its trainer hooks.

Fast: the loss against a numpy reference, the config checks, a class-count
mismatch refused before compute. Slow: a tiny run whose workdir then
teaches a second run (teacher top-1 logged, loss includes the KD term), the
teacher/teacher_model mismatch, and the same distillation on 8 CPU devices
with FSDP.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_test_utils
from ghostnet_jax import distill
from ghostnet_jax import registry
from ghostnet_jax import train_lib


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_soft_loss_matches_hand_computed_kl():
  rs = np.random.RandomState(0)
  s = rs.standard_normal((5, 7)).astype(np.float32) * 3
  t = rs.standard_normal((5, 7)).astype(np.float32) * 3
  for temp in (1.0, 2.0, 4.0):
    p = np.exp(_log_softmax(t / temp))
    want = temp ** 2 * (p * (np.log(p) - _log_softmax(s / temp))).sum(-1)
    got = distill.distill_loss(jnp.asarray(s), jnp.asarray(t), kind='soft',
                               temperature=temp)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Zero when the student equals the teacher; >= 0 always.
  same = distill.distill_loss(jnp.asarray(t), jnp.asarray(t), temperature=3.0)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-5)


def test_hard_loss_is_ce_against_teacher_argmax_and_no_teacher_gradient():
  rs = np.random.RandomState(1)
  s = rs.standard_normal((6, 4)).astype(np.float32)
  t = rs.standard_normal((6, 4)).astype(np.float32)
  want = -_log_softmax(s)[np.arange(6), t.argmax(-1)]
  got = distill.distill_loss(jnp.asarray(s), jnp.asarray(t), kind='hard')
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  g_teacher = jax.grad(lambda tt: distill.distill_loss(
      jnp.asarray(s), tt, kind='soft', temperature=2.0).sum())(jnp.asarray(t))
  assert not np.asarray(g_teacher).any()
  g_student = jax.grad(lambda ss: distill.distill_loss(
      ss, jnp.asarray(t), kind='soft').sum())(jnp.asarray(s))
  # d KL / d s = softmax(s) - softmax(t) at T = 1.
  np.testing.assert_allclose(
      np.asarray(g_student),
      np.exp(_log_softmax(s)) - np.exp(_log_softmax(t)), atol=1e-6)


@pytest.mark.parametrize('field,value,match', [
    ('distill_type', 'kl', 'config.distill_type'),
    ('distill_weight', -1.0, 'config.distill_weight'),
    ('distill_temperature', 0.0, 'config.distill_temperature'),
    ('teacher_model', 'no_such_net', 'config.teacher_model'),
    ('teacher', '/no/such/teacher.pth', 'config.teacher: no checkpoint'),
])
def test_validate_config_names_the_distill_field(field, value, match):
  config = train_test_utils.tiny_config(**{field: value})
  with pytest.raises(train_lib.ConfigError, match=match):
    train_lib.validate_config(config)


def _tiny_module(num_classes):
  return registry.create_model(
      'ghostnet_050', num_classes=num_classes,
      blocks=train_test_utils.TINY_BLOCKS, conv_impl='lax')


def test_teacher_module_with_other_class_count_fails_before_compute(
    tmp_path, fake_pipeline):
  module = _tiny_module(7)
  variables = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
  config = train_test_utils.tiny_config()
  with pytest.raises(train_lib.ConfigError,
                     match='predicts 7 classes but the dataset has 10'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'),
                                 teacher=(module, variables))
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_workdir_teaches_a_student(tmp_path, fake_pipeline, capsys):
  teacher_dir = str(tmp_path / 'teacher')
  t = train_lib.train_and_evaluate(
      train_test_utils.tiny_config(num_train_steps=6, eval_every_steps=0),
      teacher_dir)
  assert t['top1'] is not None
  capsys.readouterr()
  # A checkpoint that is not teacher_model: refused before compute.
  with pytest.raises(train_lib.ConfigError,
                     match='config.teacher / config.teacher_model'):
    train_lib.train_and_evaluate(
        train_test_utils.tiny_config(teacher=teacher_dir,
                                     teacher_model='ghostnetv2_100'),
        str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()
  # The student: CE + KD; the teacher's eval top-1 is logged at the start.
  runs = {}
  for name, extra in (('plain', {}), ('kd', {'teacher': teacher_dir})):
    runs[name] = train_lib.train_and_evaluate(
        train_test_utils.tiny_config(num_train_steps=2, eval_every_steps=0,
                                     **extra), str(tmp_path / name))
    out = capsys.readouterr().out
    if name != 'plain':
      line = [s for s in out.splitlines() if s.startswith('Teacher ')]
      assert line == [f'Teacher ghostnet_050: test top-1 '
                      f'{100 * t["top1"]:.2f}%'], out
  # Same seed, same data, same init: the KD term only adds to the loss.
  assert runs['kd']['train_loss'] > runs['plain']['train_loss']
  with open(os.path.join(tmp_path, 'kd', 'config.json')) as f:
    assert json.load(f)['teacher'] == teacher_dir


@pytest.mark.slow
def test_distillation_under_fsdp_on_8_devices(tmp_path, compilation_cache):
  teacher_dir = str(tmp_path / 'teacher')
  common = dict(batch_size=16, eval_batch_size=64, num_train_steps=2,
                eval_every_steps=0, mesh_shape=[4, 2], fsdp_min_size=16)
  teacher, student = train_test_utils.run_worker({
      'devices': 8, 'fake_input': True,
      'compilation_cache': compilation_cache, 'runs': [
          {'workdir': teacher_dir, 'config': common},
          {'workdir': str(tmp_path / 'student'),
           'config': {**common, 'teacher': teacher_dir,
                      'distill_temperature': 2.0}},
      ]})
  assert teacher['step'] == student['step'] == 2
  assert np.isfinite(student['train_loss'])
