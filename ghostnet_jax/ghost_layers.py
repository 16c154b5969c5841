"""``GhostConv``: the Ghost module as a drop-in for ``flax.linen.Conv``.

The GhostNet paper presents the Ghost module as a plug-and-play replacement
for the convolutions of an existing network. ``GhostConv`` takes the
arguments of ``nn.Conv`` and computes ``features`` output maps the Ghost way:
an ordinary convolution with the requested kernel, stride and padding makes
``m = ceil(features / ratio)`` intrinsic maps, a cheap ``dw_size x dw_size``
depthwise convolution (stride 1) derives ``ratio - 1`` ghost maps from each
of them, and the two are concatenated (and cut to ``features``)::

  primary = Conv_kxk/stride(x)        # (N, H', W', m)
  ghosts  = DWConv_dxd(primary)       # (N, H', W', m * (ratio - 1))
  y       = concat([primary, ghosts])[..., :features]

Cost, for input channels ``C``, a ``kh x kw`` kernel and an ``H' x W'``
output (biases and BatchNorm left out; ``n = m * (ratio - 1)``)::

                nn.Conv                 GhostConv
  parameters    kh*kw*C*F               kh*kw*C*m + d*d*n
  MACs          H'*W'*kh*kw*C*F         H'*W'*(kh*kw*C*m + d*d*n)

With ``F`` divisible by ``s = ratio`` the saving factor of both is
``s * kh*kw*C / (kh*kw*C + (s - 1) * d*d)``, just under ``s`` whenever
``kh*kw*C >> d*d`` (the paper's speed-up and compression ratios). Example: a 3x3 conv 256 -> 256 has
589,824 weights; ``GhostConv(256, 3)`` has 294,912 + 1,152 = 296,064 (1.99x
fewer), ``ratio=4`` 147,456 + 1,728 = 149,184 (3.95x fewer). With use_bias
each of the two convs has a bias (``m + n`` numbers instead of ``F``); with
``use_norm`` each has a BatchNorm (``2 * (m + n)`` parameters and as many
running statistics).

BatchNorm: the paper's Ghost module puts BN (and ReLU where the replaced
layer had one) after both convolutions. A drop-in for ``nn.Conv`` should be a
stateless linear layer, so ``GhostConv`` has **no BN by default**: swapping
it in needs no ``train`` flag and no ``batch_stats``, and a network that
already normalises after the conv keeps doing so on all ``features``
channels. ``use_norm=True`` gives the paper's module (BN after the primary
and after the cheap conv, each with PyTorch's BN semantics; then call it with
``train=`` and make ``batch_stats`` mutable in training); ``relu=True`` adds
the ReLU to both branches, as GhostNet's expansion module does. Without BN
or ReLU the ghost maps are a fixed linear function of the intrinsic ones.

Upgrading a model: a model that takes its conv layer as a factory (the
pattern of this package) switches with one argument::

  import functools
  from typing import Any
  import flax.linen as nn
  from ghostnet_jax import GhostConv

  class SmallCNN(nn.Module):
    num_classes: int = 10
    conv: Any = nn.Conv                        # the layer to upgrade

    @nn.compact
    def __call__(self, x):                     # (N, 32, 32, 3)
      x = nn.relu(nn.Conv(32, (3, 3))(x))      # the stem stays a plain conv
      x = nn.relu(self.conv(64, (3, 3), strides=2)(x))
      x = nn.relu(self.conv(128, (3, 3), strides=2)(x))
      return nn.Dense(self.num_classes)(x.mean((1, 2)))   # (N, 10)

  baseline = SmallCNN()                                  # 94,538 parameters
  ghost = SmallCNN(conv=functools.partial(GhostConv, ratio=2))   # 49,322

Code that names ``nn.Conv`` directly changes ``nn.Conv(...)`` to
``GhostConv(...)`` with the same arguments. Keep the first convolution of a
network (3 input channels, nothing to save) and the classifier as they are.

Parameters are named like the Ghost modules of the GhostNet models
(``primary_conv_0`` / ``cheap_operation_0`` convolutions, ``primary_conv_1`` /
``cheap_operation_1`` BatchNorms); initialisation follows PyTorch's defaults
like every layer of the package (``nn.Conv`` uses LeCun-normal kernels and
zero biases; pass ``kernel_init`` to change the kernels).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ghostnet_jax.ghostnet import GhostModule
from ghostnet_jax.layers import check_ghost_args as _check_ghost_args
from ghostnet_jax.shapes import is_int as _is_int, pair
from ghostnet_jax.layers import BatchNorm, Conv2d, torch_default_kernel_init


class _NoNorm(nn.Module):
  """The identity in BatchNorm's call signature (no parameters)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    return x


