"""Compiled CPU kernels for depthwise convolution (registered with ``jax.ffi``).

XLA:CPU lowers grouped convolutions 12-30x slower than PyTorch, and the
shifted-slice rewrite in :mod:`ghostnet_jax.ops` is fast forward but slow in
its weight gradient. This package holds C++ kernels (``depthwise.cc``) for a
depthwise convolution with channel multiplier 1, float32, NHWC, any stride,
kernel size and explicit padding: forward, input gradient, weight gradient and
both gradients in one pass; vectorised over channels, parallel over XLA's
intra-op threads, deterministic. :func:`depthwise_conv2d` wires them together
with a ``jax.custom_vjp`` (forward kernel; backward: the one-pass kernel).

Build once per environment (needs a C++17 compiler and the installed jaxlib)::

  python -m ghostnet_jax.kernels.build

which writes ``_depthwise_cpu.so`` next to this file. Without it (or with
``GHOSTNET_JAX_DISABLE_KERNELS=1``, or when the default backend is not the
CPU) :func:`is_available` is False and :mod:`ghostnet_jax.ops` uses its
pure-XLA lowering.

Dtypes: float32 runs in the kernels; bfloat16 and float16 are computed in
float32 and cast back (what XLA:CPU does for them anyway); any other dtype
(float64 under ``jax_enable_x64``) goes to the pure-XLA lowering, so no
precision is lost silently.

Transformations: ``jit``, reverse-mode ``grad``/``vjp`` (first order: the
backward kernels are not differentiable again), ``jax.checkpoint`` and ``vmap``
(the kernels treat leading batch dimensions as independent problems,
``vmap_method='expand_dims'``). Forward-mode AD (``jvp``, ``jacfwd``,
``hessian``) is not supported, as for any ``custom_vjp``; use ``impl='xla'``
for it.

Sharding: the kernels have no partitioning rule, so under ``jit`` with inputs
sharded over several devices XLA gathers the operands and every device computes
the whole convolution (correct, but redundant work). For data parallelism over
several CPU devices, call the model inside ``jax.shard_map`` (each device then
runs the kernels on its shard), or use ``impl='xla'``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax.conv_rewrites import depthwise_conv2d_xla
from ghostnet_jax.shapes import conv_out_size

LIBRARY = '_depthwise_cpu.so'  # the name build.py writes
DISABLE_ENV = 'GHOSTNET_JAX_DISABLE_KERNELS'

_TARGETS = {  # jax.ffi target name -> exported handler symbol
    'ghostnet_jax_depthwise_forward': 'GhostnetDepthwiseForward',
    'ghostnet_jax_depthwise_input_grad': 'GhostnetDepthwiseInputGrad',
    'ghostnet_jax_depthwise_weight_grad': 'GhostnetDepthwiseWeightGrad',
    'ghostnet_jax_depthwise_backward': 'GhostnetDepthwiseBackward',
}
_FORWARD, _INPUT_GRAD, _WEIGHT_GRAD, _BACKWARD = _TARGETS

# Dtypes computed in float32 by the kernels; others use the XLA lowering.
_FLOAT32_COMPATIBLE = frozenset(
    np.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16))

Padding = Sequence[tuple[int, int]]


def library_path() -> str:
  """Where the compiled kernels are expected."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY)


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
  """Loads and registers the kernels once; returns None or why it failed."""
  with _LOAD_LOCK:
    return _load_unlocked()


def _load_unlocked() -> str | None:
  path = library_path()
  if not os.path.exists(path):
    return (f'{path} not found; build it with '
            '`python -m ghostnet_jax.kernels.build`')
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except Exception as e:  # pylint: disable=broad-except
    return f'loading {path} failed: {type(e).__name__}: {e}'
  return None


def load_error() -> str | None:
  """Why the kernels are unavailable, or None when they are available."""
  if os.environ.get(DISABLE_ENV, '') not in ('', '0'):
    return f'disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}'
  try:
    backend = jax.default_backend()
  except Exception as e:  # pylint: disable=broad-except
    return f'no JAX backend: {e}'
  if backend != 'cpu':
    return f'the default backend is {backend!r}; the kernels are CPU-only'
  return _load()


def is_available() -> bool:
  """True when the kernels are built, loaded and the default backend is CPU.

  Never raises; :func:`load_error` says why not.
  """
  return load_error() is None


def supports(kernel_shape, strides, padding) -> bool:
  """Whether :func:`depthwise_conv2d` handles this depthwise convolution.

  Args:
    kernel_shape: ``(kh, kw, 1, C)``.
    strides: ``(sh, sw)``, positive.
    padding: ``((top, bottom), (left, right))``, non-negative.
  """
  if len(kernel_shape) != 4 or kernel_shape[2] != 1:
    return False
  if any(int(d) < 1 for d in kernel_shape):
    return False
  if len(strides) != 2 or any(int(s) < 1 for s in strides):
    return False
  if len(padding) != 2 or any(len(p) != 2 for p in padding):
    return False
  return all(int(v) >= 0 for p in padding for v in p)


