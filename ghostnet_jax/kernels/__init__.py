"""Compiled CPU kernels for depthwise convolution (registered with ``jax.ffi``).

Not built yet: :func:`is_available` is False and :mod:`ghostnet_jax.ops` falls
back to the pure-XLA lowering.
"""


def is_available() -> bool:
  return False


def supports(kernel_shape, strides, padding) -> bool:
  del kernel_shape, strides, padding
  return False


def depthwise_conv2d(x, kernel, strides, padding):
  raise NotImplementedError('The depthwise CPU kernels are not built.')
