"""Layers with PyTorch semantics, shared by every GhostNet family member.

Conventions (all modules):

* Images and feature maps are NHWC: ``(N, H, W, C)``.
* Convolution kernels are ``(kh, kw, in // groups, out)``; padding is
  symmetric ``k // 2`` as in PyTorch (not XLA's ``'SAME'``, which pads stride-2
  convolutions asymmetrically; ``Conv2d(padding='SAME')`` gives that one).
* BatchNorm uses PyTorch's defaults: eps 1e-5, momentum 0.1 (written 0.9 in
  Flax's convention), running variance updated with the *unbiased* batch
  variance. Parameters ``scale``/``bias``, statistics ``mean``/``var`` in the
  ``batch_stats`` collection.
* ``dtype`` is the computation dtype; parameters and BN statistics stay in
  ``param_dtype`` (float32).
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnet_jax import initializers, ops
from ghostnet_jax.shapes import is_int, pair

Dtype = Any
ModuleDef = Any


def make_divisible(v: float, divisor: int = 4, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """Rounds ``v`` to a multiple of ``divisor``, never below ``round_limit * v``.

  The channel rounding of the GhostNet papers: ``make_divisible(9) == 12``
  because 8 would drop more than 10%.
  """
  min_value = divisor if min_value is None else min_value
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return int(new_v)


def check_ghost_args(name, out_features, ratio, dw_size,
                     features_arg='out_features') -> None:
  """ValueErrors for Ghost module arguments that cannot work."""
  if not is_int(out_features) or out_features < 1:
    raise ValueError(f'{name}: {features_arg} must be an int >= 1, got '
                     f'{out_features!r}.')
  if not is_int(ratio) or ratio < 1:
    raise ValueError(f'{name}: ratio must be an int >= 1 (1 = no ghost maps, '
                     f'a plain conv), got {ratio!r}.')
  if not is_int(dw_size) or dw_size < 1 or dw_size % 2 == 0:
    raise ValueError(f'{name}: dw_size must be a positive odd int (the cheap '
                     f'op keeps the spatial size), got {dw_size!r}.')


def param(module: nn.Module, name: str, init: Callable, shape: tuple,
          dtype: Dtype) -> jax.Array:
  """``module.param(name, init, shape, dtype)``, without re-running ``init``.

  When the parameter exists (``apply``), Flax's ``param`` traces ``init``
  abstractly to compare shapes: ~1 ms per parameter, a third of tracing a
  GhostNet forward. This checks the shape directly, with the same error.
  """
  if module.has_variable('params', name):
    value = flax.core.meta.unbox(module.get_variable('params', name))
    if tuple(value.shape) != tuple(shape):
      raise flax.errors.ScopeParamShapeError(
          name, '/' + '/'.join(module.path), tuple(value.shape), tuple(shape))
    return value
  return module.param(name, init, shape, dtype)


def torch_default_kernel_init():
  """PyTorch's default conv/linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return initializers.VarianceScaling(1.0 / 3.0, 'fan_in', 'uniform')


def he_normal_fan_out():
  """``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` (RegNet/ResNet)."""
  return initializers.VarianceScaling(2.0, 'fan_out', 'normal')  # untruncated