def _attrs(strides, padding) -> dict[str, np.int64]:
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr))


def _call(target, shapes, *args, strides, padding):
  error = _load()
  if error is not None:
    raise RuntimeError(f'The depthwise CPU kernels are unavailable: {error}.')
  # 'expand_dims': under vmap, unbatched operands get a leading 1 and the
  # kernels broadcast them (no copies); outputs are batched.
  return jax.ffi.ffi_call(
      target, [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes],
      vmap_method='expand_dims')(*args, **_attrs(strides, padding))


def forward(x, kernel, strides, padding):
  """Forward kernel. ``x (N, H, W, C)``, ``kernel (kh, kw, 1, C)`` float32 ->
  ``(N, Ho, Wo, C)``."""
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  shape = (n, conv_out_size(h, kh, strides[0], padding[0]),
           conv_out_size(w, kw, strides[1], padding[1]), c)
  y, = _call(_FORWARD, [shape], x, kernel, strides=strides, padding=padding)
  return y


def input_grad(dy, kernel, x_shape, strides, padding):
  """Input-gradient kernel. ``dy (N, Ho, Wo, C)``, ``kernel (kh, kw, 1, C)``
  -> ``dx`` of shape ``x_shape = (N, H, W, C)``."""
  dx, = _call(_INPUT_GRAD, [tuple(x_shape)], dy, kernel, strides=strides,
              padding=padding)
  return dx


def weight_grad(x, dy, kernel_shape, strides, padding):
  """Weight-gradient kernel. ``x (N, H, W, C)``, ``dy (N, Ho, Wo, C)`` ->
  ``dw`` of shape ``kernel_shape = (kh, kw, 1, C)``."""
  dw, = _call(_WEIGHT_GRAD, [tuple(kernel_shape)], x, dy, strides=strides,
              padding=padding)
  return dw


def backward(x, dy, kernel, strides, padding):
  """Both gradients in one pass over ``x`` and ``dy`` (what the VJP uses).

  ``x (N, H, W, C)``, ``dy (N, Ho, Wo, C)``, ``kernel (kh, kw, 1, C)`` ->
  ``(dx, dw)``, equal to :func:`input_grad` and :func:`weight_grad` bit for
  bit.
  """
  dx, dw = _call(_BACKWARD, [x.shape, kernel.shape], x, dy, kernel,
                 strides=strides, padding=padding)
  return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_f32(x, kernel, strides, padding):
  return forward(x, kernel, strides, padding)


def _depthwise_f32_fwd(x, kernel, strides, padding):
  return forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_f32_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  return backward(x, dy, kernel, strides, padding)


_depthwise_f32.defvjp(_depthwise_f32_fwd, _depthwise_f32_bwd)


def _normalize(strides, padding):
  strides = tuple(int(s) for s in strides)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return strides, padding


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides,
                     padding: Padding) -> jax.Array:
  """Depthwise convolution in the compiled kernels, differentiable.

  Args:
    x: ``(N, H, W, C)``.
    kernel: ``(kh, kw, 1, C)``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.

  Returns:
    ``(N, Ho, Wo, C)`` with ``Ho = (H + top + bottom - kh) // sh + 1``, in
    ``jnp.result_type(x, kernel)``. Dtypes other than float32, bfloat16 and
    float16 are computed by :func:`ghostnet_jax.conv_rewrites.depthwise_conv2d_xla`.
  """
  strides, padding = _normalize(strides, padding)
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2:] != (1, x.shape[3]):
    raise ValueError(f'Expected x (N, H, W, C) and kernel (kh, kw, 1, C); got '
                     f'{x.shape} and {kernel.shape}.')
  if not supports(kernel.shape, strides, padding):
    raise ValueError(f'Unsupported depthwise convolution: kernel '
                     f'{kernel.shape}, strides {strides}, padding {padding}.')
  dtype = np.dtype(jnp.result_type(x, kernel))
  empty = any(conv_out_size(x.shape[1 + a], kernel.shape[a], strides[a],
                        padding[a]) < 1 for a in (0, 1))
  if dtype not in _FLOAT32_COMPATIBLE or empty or x.size == 0:
    return depthwise_conv2d_xla(x, kernel, strides, padding)
  y = _depthwise_f32(x.astype(jnp.float32), kernel.astype(jnp.float32),
                     strides, padding)
  return y.astype(dtype)
