"""Tests of the compiled depthwise convolution kernels (ghostnet_jax.kernels).

The kernels are compared, for the output and both gradients, with the two
pure-JAX lowerings: ``ops.depthwise_conv2d_xla`` (shifted slices) and
``lax.conv_general_dilated(feature_group_count=C)``.

Tolerance: all three compute in float32 but sum in different orders (and the
kernels use fused multiply-adds), so they agree to float32 rounding of the
sums, not bit for bit. With unit-normal inputs a result that sums ``terms``
products has magnitude ~sqrt(terms) and a rounding difference of a few ulps of
that, so we allow ``rtol=1e-5`` and ``atol=1e-5 * sqrt(terms)`` (``terms`` is
kh*kw for the output and the input gradient, N*Ho*Wo for the weight gradient).
That is ~100x the differences observed, and ~1e4x below the error of a single
missing or misplaced tap.
"""

import ctypes
import math
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from ghostnet_jax import kernels, ops
from ghostnet_jax.kernels import build

requires_kernels = pytest.mark.skipif(
    not kernels.is_available(),
    reason=f'depthwise kernels unavailable ({kernels.load_error()}); build '
           'them with `python -m ghostnet_jax.kernels.build`')

RTOL = 1e-5
ATOL_PER_SQRT_TERM = 1e-5

# (N, H, W, C, (kh, kw), (sh, sw), ((top, bottom), (left, right)))
CASES = [
    (2, 8, 8, 17, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (1, 7, 7, 3, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 13, 13, 40, (5, 5), (1, 1), ((2, 2), (2, 2))),
    (2, 13, 13, 17, (5, 5), (2, 2), ((2, 2), (2, 2))),
    (1, 8, 8, 96, (1, 5), (1, 1), ((0, 0), (2, 2))),
    (2, 7, 7, 24, (5, 1), (1, 1), ((2, 2), (0, 0))),
    (1, 56, 56, 16, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 56, 56, 12, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (3, 8, 8, 72, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 8, 13, 17, (3, 3), (2, 1), ((0, 1), (2, 0))),     # asymmetric
    (1, 7, 8, 9, (5, 5), (2, 2), ((3, 1), (0, 4))),       # asymmetric
    (2, 13, 7, 33, (3, 3), (1, 1), ((0, 0), (0, 0))),     # no padding
    (1, 5, 6, 9, (3, 3), (1, 1), ((3, 3), (3, 3))),       # pad >= kernel
    (1, 7, 7, 36, (7, 7), (1, 1), ((3, 3), (3, 3))),
    (1, 13, 13, 17, (3, 3), (3, 3), ((1, 1), (1, 1))),    # stride 3
    (2, 8, 8, 1, (3, 3), (1, 1), ((1, 1), (1, 1))),       # one channel
    (1, 14, 14, 480, (3, 3), (1, 1), ((1, 1), (1, 1))),
]


def _case_id(case):
  n, h, w, c, k, s, p = case
  return f'n{n}-{h}x{w}x{c}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-p{p[0][0]}{p[0][1]}{p[1][0]}{p[1][1]}'


def _out_size(size, k, s, pad):
  return (size + pad[0] + pad[1] - k) // s + 1


def _inputs(case, seed=0):
  """x (N, H, W, C), kernel (kh, kw, 1, C), cotangent (N, Ho, Wo, C)."""
  n, h, w, c, (kh, kw), (sh, sw), padding = case
  rng = np.random.RandomState(seed)
  ho = _out_size(h, kh, sh, padding[0])
  wo = _out_size(w, kw, sw, padding[1])
  x = rng.randn(n, h, w, c).astype(np.float32)
  kernel = rng.randn(kh, kw, 1, c).astype(np.float32)
  ct = rng.randn(n, ho, wo, c).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(ct)


def _lax_depthwise(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1], precision=lax.Precision.HIGHEST)


IMPLS = {
    'ffi': kernels.depthwise_conv2d,
    'xla': ops.depthwise_conv2d_xla,
    'lax': _lax_depthwise,
}


def _value_and_grads(impl, x, kernel, ct, strides, padding):
  """(y, dx, dw) of one lowering, under jit."""
  fn = IMPLS[impl]

  @jax.jit
  def run(x, kernel, ct):
    y, vjp = jax.vjp(lambda x, k: fn(x, k, strides, padding), x, kernel)
    dx, dw = vjp(ct)
    return y, dx, dw

  return run(x, kernel, ct)


def _assert_close(actual, expected, terms, err_msg=''):
  np.testing.assert_allclose(
      np.asarray(actual), np.asarray(expected), rtol=RTOL,
      atol=ATOL_PER_SQRT_TERM * math.sqrt(max(terms, 1)), err_msg=err_msg)


@requires_kernels
@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_matches_xla_and_lax(case):
  n, _, _, _, (kh, kw), strides, padding = case
  x, kernel, ct = _inputs(case)
  y, dx, dw = _value_and_grads('ffi', x, kernel, ct, strides, padding)
  assert y.shape == ct.shape and dx.shape == x.shape
  assert dw.shape == kernel.shape
  terms = {'y': kh * kw, 'dx': kh * kw, 'dw': n * ct.shape[1] * ct.shape[2]}
  for ref in ('xla', 'lax'):
    expected = _value_and_grads(ref, x, kernel, ct, strides, padding)
    for name, a, e in zip(('y', 'dx', 'dw'), (y, dx, dw), expected):
      _assert_close(a, e, terms[name], err_msg=f'{name} vs {ref}')


@requires_kernels
@pytest.mark.parametrize('case', [CASES[3], CASES[9], CASES[12]], ids=_case_id)
def test_separate_gradient_kernels_match_fused_backward(case):
  _, _, _, _, _, strides, padding = case
  x, kernel, ct = _inputs(case)
  dx, dw = jax.jit(kernels.backward, static_argnums=(3, 4))(
      x, ct, kernel, strides, padding)
  dx_alone = kernels.input_grad(ct, kernel, x.shape, strides, padding)
  dw_alone = kernels.weight_grad(x, ct, kernel.shape, strides, padding)
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_alone))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(dw_alone))
  # And the forward kernel called directly is the differentiable op's forward.
  np.testing.assert_array_equal(
      np.asarray(kernels.forward(x, kernel, strides, padding)),
      np.asarray(kernels.depthwise_conv2d(x, kernel, strides, padding)))


