"""GhostConv: a drop-in for nn.Conv; shapes, sizes, exact equivalences."""

import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghostnet_jax
from ghostnet_jax import GhostConv

TOL = dict(rtol=1e-5, atol=1e-5)
# Threefry keys cost seconds of XLA compilation per new parameter shape on a
# CPU; the RBG generator does not. Inputs come from NumPy for the same reason.
KEY = jax.random.key(0, impl='rbg')


def init(layer, x, **kwargs):
  return layer.init(KEY, x, **kwargs)


def normal(*shape):
  return jnp.asarray(np.random.RandomState(sum(shape)).normal(size=shape),
                     jnp.float32)


def ghost_params(cin, features, k, ratio, d=3, bias=True, norm=False):
  """Closed form: primary kh*kw*C*m, cheap d*d*n, (m + n) biases / 2(m + n)
  BN parameters, m = ceil(F / ratio), n = m (ratio - 1)."""
  kh, kw = (k, k) if isinstance(k, int) else k
  m = math.ceil(features / ratio)
  n = m * (ratio - 1)
  return (kh * kw * cin * m + d * d * n + (m + n) * bias
          + 2 * (m + n) * norm)


@pytest.mark.parametrize('kernel_size, strides, padding', [
    (1, 1, 'SAME'), (3, 1, 'SAME'), (3, 2, 'SAME'), ((3, 5), (2, 1), 'SAME'),
    (5, 2, 'VALID'), ((1, 3), 1, 'VALID'), (3, 2, 1), (2, 2, 'SAME'),
    (3, 2, ((0, 1), (2, 0))),
])
@pytest.mark.parametrize('hw', [(9, 9), (8, 11)])
def test_output_shape_matches_nn_conv(kernel_size, strides, padding, hw):
  x = jax.ShapeDtypeStruct((2,) + hw + (6,), jnp.float32)
  ghost = GhostConv(10, kernel_size, strides=strides, padding=padding)
  conv = nn.Conv(10, (kernel_size,) * 2 if isinstance(kernel_size, int)
                 else kernel_size, strides=strides, padding=padding)
  ref = jax.eval_shape(lambda x: conv.apply(init(conv, x), x), x).shape
  out = jax.eval_shape(lambda x: ghost.apply(init(ghost, x), x), x).shape
  assert out == ref and ref[-1] == 10


def test_pytorch_padding_option():
  x = jnp.ones((1, 8, 8, 4))
  layer = GhostConv(8, 3, strides=2, padding=None)
  assert layer.apply(init(layer, x), x).shape == (1, 4, 4, 8)


@pytest.mark.parametrize('cin, features, k, ratio, d, bias, norm', [
    (16, 32, 3, 2, 3, True, False),
    (16, 32, 1, 4, 3, False, False),
    (8, 10, (3, 5), 3, 5, True, False),   # 10 = 4 intrinsic + 6 of 8 ghosts
    (7, 5, 3, 2, 1, False, True),
    (4, 6, 1, 1, 3, True, True),           # ratio 1: no cheap op at all
])
def test_parameter_count_formula(cin, features, k, ratio, d, bias, norm):
  layer = GhostConv(features, k, ratio=ratio, dw_size=d, use_bias=bias,
                    use_norm=norm)
  variables = jax.eval_shape(lambda x: init(layer, x),
                             jax.ShapeDtypeStruct((1, 9, 9, cin), jnp.float32))
  assert ghostnet_jax.count_params(variables['params']) == ghost_params(
      cin, features, k, ratio, d, bias, norm)
  expected = ({'primary_conv_0', 'primary_conv_1'} if norm
              else {'primary_conv_0'})
  if ratio > 1:
    expected |= {n.replace('primary_conv', 'cheap_operation') for n in expected}
  assert set(variables['params']) == expected
  assert ('batch_stats' in variables) == norm


def test_docstring_numbers_for_a_256_channel_3x3_conv():
  shape = jax.ShapeDtypeStruct((1, 8, 8, 256), jnp.float32)
  count = lambda layer: ghostnet_jax.count_params(
      jax.eval_shape(lambda x: init(layer, x), shape)['params'])
  assert count(nn.Conv(256, (3, 3), use_bias=False)) == 589_824
  assert count(GhostConv(256, 3, use_bias=False)) == 296_064
  assert count(GhostConv(256, 3, ratio=4, use_bias=False)) == 149_184


@pytest.mark.parametrize('strides, padding', [(1, 'SAME'), (2, 'SAME'),
                                              (2, 'VALID'), (1, 2)])
def test_ratio_one_is_exactly_nn_conv(strides, padding):
  x = normal(2, 9, 10, 5)
  layer = GhostConv(7, (3, 3), strides=strides, padding=padding, ratio=1)
  params = init(layer, x)['params']
  conv = nn.Conv(7, (3, 3), strides=strides, padding=padding)
  conv_params = {'kernel': params['primary_conv_0']['kernel'],
                 'bias': params['primary_conv_0']['bias']}
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             conv.apply({'params': conv_params}, x), **TOL)


