"""Host initialisation: the same variables' shapes and distributions as
compiling ``model.init``, without compiling."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostnet_jax import create_model, init_variables
from ghostnet_jax import initializers
from ghostnet_jax import utils
from ghostnet_jax.layers import Conv2d


@pytest.mark.parametrize('name', ['ghostnet_050', 'ghostnetv2_100',
                                  'ghostnetv3_050', 'g_ghost_regnetx_002',
                                  'ghost_resnet50_s4'])
def test_every_family_initialises_on_the_host_like_model_init(name):
  model = create_model(name)
  host = initializers.host_initialise(utils.init_fn(model, 64),
                                      jax.random.key(0))
  assert host is not None, f'{name} has an initialiser without a host form'
  abstract = utils.abstract_variables(model, 64)
  flat_host = utils.flatten_tree(host)
  flat_abs = utils.flatten_tree(abstract)
  assert list(flat_host) == list(flat_abs)  # same paths, same order
  for path, a in flat_abs.items():
    h = flat_host[path]
    assert isinstance(h, np.ndarray), path
    assert (h.shape, h.dtype) == (a.shape, a.dtype), path
    assert np.isfinite(h).all(), path
    if path[0] == 'batch_stats':
      np.testing.assert_array_equal(h, 0.0 if path[-1] == 'mean' else 1.0)
    elif path[-1] == 'scale' or (path[-1] == 'bias' and 'bn' in str(path)):
      assert np.unique(h).size == 1, path  # BatchNorm affine: constants
    elif path[-1] == 'kernel' and h.size > 64:
      assert h.std() > 0, path  # drawn, not a constant


@pytest.mark.parametrize('init', [
    initializers.VarianceScaling(1.0 / 3.0, 'fan_in', 'uniform'),
    initializers.VarianceScaling(2.0, 'fan_out', 'normal'),
    initializers.VarianceScaling(1.0, 'fan_avg', 'truncated_normal'),
    initializers.Uniform(0.25),
], ids=['torch_default', 'he_fan_out', 'truncated', 'uniform'])
def test_host_draws_match_flax_draws_in_distribution(init):
  shape = (3, 3, 48, 96)  # 41,472 draws
  flax_draws = np.asarray(init(jax.random.key(1), shape, jnp.float32))
  token = initializers._HOST_RNG.set(np.random.default_rng(1))
  try:
    host_draws = init(None, shape, jnp.float32)
  finally:
    initializers._HOST_RNG.reset(token)
  assert host_draws.dtype == np.float32 and host_draws.shape == shape
  assert abs(host_draws.mean() - flax_draws.mean()) < 0.02 * flax_draws.std()
  np.testing.assert_allclose(host_draws.std(), flax_draws.std(), rtol=0.02)
  q = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
  np.testing.assert_allclose(np.quantile(host_draws, q),
                             np.quantile(flax_draws, q),
                             atol=0.05 * flax_draws.std())
  if getattr(init, 'distribution', 'uniform') != 'normal':  # bounded support
    np.testing.assert_allclose(np.abs(host_draws).max(),
                               np.abs(flax_draws).max(), rtol=0.01)


def test_seeds_are_reproducible_and_distinct():
  model = create_model('ghostnet_050')
  a = init_variables(model, 0, image_size=32)
  b = init_variables(model, jax.random.key(0), image_size=32)
  c = init_variables(model, 1, image_size=32)
  kernel = ('params', 'conv_stem', 'kernel')
  fa, fb, fc = (utils.flatten_tree(v) for v in (a, b, c))
  for path in fa:
    np.testing.assert_array_equal(fa[path], fb[path])
  assert not np.array_equal(fa[kernel], fc[kernel])
  assert isinstance(fa[kernel], jax.Array)


class _OwnInit(nn.Module):
  """Research code: Flax's default (lecun_normal) kernel init."""

  @nn.compact
  def __call__(self, x, train=False):
    x = Conv2d(8, 3)(x)
    return nn.Dense(4)(x.mean((1, 2)))


def test_other_initialisers_fall_back_to_compiling_model_init():
  model = _OwnInit()
  init = utils.init_fn(model, 16)
  assert initializers.host_initialise(init, jax.random.key(0)) is None
  got = init_variables(model, 0, image_size=16)
  want = jax.jit(init)(jax.random.key(0))
  for (p, g), (q, w) in zip(utils.flatten_tree(got).items(),
                            utils.flatten_tree(want).items()):
    assert p == q
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_apply_with_a_wrongly_shaped_parameter_names_it():
  model = Conv2d(8, 3, name='conv')
  variables = {'params': {'kernel': jnp.zeros((3, 3, 5, 8))}}
  with pytest.raises(flax.errors.ScopeParamShapeError, match='kernel'):
    model.apply(variables, jnp.zeros((1, 8, 8, 4)))