@requires_kernels
def test_deterministic():
  # Big enough for many weight-gradient chunks and tasks on every thread.
  case = (8, 56, 56, 24, (3, 3), (1, 1), ((1, 1), (1, 1)))
  x, kernel, ct = _inputs(case)
  first = _value_and_grads('ffi', x, kernel, ct, case[5], case[6])
  for _ in range(3):
    again = _value_and_grads('ffi', x, kernel, ct, case[5], case[6])
    for a, b in zip(first, again):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _composite(impl):
  """A small network: two depthwise convolutions through ops.conv2d."""

  def loss(x, k1, k2):
    c = x.shape[-1]
    h = ops.conv2d(x, k1, strides=1, groups=c, impl=impl)
    h = jax.nn.relu(h) * jnp.tanh(h)
    h = ops.conv2d(h, k2, strides=2, groups=c, impl=impl)
    return jnp.mean(jnp.square(h - 0.5))

  return loss


@requires_kernels
def test_jit_grad_through_composite():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 13, 13, 20).astype(np.float32))
  k1 = jnp.asarray(rng.randn(3, 3, 1, 20).astype(np.float32) / 3)
  k2 = jnp.asarray(rng.randn(5, 5, 1, 20).astype(np.float32) / 5)
  grads = jax.jit(jax.value_and_grad(_composite('ffi'), argnums=(0, 1, 2)))(
      x, k1, k2)
  expected = jax.jit(jax.value_and_grad(_composite('lax'), argnums=(0, 1, 2)))(
      x, k1, k2)
  for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4,
                               atol=1e-6)


def _jaxpr_text(fn, *args):
  return str(jax.make_jaxpr(fn)(*args))


@requires_kernels
def test_conv2d_impl_ffi_routes_to_kernels():
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(1, 8, 8, 16).astype(np.float32))
  k = jnp.asarray(rng.randn(3, 3, 1, 16).astype(np.float32))
  conv = lambda impl: (lambda x, k: ops.conv2d(x, k, groups=16, impl=impl))
  assert ops.resolve_impl('ffi') == 'ffi'
  assert 'ghostnet_jax_depthwise_forward' in _jaxpr_text(conv('ffi'), x, k)
  assert 'ghostnet_jax_depthwise_forward' in _jaxpr_text(conv('auto'), x, k)
  assert 'ghostnet_jax_depthwise' not in _jaxpr_text(conv('xla'), x, k)
  grad_text = _jaxpr_text(
      jax.grad(lambda x, k: jnp.sum(conv('ffi')(x, k)), argnums=(0, 1)), x, k)
  assert 'ghostnet_jax_depthwise_backward' in grad_text
  # A grouped but not depthwise convolution does not use the kernels.
  k2 = jnp.asarray(rng.randn(3, 3, 2, 16).astype(np.float32))
  grouped = lambda x, k: ops.conv2d(x, k, groups=8, impl='ffi')
  assert 'ghostnet_jax_depthwise' not in _jaxpr_text(grouped, x, k2)


