"""Convolutions rewritten in plain XLA for XLA:CPU (the ``'xla'`` lowering).

XLA:CPU lowers grouped convolutions, and 1x1 convolutions, far slower than the
same arithmetic written as slices and matmuls. These functions compute the
same result in that form; :mod:`ghostnet_jax.ops` picks them per convolution,
and :mod:`ghostnet_jax.kernels` falls back to :func:`depthwise_conv2d_xla` for
dtypes its compiled kernels do not take. Layouts: ``x`` ``(N, H, W, Cin)``,
kernels ``(kh, kw, Cin // groups, Cout)`` (Flax's), explicit
``((top, bottom), (left, right))`` padding.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ghostnet_jax.shapes import conv_out_size


def conv_lax(x, kernel, strides, padding, groups, precision, dilation=(1, 1)):
  """``lax.conv_general_dilated`` in NHWC / HWIO."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      rhs_dilation=dilation, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=precision)


def depthwise_conv2d_xla(x, kernel, strides, padding, dilation=(1, 1)):
  """Depthwise convolution as a sum of shifted, per-channel-scaled slices.

  Args:
    x: ``(N, H, W, C)``.
    kernel: ``(kh, kw, 1, C)``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.
    dilation: ``(dh, dw)``, the spacing of the kernel taps (atrous).

  Returns:
    ``(N, Ho, Wo, C)`` with
    ``Ho = (H + top + bottom - dh * (kh - 1) - 1) // sh + 1``.
  """
  kh, kw, _, c = kernel.shape
  n, h, w, _ = x.shape
  sh, sw = strides
  dh, dw = dilation
  ho = conv_out_size(h, kh, sh, padding[0], dh)
  wo = conv_out_size(w, kw, sw, padding[1], dw)
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      y0, x0 = i * dh, j * dw
      tap = lax.slice(
          xp, (0, y0, x0, 0),
          (n, y0 + sh * (ho - 1) + 1, x0 + sw * (wo - 1) + 1, c),
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
                         precision=None, dilation=(1, 1)):
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
    precision: passed to each convolution.
    dilation: ``(dh, dw)`` kernel dilation.
  """
  cig = kernel.shape[2]
  cog = kernel.shape[3] // groups
  outs = [
      conv_lax(x[..., g * cig:(g + 1) * cig],
                kernel[..., g * cog:(g + 1) * cog], strides, padding, 1,
                precision, dilation)
      for g in range(groups)]
  return jnp.concatenate(outs, axis=-1)
