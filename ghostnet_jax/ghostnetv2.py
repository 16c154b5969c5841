"""GhostNetV2: "Enhance Cheap Operation with Long-Range Attention".

Tang et al., NeurIPS 2022.

GhostNetV2 is GhostNet (same block table, stem, head, SE and shortcuts) whose
expansion Ghost module (``ghost1``) of every block from the third on
(``layer_id >= 2``) is multiplied by a *DFC attention* gate: a decoupled
fully-connected attention computed at half resolution from the module input::

  g = AvgPool2x2(x)                            # floor mode: 7x7 -> 3x3
  g = BN(Conv1x1(g))                           # short_conv.0, .1: -> out ch.
  g = BN(DWConv_1x5(g))                        # short_conv.2, .3: horizontal
  g = BN(DWConv_5x1(g))                        # short_conv.4, .5: vertical
  gate = NearestUpsample(sigmoid(g), (H, W))   # PyTorch's floor-index rule
  out = GhostModule(x) * gate

Parameter names follow the official code (``blocks.3.0.ghost1.short_conv.2.
weight`` is ``params['blocks_3_0']['ghost1']['short_conv_2']['kernel']``), and
the official and timm checkpoints use the same names.
"""

from __future__ import annotations

import numpy as np
import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnet_jax.ghostnet import GhostBottleneck, GhostModule, GhostNet
from ghostnet_jax.layers import BatchNorm, Conv2d, ModuleDef
from ghostnet_jax.registry import register_model