def _lowered_text(fn, platforms, *args):
  """StableHLO text of ``fn`` exported for ``platforms`` (from this host)."""
  from jax import export  # pylint: disable=g-import-not-at-top
  return export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


@requires_kernels
def test_auto_resolves_per_lowering_platform():
  """'auto' is the kernels in the CPU lowering and lax in GPU/TPU ones, so a
  graph traced on this CPU host exports for accelerators with no custom call.
  """
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(1, 8, 8, 16).astype(np.float32))
  k = jnp.asarray(rng.randn(3, 3, 1, 16).astype(np.float32))
  conv = lambda x, k: ops.conv2d(x, k, groups=16, impl='auto')
  cpu_text = jax.jit(conv).lower(x, k).as_text()
  assert 'ghostnet_jax_depthwise_forward' in cpu_text
  for platform in ('cuda', 'tpu'):
    text = _lowered_text(conv, (platform,), x, k)
    assert 'stablehlo.custom_call' not in text, platform
    assert 'stablehlo.convolution' in text, platform
  train = jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1))
  assert 'stablehlo.custom_call' not in _lowered_text(train, ('tpu',), x, k)
  # The exporter's setting: no kernel call in any lowering, one artifact.
  with ops.auto_on_cpu('xla'):
    text = _lowered_text(lambda x, k: conv(x, k), ('cpu', 'cuda', 'tpu'), x, k)
  assert 'stablehlo.custom_call' not in text
  assert ops.resolve_impl('auto', 'tpu') == 'lax'
  assert ops.resolve_impl('auto', 'cpu') == 'ffi'
  with ops.auto_on_cpu('xla'):
    assert ops.resolve_impl('auto', 'cpu') == 'xla'
  with pytest.raises(ValueError, match='auto_on_cpu'):
    with ops.auto_on_cpu('auto'):
      pass
  np.testing.assert_allclose(
      np.asarray(jax.jit(conv)(x, k)),
      np.asarray(ops.conv2d(x, k, groups=16, impl='lax')), rtol=1e-5,
      atol=1e-5)


@requires_kernels
def test_vmap():
  case = (2, 8, 8, 17, (3, 3), (2, 2), ((1, 1), (1, 1)))
  strides, padding = case[5], case[6]
  rng = np.random.RandomState(3)
  xs = jnp.asarray(rng.randn(3, 2, 8, 8, 17).astype(np.float32))
  ks = jnp.asarray(rng.randn(3, 3, 3, 1, 17).astype(np.float32))
  x, k = xs[0], ks[0]

  def conv(impl):
    return lambda x, k: IMPLS[impl](x, k, strides, padding)

  def loss(impl):
    return lambda x, k: jnp.sum(jnp.sin(conv(impl)(x, k)))

  checks = {
      'batched x': lambda impl: jax.vmap(conv(impl), (0, None))(xs, k),
      'batched kernel': lambda impl: jax.vmap(conv(impl), (None, 0))(x, ks),
      'both batched': lambda impl: jax.vmap(conv(impl))(xs, ks),
      # Per-example gradients: vmap of grad.
      'per-example grads': lambda impl: jax.vmap(
          jax.grad(loss(impl), argnums=(0, 1)), (0, None))(xs, k),
      # Jacobians: vmap over cotangents with unbatched x and kernel.
      'jacrev': lambda impl: jax.jacrev(conv(impl), argnums=(0, 1))(
          x[:1, :4, :4, :3], k[..., :3]),
  }
  for name, check in checks.items():
    actual = jax.jit(lambda: check('ffi'))()
    expected = jax.jit(lambda: check('lax'))()
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      assert a.shape == e.shape, name
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5,
                                 atol=1e-4, err_msg=name)


@requires_kernels
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_computed_in_float32(dtype):
  case = (2, 8, 8, 24, (3, 3), (1, 1), ((1, 1), (1, 1)))
  x, k, _ = _inputs(case)
  x, k = x.astype(dtype), k.astype(dtype)
  fn = lambda x, k: kernels.depthwise_conv2d(x, k, (1, 1), case[6])
  y = jax.jit(fn)(x, k)
  assert y.dtype == dtype
  expected = _lax_depthwise(x.astype(jnp.float32), k.astype(jnp.float32),
                            (1, 1), case[6]).astype(dtype)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(expected, np.float32))
  dx, dk = jax.grad(lambda x, k: jnp.sum(fn(x, k).astype(jnp.float32)),
                    argnums=(0, 1))(x, k)
  assert dx.dtype == dtype and dk.dtype == dtype


