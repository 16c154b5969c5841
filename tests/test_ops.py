"""The pure-XLA convolution lowerings of ``ghostnet_jax.ops`` against ``lax``.

Values and both gradients of the rewritten 1x1 and depthwise convolutions
agree with ``lax.conv_general_dilated`` to rounding, and the 1x1 weight
gradient compiles without a transposed copy of the activations (the XLA:CPU
layout problem the 2-D matmul form avoids; BENCHMARKS.md).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ghostnet_jax import ops


def _lax_conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
      precision=lax.Precision.HIGHEST)


def _value_and_grads(fn, x, kernel):
  """(y, dx, dw) of ``fn(x, kernel)`` under jit, with a fixed cotangent."""

  @jax.jit
  def run(x, kernel):
    y, vjp = jax.vjp(fn, x, kernel)
    ct = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
    return (y,) + vjp(ct)

  return run(x, kernel)


@pytest.mark.parametrize('shape, cout, stride', [
    ((2, 9, 7, 5), 6, 1),
    ((3, 8, 8, 16), 12, 2),
    ((1, 1, 1, 40), 24, 1),
])
def test_pointwise_matches_lax(shape, cout, stride):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(*shape).astype(np.float32))
  kernel = jnp.asarray(rng.randn(1, 1, shape[-1], cout).astype(np.float32))
  strides = (stride, stride)
  pad = ((0, 0), (0, 0))
  got = _value_and_grads(
      lambda x, k: ops.conv2d(x, k, strides=strides, padding=pad,
                              impl='xla', precision=lax.Precision.HIGHEST),
      x, kernel)
  want = _value_and_grads(
      lambda x, k: _lax_conv(x, k, strides, pad, 1), x, kernel)
  for name, a, b in zip(('y', 'dx', 'dw'), got, want):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-4, err_msg=name)


def test_depthwise_xla_matches_lax():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 11, 10, 8).astype(np.float32))
  kernel = jnp.asarray(rng.randn(3, 3, 1, 8).astype(np.float32))
  pad = ((1, 1), (1, 1))
  got = _value_and_grads(
      lambda x, k: ops.conv2d(x, k, strides=2, padding=pad, groups=8,
                              impl='xla'), x, kernel)
  want = _value_and_grads(
      lambda x, k: _lax_conv(x, k, (2, 2), pad, 8), x, kernel)
  for name, a, b in zip(('y', 'dx', 'dw'), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-4, err_msg=name)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU layouts')
def test_pointwise_weight_gradient_has_no_activation_copy():
  """1x1 conv -> batch statistics -> ReLU, differentiated: XLA:CPU used to
  transpose the (pixels, Cout) output gradient for the weight gradient."""
  x = jnp.zeros((4, 16, 16, 8), jnp.float32)
  kernel = jnp.zeros((1, 1, 8, 24), jnp.float32)

  def loss(x, kernel):
    y = ops.conv2d(x, kernel, impl='xla')
    y = (y - y.mean((0, 1, 2))) * lax.rsqrt(y.var((0, 1, 2)) + 1e-5)
    return jnp.sum(jax.nn.relu(y) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile()
  text = hlo.as_text()
  activation = r'f32\[(?:4,16,16,24|1024,24|24,1024|24,4,16,16)\]'
  copies = re.findall(r'= ' + activation + r'\S* (?:copy|transpose)\(', text)
  assert not copies, copies


@pytest.mark.parametrize('impl', ['xla', 'ffi'])
@pytest.mark.parametrize('shape, cout, groups, stride', [
    ((2, 9, 9, 12), 12, 3, 1),
    ((2, 10, 10, 8), 16, 2, 2),
])
def test_grouped_conv_matches_lax(impl, shape, cout, groups, stride):
  """RegNet-style grouped convolutions (not depthwise): one dense
  convolution per group in the 'xla' and 'ffi' lowerings."""
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(*shape).astype(np.float32))
  kernel = jnp.asarray(
      rng.randn(3, 3, shape[-1] // groups, cout).astype(np.float32) / 4)
  pad = ((1, 1), (1, 1))
  got = _value_and_grads(
      lambda x, k: ops.conv2d(x, k, strides=stride, padding=pad, groups=groups,
                              impl=impl, precision=lax.Precision.HIGHEST),
      x, kernel)
  want = _value_and_grads(
      lambda x, k: _lax_conv(x, k, (stride, stride), pad, groups), x, kernel)
  for name, a, b in zip(('y', 'dx', 'dw'), got, want):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-4, err_msg=name)


def test_grouped_conv_is_split_into_dense_convolutions():
  x = jnp.zeros((1, 8, 8, 12), jnp.float32)
  kernel = jnp.zeros((3, 3, 4, 12), jnp.float32)
  text = str(jax.make_jaxpr(
      lambda x, k: ops.conv2d(x, k, groups=3, impl='xla'))(x, kernel))
  assert text.count('conv_general_dilated') == 3
  assert 'feature_group_count=1' in text and 'feature_group_count=3' not in text