# Blocks with a smaller layer index keep the plain Ghost module (official
# ``layer_id <= 1`` -> mode 'original').
FIRST_ATTENTION_LAYER = 2


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2, no padding, floor mode.

  ``(N, H, W, C) -> (N, H // 2, W // 2, C)``; an odd last row / column is
  dropped, as ``torch.nn.functional.avg_pool2d(x, 2, 2)`` does.
  """
  n, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  if ho == 0 or wo == 0:
    raise ValueError(f'2x2 average pooling needs at least 2x2 inputs; got '
                     f'{h}x{w}.')
  x = x[:, :2 * ho, :2 * wo, :].reshape(n, ho, 2, wo, 2, c)
  return x.mean(axis=(2, 4))


def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's ``F.interpolate(mode='nearest', size=...)``.

  ``src = min(floor(dst * scale), in_size - 1)`` with the float32
  ``scale = in_size / out_size``, the arithmetic of PyTorch's CPU and CUDA
  kernels. This is *not* the half-pixel rule ``floor((dst + 0.5) * scale)``
  (``mode='nearest-exact'``): at 3 -> 7 it gives rows 0,0,0,1,1,2,2 where the
  half-pixel rule gives 0,0,1,1,1,2,2.

  Returns:
    ``(out_size,)`` int32 indices into the input axis.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'Sizes must be positive; got {in_size} -> {out_size}.')
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale)
  return np.minimum(src.astype(np.int64), in_size - 1).astype(np.int32)


def nearest_upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize with PyTorch's legacy ``'nearest'`` rule.

  ``(N, h, w, C) -> (N, size[0], size[1], C)``, an explicit gather with the
  indices of :func:`torch_nearest_indices`.
  """
  rows = torch_nearest_indices(x.shape[1], size[0])
  cols = torch_nearest_indices(x.shape[2], size[1])
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class DFCAttention(nn.Module):
  """The DFC attention gate of GhostNetV2 (module docstring).

  ``(N, H, W, Cin) -> (N, H, W, features)``, values in (0, 1). Its layers are
  named ``short_conv_0`` ... ``short_conv_5`` (official ``short_conv.0..5``);
  :class:`GhostModuleV2` shares its scope with it, so they sit directly in the
  Ghost module's parameters.

  Attributes:
    features: gate channels (the Ghost module's output channels).
    conv, norm: layer factories.
    dilation: dilation of the 1x5 and 5x1 convolutions (output stride
      16 / 8). The gate is still computed on the 2x2-pooled map and
      upsampled; dilating its two long kernels by the stride the network
      dropped keeps their reach in image pixels what it is at output
      stride 32 (a tap every 64 px in the last stage).
  """
  features: int
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _, h, w, _ = x.shape
    if h < 2 or w < 2:
      raise ValueError(
          f'DFC attention pools its input 2x2 and needs feature maps of at '
          f'least 2x2; got {h}x{w}. The input image is too small for '
          'GhostNetV2/V3 (use at least 33x33).')
    c = self.features
    g = avg_pool_2x2(x)
    g = self.conv(c, 1, name='short_conv_0')(g)
    g = self.norm(name='short_conv_1')(g, train)
    d = self.dilation
    g = self.conv(c, (1, 5), groups=c, dilation=d, name='short_conv_2')(g)
    g = self.norm(name='short_conv_3')(g, train)
    g = self.conv(c, (5, 1), groups=c, dilation=d, name='short_conv_4')(g)
    g = self.norm(name='short_conv_5')(g, train)
    return nearest_upsample(jax.nn.sigmoid(g), (h, w))


def dfc_gate(parent: nn.Module, x: jax.Array, features: int, conv: ModuleDef,
             norm: ModuleDef, train: bool, dilation: int = 1) -> jax.Array:
  """Runs :class:`DFCAttention` in ``parent``'s scope (flat parameter names).

  Call from inside ``parent``'s compact method.
  """
  attention = DFCAttention(features, conv=conv, norm=norm, dilation=dilation)
  nn.share_scope(parent, attention)
  return attention(x, train)


class GhostModuleV2(GhostModule):
  """Ghost module times the DFC attention gate (official mode ``'attn'``).

  ``(N, H, W, Cin) -> (N, H, W, out_features)``::

    out = GhostModule(x)[..., :out_features] * DFCAttention(x)

  Same attributes as :class:`~ghostnet_jax.ghostnet.GhostModule`; the
  attention uses the same ``conv`` / ``norm`` factories.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    gate = dfc_gate(self, x, self.out_features, self.conv, self.norm, train,
                    self.dilation)
    out = super().__call__(x, train)
    return out * gate.astype(out.dtype)


class GhostNetV2(GhostNet):
  """GhostNetV2 for any width multiplier.

  ``(N, H, W, 3) -> (N, num_classes)``. :class:`~ghostnet_jax.ghostnet.
  GhostNet` with :class:`GhostModuleV2` as ``ghost1`` of blocks
  ``layer_id >= 2``; same attributes, features and parameter names. Inputs
  must be at least 33x33 (the DFC gate pools the 1/32 feature map).
  """

  def make_block(self, layer_id: int, mid: int, out: int, k: int, stride: int,
                 se_ratio: float, name: str, **dilation) -> nn.Module:
    conv, norm = self.layer_factories()
    ghost1 = GhostModuleV2 if layer_id >= FIRST_ATTENTION_LAYER else GhostModule
    return GhostBottleneck(mid, out, dw_kernel_size=k, stride=stride,
                           se_ratio=se_ratio, ghost1=ghost1, conv=conv,
                           norm=norm, name=name, **dilation)


def _register_width(name: str, width: float, paper_top1: float,
                    weights: str, notes: str):
  @register_model(name, family='ghostnetv2', paper_top1=paper_top1,
                  weights=weights, notes=notes,
                  default_preprocess='official')
  def builder(**kwargs) -> GhostNetV2:
    return GhostNetV2(width=width, **kwargs)
  builder.__name__ = name
  builder.__doc__ = f'GhostNetV2 {width}x.'
  return builder


ghostnetv2_100 = _register_width(
    'ghostnetv2_100', 1.0, 75.3, 'ck_ghostnetv2_10.pth.tar',
    'official weights (release GhostNetV2); timm measures 75.19 (bicubic)')
ghostnetv2_130 = _register_width(
    'ghostnetv2_130', 1.3, 76.9, 'ck_ghostnetv2_13.pth.tar',
    'official weights (release GhostNetV2); timm measures 76.75 (bicubic)')
ghostnetv2_160 = _register_width(
    'ghostnetv2_160', 1.6, 77.8, 'ck_ghostnetv2_16.pth.tar',
    'official weights (release GhostNetV2); timm measures 77.84 (bicubic)')
