"""Convolution lowerings with one parameter layout.

Every convolution in the package stores its kernel in Flax's layout
``(kh, kw, in_features // groups, out_features)`` and pads symmetrically, as
PyTorch does. How the convolution is *computed* is a separate choice, the
``impl`` argument:

* ``'lax'``: ``jax.lax.conv_general_dilated`` for everything. The reference
  lowering, and the fastest one on GPU and TPU.
* ``'xla'``: plain XLA rewritten for XLA:CPU, which lowers grouped convolutions
  12-30x slower than PyTorch (their gradients 5-60x slower still) and 1x1
  convolutions ~3.5x slower than the same matmul. Depthwise convolutions
  become a sum of ``kh * kw`` shifted, per-channel-scaled slices, 1x1
  convolutions a ``dot_general`` over channels, other grouped convolutions
  (RegNet's) one dense convolution per group. Every other convolution goes to
  ``lax``.
* ``'ffi'``: like ``'xla'``, but depthwise convolutions (forward and both
  gradients) run in the package's compiled CPU kernels
  (:mod:`ghostnet_jax.kernels`) when they are built; otherwise ``'xla'``.
* ``'auto'`` (the default everywhere): chosen per *lowering platform* with
  :func:`jax.lax.platform_dependent`, so one traced function is right on
  every platform (a graph traced on a CPU host and exported for GPU or TPU
  carries no CPU kernel). In the CPU lowering: ``'ffi'`` with a single CPU
  device, ``'xla'`` with several (the compiled kernels have no partitioning
  rule, so under a sharded ``jit`` every device would compute the whole batch;
  inside ``shard_map`` pass ``'ffi'`` explicitly); ``'lax'`` everywhere else.
  Only the branch of the platform being compiled reaches the compiler.
  :func:`auto_on_cpu` overrides the CPU choice (the exporter uses ``'xla'``
  so a serialized artifact holds no custom call).

All lowerings agree to floating-point rounding; ``tests/test_ops.py`` checks
values and gradients against ``'lax'``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('auto', 'lax', 'xla', 'ffi')
# Grouped convolutions with more groups stay one XLA convolution (compile
# time grows with the number of pieces); the registered models have <= 46.
MAX_SPLIT_GROUPS = 64

Padding = Sequence[tuple[int, int]]


# What ``'auto'`` means in the CPU lowering; None: ``'ffi'`` on one CPU
# device, ``'xla'`` on several. Set with :func:`auto_on_cpu`.
_AUTO_CPU: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'ghostnet_jax_auto_on_cpu', default=None)


@contextlib.contextmanager
def auto_on_cpu(impl: str):
  """Within the block, ``'auto'`` lowers to ``impl`` on CPU (traced there).

  ``impl`` is ``'lax'``, ``'xla'`` or ``'ffi'``. Other platforms keep
  ``'lax'``. Used by :mod:`ghostnet_jax.export` with ``'xla'``: serialized
  code must not call the package's compiled kernels. The choice is made when
  a function is traced, and ``jax.jit`` caches traces: trace a new function
  inside the block.
  """
  if impl not in IMPLS or impl == 'auto':
    raise ValueError(f'auto_on_cpu takes one of {IMPLS[1:]}; got {impl!r}.')
  token = _AUTO_CPU.set(impl)
  try:
    yield
  finally:
    _AUTO_CPU.reset(token)


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """Maps ``'auto'`` to the lowering used on ``platform``.

  Args:
    impl: one of :data:`IMPLS`.
    platform: ``'cpu'``, ``'cuda'``, ``'tpu'``, ...; None means the default
      backend.

  Returns one of ``'lax'``, ``'xla'``, ``'ffi'``. ``'ffi'`` is returned only
  when the compiled kernels can be loaded.
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')
  if impl == 'auto':
    platform = platform or jax.default_backend()
    if platform != 'cpu':
      impl = 'lax'
    else:
      impl = _AUTO_CPU.get() or (
          'ffi' if jax.local_device_count() == 1 else 'xla')
  if impl == 'ffi':
    from ghostnet_jax import kernels  # pylint: disable=g-import-not-at-top
    if not kernels.is_available():
      impl = 'xla'
  return impl


