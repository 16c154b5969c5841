"""Evaluates one tiny model on the mocked dataset over 4 and over 1 CPU
devices; prints one JSON line with both results (for test_eval.py).

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval_mock_data  # noqa: E402
from ghostnet_jax import create_model, eval_lib  # noqa: E402
from ghostnet_jax.utils import abstract_variables  # noqa: E402
from train_test_utils import TINY_BLOCKS  # noqa: E402


def random_variables(model, seed=0):
  """Random weights (N(0, 1/fan_in)) and BatchNorm statistics, in numpy."""
  rng = np.random.RandomState(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == 'var':
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if name in ('scale',):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if name in ('mean', 'bias'):
      return (0.1 * rng.randn(*x.shape)).astype(np.float32)
    fan_in = int(np.prod(x.shape[:-1]))
    return (rng.randn(*x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
      leaf, abstract_variables(model, image_size=32))


def main():
  assert jax.device_count() == 4, jax.devices()
  kwargs = {'blocks': TINY_BLOCKS, 'conv_impl': 'lax'}
  model = create_model('ghostnet_050', num_classes=eval_mock_data.N_CLASSES,
                       **kwargs)
  loaded = eval_lib.LoadedCheckpoint(
      kind='converted', path='random', model='ghostnet_050',
      num_classes=eval_mock_data.N_CLASSES,
      variables=random_variables(model), model_kwargs=kwargs)
  out = {}
  with eval_mock_data.mock():
    for n in (4, 1):
      r = eval_lib.evaluate(
          loaded, dataset='ghostnet_eval_mock', image_size=32,
          crop_fraction=1.0, batch_size=6, progress=False, return_logits=True,
          mesh=eval_lib.make_mesh(jax.devices()[:n]))
      r['logits'] = r['logits'].tolist()
      r['labels'] = r['labels'].tolist()
      out[n] = r
  print(json.dumps(out))


if __name__ == '__main__':
  main()
