"""Builds every ImageNet config's training step on 8 CPU devices.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; argv: the
config names. For each config, unchanged: the config validates; the real
input pipeline with the config's augmentations yields a batch from
``tfds.testing.mock_data`` imagenet2012 (8 examples, one per device, in this
process: the pipeline's worker processes and a 1024-image batch of random
mock images cost minutes and prove nothing more); the trainer's own builders
(mesh, model, optimizer, state shardings, the jitted step with the teacher
inside for GhostNetV3) lower that step for the 8-device mesh at the config's
global batch and image size. Compiling it (~100 s of CPU a config) is left
to the 8-device training tests, which compile the same step at small sizes.
Prints one JSON line per config.
"""

import importlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from ghostnet_jax import registry  # noqa: E402
from ghostnet_jax import sharding as shd  # noqa: E402
from ghostnet_jax import train_lib  # noqa: E402
from ghostnet_jax.train_lib import NonFiniteMonitor  # noqa: E402


def build(name: str) -> dict:
  t0 = time.perf_counter()
  config = importlib.import_module(f'configs.{name}').get_config()
  train_lib.validate_config(config)
  hosts = train_lib.setup_hosts(config)
  small = config.copy_and_resolve_references()
  small.batch_size, small.worker_count = hosts.num_devices, 0
  with tfds.testing.mock_data(num_examples=small.batch_size,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    data = train_lib.DataSource(small, hosts.process_index,
                                hosts.process_count)
    batch = next(data.train_batches(0))
  # The step at the config's global batch: the batch's shapes, batch axis
  # config.batch_size.
  batch = {k: np.zeros((config.batch_size,) + np.shape(v)[1:],
                       np.asarray(v).dtype) for k, v in batch.items()}
  length = train_lib.RunLength.of(config, data.train_size)
  model = train_lib.build_model(config, data.num_classes, hosts.num_devices)
  schedule, tx = train_lib.build_optimizer(config, length)
  teacher = None
  if name.startswith('ghostnetv3'):  # the recipe distils; any teacher will do
    t_model = registry.create_model('ghostnet_050',
                                    num_classes=data.num_classes)
    t_vars = jax.jit(t_model.init)(jax.random.key(1),
                                   np.zeros((1, 32, 32, 3), np.float32))
    teacher = train_lib.load_teacher(config, data.num_classes,
                                     (t_model, t_vars))
  factory = train_lib.StateFactory(config, model, tx, hosts.mesh)
  step = train_lib.compile_train_step(model, tx, schedule, config,
                                      data.num_classes, factory, hosts.mesh,
                                      teacher)
  bs = shd.batch_sharding(hosts.mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype,
                                            sharding=bs)
                    for k, v in batch.items()}
  health = NonFiniteMonitor.initial_health(shd.replicated(hosts.mesh))
  args = (factory.abstract_sharded(), health, abstract_batch)
  jitted = getattr(step, 'jitted', step)
  if teacher is not None:
    args += (step.teacher_variables,)
  lowered = jitted.lower(*args)
  text = lowered.as_text()
  return {
      'config': name, 'model': config.model, 'devices': hosts.num_devices,
      'mesh': list(hosts.mesh_shape),
      'batch': {k: [list(np.shape(v)), str(np.asarray(v).dtype)]
                for k, v in batch.items()},
      'num_partitions_8': 'mhlo.num_partitions = 8' in text,
      'teacher': teacher is not None,
      'augment': data.augment is not None,
      'image_size': config.image_size,
      'build_s': round(time.perf_counter() - t0, 1)}


if __name__ == '__main__':
  for config_name in sys.argv[1:]:
    print('BUILT ' + json.dumps(build(config_name)), flush=True)
