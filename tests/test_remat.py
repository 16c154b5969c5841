"""Block rematerialisation (ghostnet_jax.remat): same numbers, checkpointed
blocks, config checks."""

import jax
import numpy as np
import pytest

import train_test_utils
from ghostnet_jax import registry
from ghostnet_jax import remat
from ghostnet_jax import train_lib


def _grads(model, variables, x, value):
  applied = remat.wrap(model, value)

  def loss(p):
    out, new = applied.apply({'params': p,
                              'batch_stats': variables['batch_stats']},
                             x, train=True, mutable=['batch_stats'],
                             rngs={'dropout': jax.random.key(1)})
    return (out ** 2).sum(), new['batch_stats']

  return loss, jax.jit(jax.grad(loss, has_aux=True))(variables['params'])


@pytest.mark.parametrize('name,kw', [
    ('ghostnet_050', {'blocks': train_test_utils.TINY_BLOCKS}),
    pytest.param('g_ghost_regnetx_002', {}, marks=pytest.mark.slow),
])
def test_remat_blocks_same_gradients_and_checkpointed(name, kw):
  model = registry.create_model(name, num_classes=5, conv_impl='lax', **kw)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  _, (g0, s0) = _grads(model, variables, x, 'none')
  loss, (g1, s1) = _grads(model, variables, x, 'blocks')
  for a, b in ((g0, g1), (s0, s1)):
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=1e-5),
        a, b)
  jaxpr = str(jax.make_jaxpr(lambda p: loss(p)[0])(variables['params']))
  n_ckpt = jaxpr.count('checkpoint[') + jaxpr.count('remat2[')
  assert n_ckpt >= 2, jaxpr[:2000]
  plain = str(jax.make_jaxpr(lambda p: _grads(model, variables, x, 'none')[0](
      p)[0])(variables['params']))
  assert plain.count('checkpoint[') + plain.count('remat2[') == 0


def test_remat_policy_and_validation():
  assert remat.policy('blocks') is None
  assert remat.policy('dots_saveable') is jax.checkpoint_policies.dots_saveable
  config = train_test_utils.tiny_config(remat='everything')
  with pytest.raises(train_lib.ConfigError, match='config.remat must be one'):
    train_lib.validate_config(config)
  train_lib.validate_config(train_test_utils.tiny_config(remat='blocks'))