@requires_kernels
def test_float64_uses_the_xla_lowering():
  with jax.enable_x64(True):
    case = (1, 7, 7, 5, (3, 3), (1, 1), ((1, 1), (1, 1)))
    x, k, _ = _inputs(case)
    x, k = x.astype(jnp.float64), k.astype(jnp.float64)
    fn = lambda x, k: kernels.depthwise_conv2d(x, k, (1, 1), case[6])
    assert 'ghostnet_jax_depthwise' not in _jaxpr_text(fn, x, k)
    y = fn(x, k)
    assert y.dtype == jnp.float64
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(ops.depthwise_conv2d_xla(x, k, (1, 1),
                                                           case[6])))


@requires_kernels
def test_kernel_rejects_inconsistent_shapes():
  x, k, _ = _inputs(CASES[0])
  # An output shape that does not match the strides and padding.
  with pytest.raises(Exception, match='inconsistent shapes'):
    jax.block_until_ready(kernels._call(  # pylint: disable=protected-access
        'ghostnet_jax_depthwise_forward', [(2, 9, 8, 17)], x, k,
        strides=(1, 1), padding=((1, 1), (1, 1))))


def test_depthwise_conv2d_rejects_bad_arguments():
  x = jnp.zeros((1, 8, 8, 4), jnp.float32)
  with pytest.raises(ValueError, match='kernel'):
    kernels.depthwise_conv2d(x, jnp.zeros((3, 3, 1, 5)), (1, 1),
                             ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match='Unsupported'):
    kernels.depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), (0, 1),
                             ((1, 1), (1, 1)))


def test_supports():
  assert kernels.supports((3, 3, 1, 16), (1, 1), ((1, 1), (1, 1)))
  assert kernels.supports((1, 5, 1, 16), (2, 1), ((0, 0), (2, 2)))
  assert not kernels.supports((3, 3, 2, 16), (1, 1), ((1, 1), (1, 1)))
  assert not kernels.supports((3, 3, 1, 16), (0, 1), ((1, 1), (1, 1)))
  assert not kernels.supports((3, 3, 1, 16), (1, 1), ((-1, 1), (1, 1)))


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv(kernels.DISABLE_ENV, '1')
  assert not kernels.is_available()
  assert kernels.DISABLE_ENV in kernels.load_error()
  assert ops.resolve_impl('ffi') == 'xla'
  x = jnp.ones((1, 6, 6, 8), jnp.float32)
  k = jnp.ones((3, 3, 1, 8), jnp.float32)
  text = _jaxpr_text(lambda x, k: ops.conv2d(x, k, groups=8, impl='ffi'), x, k)
  assert 'ghostnet_jax_depthwise' not in text
  monkeypatch.setenv(kernels.DISABLE_ENV, '0')
  assert kernels.is_available() == (kernels.load_error() is None)


def test_missing_or_broken_library_is_unavailable_not_an_error(
    monkeypatch, tmp_path):
  load = kernels._load_unlocked  # pylint: disable=protected-access
  monkeypatch.setattr(kernels, 'library_path',
                      lambda: str(tmp_path / 'missing.so'))
  assert 'not found' in load()
  broken = tmp_path / 'broken.so'
  broken.write_bytes(b'not a shared library')
  monkeypatch.setattr(kernels, 'library_path', lambda: str(broken))
  assert 'loading' in load()


def test_library_name_matches_build():
  assert os.path.basename(kernels.library_path()) == build.LIBRARY


def test_build_compiles(tmp_path, capsys):
  assert build.main(['--out', str(tmp_path)]) == 0
  path = tmp_path / build.LIBRARY
  assert path.exists()
  assert str(path) in capsys.readouterr().out
  lib = ctypes.cdll.LoadLibrary(str(path))
  for symbol in kernels._TARGETS.values():  # pylint: disable=protected-access
    assert getattr(lib, symbol) is not None


def test_build_reports_compiler_errors(tmp_path):
  with pytest.raises(build.BuildError, match='failed'):
    build.build(str(tmp_path), march='no-such-cpu', verbose=False)
  assert not list(tmp_path.iterdir())