class Conv2d(nn.Module):
  """A 2D convolution with PyTorch padding and a selectable lowering.

  ``(N, H, W, Cin) -> (N, Ho, Wo, features)``. The kernel is
  ``(kh, kw, Cin // groups, features)`` whatever ``impl`` computes it
  (see :mod:`ghostnet_jax.ops`), so converted weights work with all of them.

  Attributes:
    features: output channels.
    kernel_size: int or ``(kh, kw)``.
    strides: int or ``(sh, sw)``.
    padding: ``None`` for symmetric ``dilation * (k - 1) // 2`` (``k // 2``
      undilated); ``'SAME'`` for TensorFlow's ``'SAME'``, computed from the
      input size at trace time (asymmetric at stride 2 on even sizes; see
      :func:`ghostnet_jax.ops.same_padding`); an int for the same padding on
      all sides; or ``((top, bottom), (left, right))``.
    groups: feature groups; ``groups == Cin == features`` is depthwise.
    use_bias: add a learned bias.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    impl: ``'auto'``, ``'lax'``, ``'xla'`` or ``'ffi'``.
    kernel_init: initializer for the kernel.
    dilation: int or ``(dh, dw)``, spacing of the kernel taps (atrous
      convolution, for output stride 16 / 8); no effect on parameters.
  """
  features: int
  kernel_size: int | tuple[int, int] = 1
  strides: int | tuple[int, int] = 1
  padding: Any = None
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = 'auto'
  kernel_init: Callable = torch_default_kernel_init()
  dilation: int | tuple[int, int] = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = pair(self.kernel_size)
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(
          f'{self.name}: in ({cin}) and out ({self.features}) channels must be '
          f'divisible by groups ({self.groups}).')
    kernel = param(self, 'kernel', self.kernel_init,
                   (kh, kw, cin // self.groups, self.features),
                   self.param_dtype)
    padding = self.padding
    if padding is None:
      padding = ops.same_padding((kh, kw), self.dilation)
    elif isinstance(padding, str):
      if padding != 'SAME':
        raise ValueError(f"{self.name}: padding must be None, 'SAME', an int "
                         f'or ((top, bottom), (left, right)); got {padding!r}.')
      padding = ops.same_padding((kh, kw), self.dilation,
                                 input_size=x.shape[1:3], strides=self.strides)
    elif isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    y = ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                   strides=pair(self.strides), padding=padding,
                   groups=self.groups, impl=self.impl,
                   dilation=pair(self.dilation))
    if self.use_bias:
      fan_in = kh * kw * cin // self.groups
      bias = param(self, 'bias', _torch_bias_init(fan_in), (self.features,),
                   self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _torch_bias_init(fan_in: int) -> initializers.Uniform:
  return initializers.Uniform(1.0 / math.sqrt(max(fan_in, 1)))


def Linear(features: int, *, name: str, dtype: Dtype = jnp.float32,
           param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """``torch.nn.Linear`` as a Flax ``Dense``: kernel ``(in, out)``, bias."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=torch_default_kernel_init(), name=name)


# Paths of the BatchNorms folded into the convolution before them, for the
# trace in progress (set by ghostnet_jax.inference.folded_batchnorms).
FOLDED_BATCHNORMS: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    'ghostnet_jax_folded_batchnorms', default=frozenset())


class BatchNorm(nn.Module):
  """BatchNorm over the channel (last) axis with PyTorch's semantics.

  ``(N, ..., C) -> (N, ..., C)``. In training the batch is normalised with its
  biased variance and the running statistics are updated as
  ``running = momentum * running + (1 - momentum) * batch`` with the unbiased
  variance (``torch.nn.BatchNorm2d``). Statistics are computed in float32.

  Under ``jax.jit`` with the batch sharded over devices the statistics are
  global (synchronised BN; XLA inserts the all-reduce). ``batch_groups > 1``
  instead normalises each of ``batch_groups`` equal slices of the batch on its
  own, which with one slice per device is PyTorch DDP without SyncBN; the
  running statistics are updated with the mean over the slices.

  Attributes:
    momentum: Flax convention; 0.9 equals PyTorch's ``momentum=0.1``.
    epsilon: added to the variance.
    batch_groups: number of independent normalisation groups in training.
    unbiased_running_var: update the running variance with n / (n - 1).
    axis_name: optional named axis to average statistics over (shard_map).
    dtype: output dtype (defaults to the input's).
    param_dtype: dtype of scale, bias and statistics.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  batch_groups: int = 1
  unbiased_running_var: bool = True
  axis_name: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    scale = param(self, 'scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = param(self, 'bias', nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda: jnp.zeros((c,), self.param_dtype))
    ra_var = self.variable('batch_stats', 'var',
                           lambda: jnp.ones((c,), self.param_dtype))
    dtype = x.dtype if self.dtype is None else self.dtype

    if not train:
      if tuple(self.path) in FOLDED_BATCHNORMS.get():
        # ghostnet_jax.inference: the affine map lives in the convolution
        # before; what is left is the shift.
        return (x + bias).astype(dtype)
      mean, var = ra_mean.value, ra_var.value
      y = _normalize(x, mean, var, scale, bias, self.epsilon)
      return y.astype(dtype)

    xf = x.astype(jnp.float32)
    g = self.batch_groups
    n = x.shape[0]
    if n % g:
      raise ValueError(f'{self.name}: batch {n} is not divisible by '
                       f'batch_groups={g}.')
    xg = xf.reshape((g, n // g) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    count = math.prod(xg.shape[1:-1])
    mean = xg.mean(axes, keepdims=True)
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
    var = jnp.square(xg - mean).mean(axes, keepdims=True)
    if self.axis_name is not None:
      var = jax.lax.pmean(var, self.axis_name)
      count *= jax.lax.psum(1, self.axis_name)
    y = _normalize(xg, mean, var, scale, bias, self.epsilon)
    y = y.reshape(x.shape).astype(dtype)

    if not self.is_initializing():
      batch_mean = mean.reshape(g, c).mean(0)
      batch_var = var.reshape(g, c).mean(0)
      if self.unbiased_running_var and count > 1:
        batch_var = batch_var * (count / (count - 1))
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * batch_mean
      ra_var.value = m * ra_var.value + (1 - m) * batch_var
    return y


def _normalize(x, mean, var, scale, bias, eps):
  mul = scale * jax.lax.rsqrt(var + eps)
  return x * mul + (bias - mean * mul)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excite with a hard-sigmoid gate (GhostNet's SE).

  ``(N, H, W, C) -> (N, H, W, C)``: global average pool (float32),
  ``conv_reduce`` 1x1 (bias) -> ReLU -> ``conv_expand`` 1x1 (bias) -> gate,
  then the input is scaled channel-wise.

  Attributes:
    reduced_features: channels after ``conv_reduce``.
    gate: gating function; ``jax.nn.hard_sigmoid`` is relu6(x + 3) / 6.
    conv: convolution factory.
  """
  reduced_features: int
  gate: Callable[[jax.Array], jax.Array] = jax.nn.hard_sigmoid
  conv: ModuleDef = Conv2d

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    s = x.astype(jnp.float32).mean((1, 2), keepdims=True)
    conv = functools.partial(self.conv, kernel_size=1, use_bias=True,
                             dtype=jnp.float32)
    s = conv(self.reduced_features, name='conv_reduce')(s)
    s = nn.relu(s)
    s = conv(c, name='conv_expand')(s)
    return x * self.gate(s).astype(x.dtype)


class ConvBnAct(nn.Module):
  """``conv`` -> ``bn1`` -> ReLU, the module timm and the official code use for
  GhostNet's last 1x1 convolution. ``(N, H, W, Cin) -> (N, Ho, Wo, features)``.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  act: bool = True
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.conv(self.features, self.kernel_size, strides=self.strides,
                  name='conv')(x)
    x = self.norm(name='bn1')(x, train)
    return nn.relu(x) if self.act else x


def check_images(x: jax.Array, in_chans: int = 3, min_size: int = 1,
                 model: str = 'model') -> None:
  """Raises a ValueError naming the problem unless ``x`` is ``(N, H, W, C)``."""
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f'{model} expects images of shape (N, H, W, {in_chans}) (NHWC); got '
        f'shape {shape}. Add a batch axis with images[None] for one image.')
  if shape[-1] != in_chans:
    hint = (' It looks like NCHW: transpose with x.transpose(0, 2, 3, 1).'
            if shape[1] == in_chans else '')
    raise ValueError(
        f'{model} expects {in_chans} channels in the last axis (NHWC); got '
        f'shape {tuple(shape)}.{hint}')
  if shape[1] < min_size or shape[2] < min_size:
    raise ValueError(
        f'{model} needs images of at least {min_size}x{min_size}; got '
        f'{shape[1]}x{shape[2]}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f'{model} expects float images (normalised with the model mean/std); '
        f'got dtype {x.dtype}.')


def sow_feature(module: nn.Module, name: str, x: jax.Array) -> None:
  """Records a feature map in the ``'intermediates'`` collection (if mutable).

  :func:`ghostnet_jax.extract_features` reads them back.
  """
  module.sow('intermediates', name, x,
             init_fn=lambda: None, reduce_fn=lambda _, new: new)