def _explicit_padding(padding, spatial, kernel, strides,
                      name: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """``nn.Conv``-style padding as ``((top, bottom), (left, right))``."""
  if padding is None:  # PyTorch's symmetric k // 2, the package convention.
    return tuple((k // 2, k // 2) for k in kernel)
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"{name}: padding must be 'SAME', 'VALID', None, an int "
                       f'or ((top, bottom), (left, right)), got {padding!r}.')
    return tuple(tuple(p) for p in lax.padtype_to_pads(
        spatial, kernel, strides, padding.upper()))
  if _is_int(padding):
    return ((padding, padding), (padding, padding))
  pads = tuple(tuple(p) for p in padding)
  if len(pads) != 2 or not all(len(p) == 2 for p in pads):
    raise ValueError(f'{name}: padding must be ((top, bottom), (left, right)) '
                     f'for a 2D conv, got {padding!r}.')
  return pads


class GhostConv(nn.Module):
  """A Ghost module with ``nn.Conv``'s interface (module docstring).

  ``(N, H, W, C) -> (N, H', W', features)`` where ``H'``/``W'`` are what
  ``nn.Conv`` with the same ``kernel_size``, ``strides`` and ``padding``
  gives (``ceil(H / stride)`` for ``'SAME'``).

  Attributes:
    features: output channels ``F``.
    kernel_size: kernel of the primary convolution, int or ``(kh, kw)``.
    strides: stride of the primary convolution, int or ``(sh, sw)``.
    padding: ``'SAME'`` (default, as ``nn.Conv``), ``'VALID'``, an int,
      ``((top, bottom), (left, right))``, or ``None`` for PyTorch's symmetric
      ``k // 2``. Applies to the primary conv; the cheap conv keeps the size.
    ratio: ``s``, output maps per intrinsic map; 1 is a plain convolution.
    dw_size: ``d``, the odd kernel size of the cheap depthwise convolution.
    use_bias: a bias on both convolutions (``nn.Conv``'s default is True).
    use_norm: BatchNorm after both convolutions (the paper's Ghost module).
    relu: ReLU after both branches (after the BatchNorms).
    dtype: computation dtype; param_dtype: parameter dtype.
    kernel_init: initializer of both kernels.
    conv_impl: convolution lowering, see :mod:`ghostnet_jax.ops`.
  """
  features: int
  kernel_size: int | tuple[int, int] = 3
  strides: int | tuple[int, int] = 1
  padding: Any = 'SAME'
  ratio: int = 2
  dw_size: int = 3
  use_bias: bool = True
  use_norm: bool = False
  relu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = torch_default_kernel_init()
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the layer; ``train`` only matters with ``use_norm``."""
    name = f'GhostConv {self.name!r}'
    _check_ghost_args(name, self.features, self.ratio, self.dw_size,
                      features_arg='features')
    if self.ratio > 1 and self.features == 1:
      raise ValueError(
          f'{name}: features=1 leaves no room for ghost maps (the one output '
          f'is the intrinsic map, the cheap op would be computed and thrown '
          f'away); use ratio=1, which is a plain convolution.')
    kernel = pair(self.kernel_size, 'kernel_size', name, minimum=1)
    strides = pair(self.strides, 'strides', name, minimum=1)
    shape = getattr(x, 'shape', None)
    if shape is None or len(shape) != 4:
      raise ValueError(f'{name} expects NHWC input (N, H, W, C); got shape '
                       f'{shape}.')
    padding = _explicit_padding(self.padding, shape[1:3], kernel, strides,
                                name)
    conv = functools.partial(
        Conv2d, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        impl=self.conv_impl)
    norm = (functools.partial(BatchNorm, dtype=self.dtype,
                              param_dtype=self.param_dtype)
            if self.use_norm else _NoNorm)
    ghost = GhostModule(self.features, ratio=self.ratio, dw_size=self.dw_size,
                        relu=self.relu, conv=conv, norm=norm,
                        kernel_size=kernel, strides=strides, padding=padding)
    nn.share_scope(self, ghost)  # parameters directly under this layer
    return ghost(x, train)
