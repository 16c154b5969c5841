"""Tests of the trainer's parts on their own: the non-finite monitor, the
checkpointer, and a run with an injected data source and model."""

import errno
import itertools

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_test_utils
from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import sharding as shd
from ghostnet_jax import train_lib


def _health(count, first):
  return jax.device_put({'first_step': np.int32(first),
                         'count': np.int32(count)})


# ------------------------------------------------------------------------------
# NonFiniteMonitor
# ------------------------------------------------------------------------------


def test_monitor_initial_health_is_zero_and_passes():
  mesh = shd.make_mesh((-1, 1))
  health = train_lib.NonFiniteMonitor.initial_health(shd.replicated(mesh))
  assert {k: int(v) for k, v in jax.device_get(health).items()} == {
      'first_step': 0, 'count': 0}
  monitor = train_lib.NonFiniteMonitor(
      health, skip=False, describe=lambda s: pytest.fail('no bad step'))
  monitor.check(3)
  assert monitor.skipped == 0


def test_monitor_raises_naming_the_first_bad_step():
  monitor = train_lib.NonFiniteMonitor(
      _health(count=2, first=5), skip=False,
      describe=lambda s: f'bad at {s}')
  with pytest.raises(train_lib.NonFiniteLossError, match='bad at 5') as e:
    monitor.check(6)
  assert e.value.step == 5


def test_monitor_with_skip_logs_each_new_count_once():
  lines = []
  monitor = train_lib.NonFiniteMonitor(
      _health(count=1, first=3), skip=True,
      describe=lambda s: pytest.fail('skipping never raises'),
      log=lines.append)
  monitor.check(4)
  monitor.check(4)  # the same step: not looked at again
  monitor.check(5)  # no new bad step: nothing to say
  assert monitor.skipped == 1 and len(lines) == 1
  assert 'Skipped 1 step(s)' in lines[0] and 'first at step 3' in lines[0]
  monitor.health = _health(count=3, first=3)
  monitor.check(8)
  assert monitor.skipped == 3 and len(lines) == 2
  assert 'Skipped 2 step(s)' in lines[1] and 'up to step 8' in lines[1]


# ------------------------------------------------------------------------------
# Checkpointer
# ------------------------------------------------------------------------------


def _manager(tmp_path):
  return ckpt_lib.train_checkpoint_manager(
      tmp_path / 'checkpoints', keep=2, keep_best=1, async_save=False)


def test_checkpointer_saves_meta_and_restores_the_state(tmp_path):
  ckpt = train_lib.Checkpointer(_manager(tmp_path), {'model': 'm'})
  state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
           'step': np.int32(2)}
  ckpt.save(2, state, metrics={'top1': 0.5})
  ckpt.wait()
  assert ckpt.committed_steps() == [2] and ckpt.best_step() == 2
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  restored = ckpt.restore(2, abstract)
  np.testing.assert_array_equal(restored['w'], state['w'])
  ckpt.close()
  with ocp.CheckpointManager(
      str(tmp_path / 'checkpoints'),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers=ckpt_lib.item_handlers()) as mngr:
    meta = mngr.restore(2, args=ocp.args.Composite(**{
        ckpt_lib.META: ocp.args.JsonRestore()}))[ckpt_lib.META]
  assert meta == {'model': 'm', 'step': 2}


def test_checkpointer_asks_before_every_save(tmp_path):
  def refuse(step):
    raise train_lib.NonFiniteLossError(f'step {step} is bad', step)

  ckpt = train_lib.Checkpointer(_manager(tmp_path), {}, before_save=refuse)
  with pytest.raises(train_lib.NonFiniteLossError, match='step 4'):
    ckpt.save(4, {'w': np.zeros(2, np.float32)})
  ckpt.wait()
  assert ckpt.committed_steps() == [] and ckpt.saves == []
  ckpt.close()


def test_checkpointer_turns_a_failed_write_into_a_named_error(tmp_path):
  (tmp_path / 'checkpoints' / '2').mkdir(parents=True)  # committed before

  class FullDisk:
    directory = tmp_path / 'checkpoints'

    def save(self, *args, **kwargs):
      raise OSError(errno.ENOSPC, 'No space left on device')

  ckpt = train_lib.Checkpointer(FullDisk(), {})
  with pytest.raises(train_lib.CheckpointWriteError) as e:
    ckpt.save(4, {'w': np.zeros(2, np.float32)})
  msg = str(e.value)
  for words in ('step 4', 'No space left', 'steps [2]',
                'resume from step 2'):
    assert words in msg, (words, msg)


# ------------------------------------------------------------------------------
# Injection: the trainer takes its data source and model as arguments
# ------------------------------------------------------------------------------


class _ArrayData:
  """A :class:`train_lib.Data` of fixed random arrays: no input pipeline."""
  dataset = 'arrays'
  num_classes = 10
  train_size = 64
  class_names = None

  def __init__(self, image_size, batch_size, eval_size=24):
    rng = np.random.RandomState(0)
    self.train = [{'image': rng.randn(batch_size, image_size, image_size,
                                      3).astype(np.float32),
                   'label': rng.randint(0, 10, batch_size).astype(np.int32)}
                  for _ in range(2)]
    n = eval_size
    self.eval = {'image': rng.randn(n, image_size, image_size,
                                    3).astype(np.float32),
                 'label': rng.randint(0, 10, n).astype(np.int32),
                 'mask': np.r_[np.ones(n - 4), np.zeros(4)].astype(np.float32)}
    self.started_at = []

  def train_batches(self, start_step):
    self.started_at.append(start_step)
    return itertools.cycle(self.train)

  def eval_batches(self):
    return iter([self.eval])


def test_train_and_evaluate_uses_the_data_and_model_it_is_given(tmp_path):
  config = train_test_utils.tiny_config(
      dataset='not_a_dataset_the_pipeline_knows', num_train_steps=2,
      checkpoint_every_steps=2, eval_batch_size=24,
      async_checkpointing=False)
  data = _ArrayData(config.image_size, config.batch_size)
  # One stage instead of the config's two.
  model = train_lib.model_from_config(
      config, 10, blocks=(((3, 16, 16, 0.0, 1),),))
  final = train_lib.train_and_evaluate(config, str(tmp_path / 'w'),
                                       data=data, model=model)
  assert data.started_at == [0]
  assert final['step'] == 2 and final['eval_examples'] == 20
  restored = ckpt_lib.restore_workdir(tmp_path / 'w', 'latest')
  params = restored['variables']['params']
  from ghostnet_jax import utils  # pylint: disable=g-import-not-at-top
  shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
  assert shapes(params) == shapes(utils.abstract_variables(model, 16)['params'])
  assert shapes(params) != shapes(utils.abstract_variables(
      train_lib.model_from_config(config, 10), 16)['params'])
  assert restored['meta']['dataset_name'] == 'arrays'
