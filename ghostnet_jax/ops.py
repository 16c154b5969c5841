"""Convolution lowerings with one parameter layout.

Every convolution in the package stores its kernel in Flax's layout
``(kh, kw, in_features // groups, out_features)`` and pads symmetrically, as
PyTorch does (TensorFlow's input-dependent ``'SAME'`` on request:
:func:`same_padding`). How the convolution is *computed* is a separate choice, the
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
from jax import lax

from ghostnet_jax import kernels
from ghostnet_jax.conv_rewrites import (conv_lax, depthwise_conv2d_xla,
                                         grouped_conv2d_split,
                                         pointwise_conv2d_xla)
from ghostnet_jax.shapes import pair

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
    if not kernels.is_available():
      impl = 'xla'
  return impl


def same_padding(kernel_size, dilation=1, *, input_size=None, strides=1
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
  """``((top, bottom), (left, right))`` padding that keeps ``ceil(n / s)``.

  Without ``input_size``: PyTorch's symmetric ``dilation * (k - 1) // 2`` on
  each side (odd kernels), the package default; it does not depend on the
  input.

  With ``input_size=(H, W)``: TensorFlow's (and XLA's) ``'SAME'`` for that
  input and ``strides``. Per axis the total is ``max((ceil(n / s) - 1) * s +
  d * (k - 1) + 1 - n, 0)``, the smaller half before: asymmetric whenever
  the total is odd, e.g. ``(0, 1)`` for k=3, s=2 and ``(1, 2)`` for k=5, s=2
  on an even ``n``. At stride 1 (odd k) it equals the symmetric padding.
  """
  kh, kw = pair(kernel_size)
  dh, dw = pair(dilation)
  if input_size is None:
    return ((dh * (kh - 1) // 2,) * 2, (dw * (kw - 1) // 2,) * 2)
  # XLA's own 'SAME' rule, on the dilated (effective) kernel size.
  pads = lax.padtype_to_pads(tuple(pair(input_size)),
                             (dh * (kh - 1) + 1, dw * (kw - 1) + 1),
                             tuple(pair(strides)), 'SAME')
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def is_depthwise(kernel_shape, in_features: int, groups: int) -> bool:
  """True for a groups == in == out convolution (channel multiplier 1)."""
  return (groups > 1 and groups == in_features and kernel_shape[2] == 1
          and kernel_shape[3] == in_features)


def conv2d(x: jax.Array, kernel: jax.Array, *, strides=(1, 1),
           padding: Padding | None = None, groups: int = 1,
           impl: str = 'auto', precision=None, dilation=(1, 1)) -> jax.Array:
  """2D convolution in NHWC / HWIO with a selectable lowering.

  Args:
    x: input ``(N, H, W, Cin)``.
    kernel: ``(kh, kw, Cin // groups, Cout)``.
    strides: int or pair.
    padding: explicit ``((top, bottom), (left, right))``; ``None`` means
      PyTorch's symmetric ``dilation * (k - 1) // 2``.
    groups: feature groups (``Cin`` for a depthwise convolution).
    impl: ``'auto'``, ``'lax'``, ``'xla'`` or ``'ffi'`` (module docstring).
      ``'auto'`` is resolved per lowering platform: one traced function
      lowers to the CPU rewrite on CPU and to ``'lax'`` on GPU/TPU.
    precision: passed to the XLA convolution / matmul.
    dilation: int or pair, the spacing of the kernel taps (atrous
      convolution). Every lowering supports it; the compiled ``'ffi'``
      kernels do not, so dilated depthwise convolutions take ``'xla'``'s
      path under ``'ffi'``.

  Returns:
    ``(N, Ho, Wo, Cout)``.
  """
  strides = pair(strides)
  dilation = pair(dilation)
  kh, kw, _, _ = kernel.shape
  if padding is None:
    padding = same_padding((kh, kw), dilation)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')
  lax_conv = functools.partial(conv_lax, strides=strides, padding=padding,
                               groups=groups, precision=precision,
                               dilation=dilation)
  if impl == 'auto':
    cpu_impl = resolve_impl('auto', 'cpu')
    if (cpu_impl == 'lax'
        or not _rewritten(kernel.shape, x.shape[-1], padding, groups)):
      return lax_conv(x, kernel)
    # Both branches are traced; lowering keeps only the compiled platform's.
    return lax.platform_dependent(
        x, kernel,
        cpu=functools.partial(_conv_rewritten, impl=cpu_impl,
                              strides=strides, padding=padding,
                              groups=groups, precision=precision,
                              dilation=dilation),
        default=lax_conv)
  impl = resolve_impl(impl)
  if impl == 'lax' or not _rewritten(kernel.shape, x.shape[-1], padding,
                                     groups):
    return lax_conv(x, kernel)
  return _conv_rewritten(x, kernel, impl=impl, strides=strides,
                         padding=padding, groups=groups, precision=precision,
                         dilation=dilation)


def _rewritten(kernel_shape, cin: int, padding, groups: int) -> bool:
  """True when ``'xla'`` / ``'ffi'`` compute this convolution differently
  from ``'lax'`` (pointwise, depthwise, or split grouped convolutions)."""
  kh, kw = kernel_shape[:2]
  return ((groups == 1 and (kh, kw) == (1, 1)
           and padding == ((0, 0), (0, 0)))
          or is_depthwise(kernel_shape, cin, groups)
          or 1 < groups <= MAX_SPLIT_GROUPS)


def _conv_rewritten(x, kernel, *, impl, strides, padding, groups, precision,
                    dilation=(1, 1)):
  """The ``'xla'`` / ``'ffi'`` lowering of a convolution :func:`_rewritten`
  accepts; ``x`` ``(N, H, W, Cin)``, ``kernel`` ``(kh, kw, Cin/G, Cout)``."""
  kh, kw = kernel.shape[:2]
  cin = x.shape[-1]
  if groups == 1 and (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
    return pointwise_conv2d_xla(x, kernel, strides, precision)
  if is_depthwise(kernel.shape, cin, groups):
    if impl == 'ffi' and dilation == (1, 1):
      if kernels.supports(kernel.shape, strides, padding):
        return kernels.depthwise_conv2d(x, kernel, strides, padding)
    return depthwise_conv2d_xla(x, kernel, strides, padding, dilation)
  if 1 < groups <= MAX_SPLIT_GROUPS:
    return grouped_conv2d_split(x, kernel, strides, padding, groups,
                                precision, dilation)
  return conv_lax(x, kernel, strides, padding, groups, precision, dilation)