@pytest.mark.parametrize('ratio', [2, 3])
def test_identity_cheap_kernel_copies_the_intrinsic_maps(ratio):
  # A cheap kernel that is 1 at the centre reproduces its input map: ghost
  # channel j is a copy of intrinsic map j // (ratio - 1).
  x = normal(2, 8, 8, 6)
  layer = GhostConv(4 * ratio, 3, strides=2, ratio=ratio, dw_size=5)
  params = init(layer, x)['params']
  cheap = params['cheap_operation_0']
  delta = jnp.zeros_like(cheap['kernel']).at[2, 2].set(1.0)
  params = {**params, 'cheap_operation_0': {'kernel': delta,
                                            'bias': jnp.zeros_like(cheap['bias'])}}
  y = layer.apply({'params': params}, x)
  primary, ghosts = y[..., :4], y[..., 4:]
  np.testing.assert_allclose(ghosts, jnp.repeat(primary, ratio - 1, axis=-1),
                             **TOL)
  # The intrinsic half is the primary conv alone.
  conv = nn.Conv(4, (3, 3), strides=2)
  np.testing.assert_allclose(
      primary, conv.apply({'params': params['primary_conv_0']}, x), **TOL)


def test_features_not_divisible_by_ratio_keeps_the_first_ghosts():
  x = normal(1, 6, 6, 3)
  layer = GhostConv(5, 3, ratio=2)   # 3 intrinsic + 3 ghosts, cut to 5
  variables = init(layer, x)
  assert variables['params']['cheap_operation_0']['kernel'].shape == (3, 3, 1, 3)
  full = GhostConv(6, 3, ratio=2).apply(variables, x)
  np.testing.assert_allclose(layer.apply(variables, x), full[..., :5], **TOL)


def test_norm_and_relu_options():
  x = normal(4, 6, 6, 3)
  layer = GhostConv(8, 3, use_norm=True, relu=True, use_bias=False)
  variables = init(layer, x)
  y, state = layer.apply(variables, x, train=True, mutable=['batch_stats'])
  assert float(y.min()) >= 0.0
  # Training-mode BN: each of the 8 output channels is the ReLU of a
  # zero-mean, unit-variance channel, so about half its values are zero.
  zeros = (y == 0).mean(axis=(0, 1, 2))
  assert np.all((zeros > 0.2) & (zeros < 0.8))
  for a, b in zip(jax.tree_util.tree_leaves(variables['batch_stats']),
                  jax.tree_util.tree_leaves(state['batch_stats'])):
    assert not np.allclose(a, b)
  # Eval mode uses the (initial) running statistics: ReLU(x / sqrt(1 + eps)).
  y_eval = layer.apply(variables, x)
  p = variables['params']
  conv = nn.Conv(4, (3, 3), use_bias=False)
  primary = conv.apply({'params': p['primary_conv_0']}, x) / np.sqrt(1 + 1e-5)
  np.testing.assert_allclose(y_eval[..., :4], jax.nn.relu(primary), **TOL)


def test_jit_and_grad():
  x = normal(2, 8, 8, 4)
  layer = GhostConv(8, 3, strides=2, ratio=4)
  params = init(layer, x)['params']

  @jax.jit
  def loss(params, x):
    return jnp.sum(layer.apply({'params': params}, x) ** 2)

  grads = jax.grad(loss)(params, x)
  chex.assert_trees_all_equal_shapes(grads, params)
  chex.assert_tree_all_finite(grads)
  for g in jax.tree_util.tree_leaves(grads):
    assert float(jnp.abs(g).sum()) > 0
  np.testing.assert_allclose(
      loss(params, x), jnp.sum(layer.apply({'params': params}, x) ** 2),
      rtol=1e-5)


def test_macs_are_counted_and_match_the_formula():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return GhostConv(16, 3, strides=2, ratio=4)(x)

  # 224 -> 112 output; m = 4 intrinsic, n = 12 ghosts.
  assert ghostnet_jax.count_macs(Net(), 224) == 112 * 112 * (9 * 3 * 4 + 9 * 12)


class SmallCNN(nn.Module):
  """The README / docstring example."""
  num_classes: int = 10
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(self.conv(64, (3, 3), strides=2)(x))
    x = nn.relu(self.conv(128, (3, 3), strides=2)(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def test_upgrading_a_flax_model():
  x = normal(2, 32, 32, 3)
  baseline = SmallCNN()
  ghost = SmallCNN(conv=functools.partial(GhostConv, ratio=2))
  counts = []
  for model in (baseline, ghost):
    variables, y = jax.jit(
        lambda x: (v := init(model, x), model.apply(v, x)))(x)  # noqa: B023
    chex.assert_shape(y, (2, 10))
    counts.append(ghostnet_jax.count_params(variables['params']))
  assert counts == [94_538, 49_322]
  assert counts[1] == (896 + ghost_params(32, 64, 3, 2) + ghost_params(64, 128, 3, 2)
                       + 128 * 10 + 10)


@pytest.mark.parametrize('kwargs, match', [
    (dict(features=8, ratio=0), 'ratio must be an int >= 1'),
    (dict(features=8, ratio=1.5), 'ratio must be an int >= 1'),
    (dict(features=0), 'features must be an int >= 1'),
    (dict(features=1, ratio=2), 'no room for ghost maps'),
    (dict(features=8, dw_size=2), 'dw_size must be a positive odd int'),
    (dict(features=8, kernel_size=0), 'kernel_size'),
    (dict(features=8, strides=(1, 2, 1)), 'strides'),
    (dict(features=8, padding='CIRCULAR'), 'padding'),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
  layer = GhostConv(**kwargs)
  with pytest.raises(ValueError, match=match):
    init(layer, jnp.ones((1, 8, 8, 3)))


def test_non_nhwc_input_is_rejected():
  layer = GhostConv(8, 3)
  with pytest.raises(ValueError, match='NHWC'):
    init(layer, jnp.ones((8, 8, 3)))