def _as_pair(v) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(v)
  if len(v) != 2:
    raise ValueError(f'Expected an int or a pair, got {v!r}.')
  return v


def same_padding(kernel_size, dilation=1) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch-style symmetric padding ``k // 2`` on each side (odd kernels)."""
  kh, kw = _as_pair(kernel_size)
  dh, dw = _as_pair(dilation)
  return ((dh * (kh - 1) // 2,) * 2, (dw * (kw - 1) // 2,) * 2)


def _conv_lax(x, kernel, strides, padding, groups, precision):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=precision)


def _out_size(size, k, stride, pad):
  return (size + pad[0] + pad[1] - k) // stride + 1


def depthwise_conv2d_xla(x, kernel, strides, padding):
  """Depthwise convolution as a sum of shifted, per-channel-scaled slices.

  Args:
    x: ``(N, H, W, C)``.
    kernel: ``(kh, kw, 1, C)``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.

  Returns:
    ``(N, Ho, Wo, C)`` with ``Ho = (H + top + bottom - kh) // sh + 1``.
  """
  kh, kw, _, c = kernel.shape
  n, h, w, _ = x.shape
  sh, sw = strides
  ho = _out_size(h, kh, sh, padding[0])
  wo = _out_size(w, kw, sw, padding[1])
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(
          xp, (0, i, j, 0),
          (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
          (1, sh, sw, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def pointwise_conv2d_xla(x, kernel, strides, precision=None):
  """1x1 convolution as a matmul over channels.

  Args:
    x: ``(N, H, W, Cin)``.
    kernel: ``(1, 1, Cin, Cout)``.
    strides: ``(sh, sw)``; a strided 1x1 convolution samples every s-th pixel.

  Returns:
    ``(N, ceil(H / sh), ceil(W / sw), Cout)``.
  """
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw, :]
  # A 2-D (pixels, Cin) @ (Cin, Cout) product. Written on the 4-D array, the
  # weight gradient contracts three axes of x and dy, and XLA:CPU's layout
  # assignment then materialises dy transposed to (Cout, pixels): a strided
  # copy that cost a fifth of a GhostNet training step. The 2-D form
  # differentiates into a (pixels, Cin)^T @ (pixels, Cout) product on the
  # row-major arrays, with no copy (see BENCHMARKS.md).
  n, h, w, cin = x.shape
  y = lax.dot_general(x.reshape(n * h * w, cin), kernel[0, 0],
                      (((1,), (0,)), ((), ())), precision=precision)
  return y.reshape(n, h, w, kernel.shape[-1])


def grouped_conv2d_split(x, kernel, strides, padding, groups: int,
                         precision=None):
  """A grouped convolution as ``groups`` dense convolutions, concatenated.

  Group ``g`` convolves input channels ``[g * Cin/G, (g + 1) * Cin/G)`` with
  output channels ``[g * Cout/G, (g + 1) * Cout/G)`` of the kernel, which is
  what ``feature_group_count`` means. XLA:CPU computes dense convolutions
  and their gradients many times faster than grouped ones (BENCHMARKS.md).

  Args:
    x: ``(N, H, W, Cin)``.
    kernel: ``(kh, kw, Cin // groups, Cout)``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.
    groups: feature groups.
  """
  cig = kernel.shape[2]
  cog = kernel.shape[3] // groups
  outs = [
      _conv_lax(x[..., g * cig:(g + 1) * cig],
                kernel[..., g * cog:(g + 1) * cog], strides, padding, 1,
                precision)
      for g in range(groups)]
  return jnp.concatenate(outs, axis=-1)


def is_depthwise(kernel_shape, in_features: int, groups: int) -> bool:
  """True for a groups == in == out convolution (channel multiplier 1)."""
  return (groups > 1 and groups == in_features and kernel_shape[2] == 1
          and kernel_shape[3] == in_features)


def conv2d(x: jax.Array, kernel: jax.Array, *, strides=(1, 1),
           padding: Padding | None = None, groups: int = 1,
           impl: str = 'auto', precision=None) -> jax.Array:
  """2D convolution in NHWC / HWIO with a selectable lowering.

  Args:
    x: input ``(N, H, W, Cin)``.
    kernel: ``(kh, kw, Cin // groups, Cout)``.
    strides: int or pair.
    padding: explicit ``((top, bottom), (left, right))``; ``None`` means
      PyTorch's symmetric ``k // 2``.
    groups: feature groups (``Cin`` for a depthwise convolution).
    impl: ``'auto'``, ``'lax'``, ``'xla'`` or ``'ffi'`` (module docstring).
    precision: passed to the XLA convolution / matmul.

  Returns:
    ``(N, Ho, Wo, Cout)``.
  """
  strides = _as_pair(strides)
  kh, kw, _, _ = kernel.shape
  if padding is None:
    padding = same_padding((kh, kw))
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')
  if impl == 'auto':
    cpu_impl = resolve_impl('auto', 'cpu')
    if (cpu_impl == 'lax'
        or not _rewritten(kernel.shape, x.shape[-1], padding, groups)):
      return _conv_lax(x, kernel, strides, padding, groups, precision)
    # Both branches are traced; lowering keeps only the compiled platform's.
    return lax.platform_dependent(
        x, kernel,
        cpu=functools.partial(_conv_rewritten, impl=cpu_impl,
                              strides=strides, padding=padding,
                              groups=groups, precision=precision),
        default=functools.partial(_conv_lax, strides=strides,
                                  padding=padding, groups=groups,
                                  precision=precision))
  impl = resolve_impl(impl)
  if impl == 'lax' or not _rewritten(kernel.shape, x.shape[-1], padding,
                                     groups):
    return _conv_lax(x, kernel, strides, padding, groups, precision)
  return _conv_rewritten(x, kernel, impl=impl, strides=strides,
                         padding=padding, groups=groups, precision=precision)


def _rewritten(kernel_shape, cin: int, padding, groups: int) -> bool:
  """True when ``'xla'`` / ``'ffi'`` compute this convolution differently
  from ``'lax'`` (pointwise, depthwise, or split grouped convolutions)."""
  kh, kw = kernel_shape[:2]
  return ((groups == 1 and (kh, kw) == (1, 1)
           and padding == ((0, 0), (0, 0)))
          or is_depthwise(kernel_shape, cin, groups)
          or 1 < groups <= MAX_SPLIT_GROUPS)


def _conv_rewritten(x, kernel, *, impl, strides, padding, groups, precision):
  """The ``'xla'`` / ``'ffi'`` lowering of a convolution :func:`_rewritten`
  accepts; ``x`` ``(N, H, W, Cin)``, ``kernel`` ``(kh, kw, Cin/G, Cout)``."""
  kh, kw = kernel.shape[:2]
  cin = x.shape[-1]
  if groups == 1 and (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
    return pointwise_conv2d_xla(x, kernel, strides, precision)
  if is_depthwise(kernel.shape, cin, groups):
    if impl == 'ffi':
      from ghostnet_jax import kernels  # pylint: disable=g-import-not-at-top
      if kernels.supports(kernel.shape, strides, padding):
        return kernels.depthwise_conv2d(x, kernel, strides, padding)
    return depthwise_conv2d_xla(x, kernel, strides, padding)
  if 1 < groups <= MAX_SPLIT_GROUPS:
    return grouped_conv2d_split(x, kernel, strides, padding, groups,
                                precision)
  return _conv_lax(x, kernel, strides, padding, groups, precision)
