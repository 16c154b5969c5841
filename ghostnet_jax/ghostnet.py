"""GhostNet (C-GhostNet): "GhostNet: More Features from Cheap Operations".

Han et al., CVPR 2020; the CPU-side half of "GhostNets on Heterogeneous Devices
via Cheap Operations", IJCV 2022.

A Ghost module makes ``ceil(out / s)`` intrinsic feature maps with an ordinary
1x1 convolution and derives the other ``(s - 1) / s`` with a cheap ``d x d``
depthwise convolution of them; a Ghost bottleneck is two Ghost modules
(expansion with ReLU, projection without) around an optional strided depthwise
convolution and squeeze-excite, plus a shortcut.

Module and parameter names follow the official PyTorch code
(``blocks.6.3.ghost1.primary_conv.0.weight`` is
``params['blocks_6_3']['ghost1']['primary_conv_0']['kernel']``), so
:mod:`ghostnet_jax.convert` maps checkpoints by a fixed rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnet_jax.features import (FeatureLevel, StrideSchedule,
                                   check_output_stride, feature_taps,
                                   resolve_out_indices)
from ghostnet_jax.layers import (BatchNorm, Conv2d, ConvBnAct, Linear,
                                 ModuleDef, SqueezeExcite, check_ghost_args,
                                 check_images, make_divisible, sow_feature)
from ghostnet_jax.registry import register_model

# (dw kernel k, expansion channels, output channels, SE ratio, stride) per
# block; each inner tuple is one official ``blocks.{i}`` Sequential. The
# paper's Table 1.
GHOSTNET_BLOCKS: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    ((3, 200, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 184, 80, 0.0, 1),
     (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0.0, 1),
     (5, 960, 160, 0.25, 1)),
)
STEM_CHANNELS = 16
LAST_CHANNELS = 960
HEAD_CHANNELS = 1280
# ``GhostNet.padding``: PyTorch's symmetric k // 2, or TensorFlow's 'SAME'.
PADDINGS = ('torch', 'tf_same')


class GhostModule(nn.Module):
  """The Ghost module: intrinsic maps by an ordinary conv, ghosts by a cheap op.

  ``(N, H, W, Cin) -> (N, H / strides, W / strides, out_features)``::

    primary = ReLU(BN(Conv_kxk/stride(x)))      # ceil(out / ratio) channels
    cheap   = ReLU(BN(DWConv_dxd(primary)))     # (ratio - 1) x as many
    out     = concat([primary, cheap])[..., :out_features]

  GhostNet uses ``kernel_size=1, strides=1`` (the defaults). As in the paper's
  Eq. 2, the primary convolution may take the kernel size and stride of the
  convolution it replaces (Ghost-ResNet-50 uses a 3x3 primary conv with the
  block's stride); the cheap op then runs at the output resolution. With
  ``ratio=1`` there are no ghost maps and no cheap op: the module is
  Conv -> BN (-> ReLU).

  Attributes:
    out_features: output channels.
    ratio: ``s`` in the paper, the share of intrinsic maps is ``1 / s``.
    dw_size: ``d``, kernel size of the cheap depthwise convolution.
    relu: apply ReLU to both branches (True in ``ghost1``, False in
      ``ghost2``).
    conv: convolution factory; norm: BatchNorm factory.
    kernel_size: kernel of the primary convolution, int or ``(kh, kw)``.
    strides: stride of the primary convolution, int or ``(sh, sw)``.
    padding: padding of the primary convolution in ``Conv2d``'s format;
      ``None`` is PyTorch's symmetric ``k // 2``. The cheap op always keeps
      the size.
    dilation: dilation of the primary convolution (output stride 16 / 8).
    cheap_dilation: dilation of the cheap op; ``None`` is ``dilation``.
  """
  out_features: int
  ratio: int = 2
  dw_size: int = 3
  relu: bool = True
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  kernel_size: int | tuple[int, int] = 1
  strides: int | tuple[int, int] = 1
  padding: Any = None
  dilation: int = 1
  cheap_dilation: int | None = None

  @property
  def cheap_op_dilation(self) -> int:
    return self.dilation if self.cheap_dilation is None else self.cheap_dilation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_ghost_args(self.name, self.out_features, self.ratio, self.dw_size)
    init_channels = math.ceil(self.out_features / self.ratio)
    new_channels = init_channels * (self.ratio - 1)
    act = nn.relu if self.relu else (lambda y: y)

    padding = {} if self.padding is None else {'padding': self.padding}
    primary = self.conv(init_channels, self.kernel_size, strides=self.strides,
                        dilation=self.dilation, name='primary_conv_0',
                        **padding)(x)
    primary = act(self.norm(name='primary_conv_1')(primary, train))
    if new_channels == 0:
      return primary
    cheap = self.conv(new_channels, self.dw_size, groups=init_channels,
                      dilation=self.cheap_op_dilation,
                      name='cheap_operation_0')(primary)
    cheap = act(self.norm(name='cheap_operation_1')(cheap, train))
    out = jnp.concatenate([primary, cheap], axis=-1)
    return out[..., :self.out_features]


class GhostBottleneck(nn.Module):
  """Ghost bottleneck (paper Fig. 3).

  ``(N, H, W, Cin) -> (N, H / stride, W / stride, out_features)``::

    y = ghost1(x)                                   # expand to mid, ReLU
    y = BN(DWConv_kxk/stride(y))  if stride > 1     # conv_dw, bn_dw; no ReLU
    y = SE(y)                     if se_ratio > 0
    y = ghost2(y)                                   # project to out, no ReLU
    return y + shortcut(x)                          # no activation after add

  The shortcut is the identity when ``Cin == out_features`` and stride is 1,
  otherwise DWConv_kxk/stride -> BN -> Conv1x1 -> BN (``shortcut.0..3``).

  Attributes:
    mid_features: expansion channels.
    out_features: output channels.
    dw_kernel_size: kernel of the strided depthwise conv and the shortcut.
    stride: 1 or 2.
    se_ratio: squeeze-excite ratio on the mid channels (0 disables).
    ghost1: factory of the expansion module (``GhostModule``; GhostNetV2
      passes its attention module here).
    ghost2: factory of the projection module (``GhostModule``; GhostNetV3
      passes its re-parameterisable module here).
    conv, norm: layer factories.
    dilation: dilation of the spatial kernels before the stride point
      (``ghost1``, ``conv_dw``, ``shortcut_0``).
    dilate_stride: the stride becomes 1 and the layers after it (``ghost2``)
      dilate by ``dilation * stride`` (output stride 16 / 8). The block keeps
      its parameters (``conv_dw``, projection shortcut).

  Subclasses change the strided depthwise convolution by overriding
  :meth:`strided_depthwise`.
  """
  mid_features: int
  out_features: int
  dw_kernel_size: int = 3
  stride: int = 1
  se_ratio: float = 0.0
  ghost1: ModuleDef = GhostModule
  ghost2: ModuleDef = GhostModule
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  dilation: int = 1
  dilate_stride: bool = False

  @property
  def effective_stride(self) -> int:
    return 1 if self.dilate_stride else self.stride

  @property
  def dilation_out(self) -> int:
    return self.dilation * self.stride if self.dilate_stride else self.dilation

  def strided_depthwise(self, y: jax.Array, train: bool) -> jax.Array:
    """``conv_dw`` -> ``bn_dw``: ``(N, H, W, mid) -> (N, Ho, Wo, mid)``.

    Called from ``__call__`` (inside its compact scope) when stride > 1.
    """
    y = self.conv(self.mid_features, self.dw_kernel_size,
                  strides=self.effective_stride, dilation=self.dilation,
                  groups=self.mid_features, name='conv_dw')(y)
    return self.norm(name='bn_dw')(y, train)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    k, s = self.dw_kernel_size, self.stride

    y = self.ghost1(self.mid_features, relu=True, conv=self.conv,
                    norm=self.norm, dilation=self.dilation,
                    name='ghost1')(x, train)
    if s > 1:
      y = self.strided_depthwise(y, train)
    if self.se_ratio > 0:
      rd = make_divisible(self.mid_features * self.se_ratio, 4)
      y = SqueezeExcite(rd, conv=self.conv, name='se')(y)
    y = self.ghost2(self.out_features, relu=False, conv=self.conv,
                    norm=self.norm, dilation=self.dilation_out,
                    name='ghost2')(y, train)

    if in_features == self.out_features and s == 1:
      shortcut = x
    else:
      shortcut = self.conv(in_features, k, strides=self.effective_stride,
                           dilation=self.dilation, groups=in_features,
                           name='shortcut_0')(x)
      shortcut = self.norm(name='shortcut_1')(shortcut, train)
      shortcut = self.conv(self.out_features, 1, name='shortcut_2')(shortcut)
      shortcut = self.norm(name='shortcut_3')(shortcut, train)
    return y + shortcut


class GhostNet(nn.Module):
  """GhostNet for any width multiplier.

  ``(N, H, W, 3) -> (N, num_classes)`` (``(N, 1280)`` if ``num_classes`` is 0).
  Stem Conv3x3/2 -> 16 Ghost bottlenecks (``GHOSTNET_BLOCKS``) -> 1x1
  ConvBnAct -> global average pool -> ``conv_head`` 1x1 (bias) -> ReLU ->
  dropout -> ``classifier``. Output stride 32.

  Feature maps at strides 2, 4, 8, 16, 32 and the pre-logits vector are
  recorded as ``stride_2`` ... ``stride_32``, ``pre_logits`` in the
  ``'intermediates'`` collection; see :func:`ghostnet_jax.extract_features`.

  Backbone (:mod:`ghostnet_jax.features`): ``features_only=True`` returns the
  maps of timm's levels ``conv_stem`` (before ``bn1``, /2), ``blocks.1``
  (/4), ``blocks.3`` (/8), ``blocks.5`` (/16), ``blocks.7`` (/32): the output
  of every stage that ends with a stride, as timm's ``features_only``.

  Attributes:
    width: channel multiplier (0.5, 1.0, 1.3, ...); rounded with divisor 4.
    num_classes: classifier outputs; 0 drops the classifier.
    dropout: dropout rate before the classifier (training only).
    in_chans: input channels.
    blocks: the block table.
    dtype: computation dtype; parameters stay float32.
    conv_impl: convolution lowering (``'auto'``, ``'lax'``, ``'xla'``,
      ``'ffi'``; see :mod:`ghostnet_jax.ops`).
    bn_batch_groups: BatchNorm groups in training (1 = global statistics).
    features_only: return the list of feature maps of ``out_indices``.
    out_indices: feature levels to return (``None``: all five).
    output_stride: 32, 16 or 8 (strides past it become dilation).
    padding: ``'torch'`` (default): every convolution pads symmetrically,
      ``k // 2``, as the official PyTorch code; ``'tf_same'``: TensorFlow's
      ``'SAME'``, computed from each layer's input size (at stride 2 on an
      even size k=3 pads ``(0, 1)``, k=5 ``(1, 2)``), as the official
      TensorFlow GhostNet, whose checkpoint needs it
      (``load_pretrained(name, source='tf')``). Same parameters either way.
  """
  width: float = 1.0
  num_classes: int = 1000
  dropout: float = 0.2
  in_chans: int = 3
  blocks: Sequence[Sequence[tuple[int, int, int, float, int]]] = GHOSTNET_BLOCKS
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  bn_batch_groups: int = 1
  features_only: bool = False
  out_indices: Sequence[int] | None = None
  output_stride: int = 32
  padding: str = 'torch'

  def feature_levels(self, selected: bool = False) -> list[FeatureLevel]:
    """The feature levels (all, or those of ``out_indices``), no computing."""
    w = self.width
    check_output_stride(self.output_stride, type(self).__name__)
    levels = [FeatureLevel(make_divisible(STEM_CHANNELS * w, 4), 2,
                           'conv_stem')]
    schedule = StrideSchedule(self.output_stride, reduction=2)
    for i, stage in enumerate(self.blocks):
      for block in stage:
        schedule.step(block[4])
      if stage[-1][4] > 1:
        levels.append(FeatureLevel(make_divisible(stage[-1][2] * w, 4),
                                   schedule.reduction, f'blocks.{i}'))
    if selected:
      idx = resolve_out_indices(self.out_indices, len(levels),
                                type(self).__name__)
      levels = [levels[i] for i in idx]
    return levels

  def layer_factories(self) -> tuple[ModuleDef, ModuleDef]:
    if self.padding not in PADDINGS:
      raise ValueError(f'{type(self).__name__}: padding must be one of '
                       f'{PADDINGS}, got {self.padding!r}.')
    pad = {'padding': 'SAME'} if self.padding == 'tf_same' else {}
    conv = functools.partial(Conv2d, dtype=self.dtype, impl=self.conv_impl,
                             **pad)
    norm = functools.partial(BatchNorm, dtype=self.dtype,
                             batch_groups=self.bn_batch_groups)
    return conv, norm

  def make_block(self, layer_id: int, mid: int, out: int, k: int, stride: int,
                 se_ratio: float, name: str, **dilation) -> nn.Module:
    """Builds block number ``layer_id`` (0-based over the whole network).

    ``dilation``: ``dilation`` and ``dilate_stride`` of the block.
    """
    del layer_id  # GhostNet v1 uses the same block everywhere.
    conv, norm = self.layer_factories()
    return GhostBottleneck(mid, out, dw_kernel_size=k, stride=stride,
                           se_ratio=se_ratio, conv=conv, norm=norm, name=name,
                           **dilation)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_images(x, self.in_chans, model=type(self).__name__)
    taps = feature_taps(self)
    conv, norm = self.layer_factories()
    w = self.width

    x = conv(make_divisible(STEM_CHANNELS * w, 4), 3, strides=2,
             name='conv_stem')(x)
    if taps is not None and taps.add(0, x):
      return taps.maps
    x = nn.relu(norm(name='bn1')(x, train))

    schedule = StrideSchedule(self.output_stride, reduction=2)
    layer_id, level = 0, 0
    for i, stage in enumerate(self.blocks):
      for j, (k, exp, c, se_ratio, s) in enumerate(stage):
        if s > 1:
          sow_feature(self, f'stride_{schedule.reduction}', x)
        eff, dil_in, _ = schedule.step(s)
        x = self.make_block(layer_id, make_divisible(exp * w, 4),
                            make_divisible(c * w, 4), k, s, se_ratio,
                            name=f'blocks_{i}_{j}', dilation=dil_in,
                            dilate_stride=eff != s)(x, train)
        layer_id += 1
      if stage[-1][4] > 1:
        level += 1
        if taps is not None and taps.add(level, x):
          return taps.maps
    x = ConvBnAct(make_divisible(LAST_CHANNELS * w, 4), conv=conv, norm=norm,
                  name=f'blocks_{len(self.blocks)}_0')(x, train)
    sow_feature(self, f'stride_{schedule.reduction}', x)

    x = x.astype(jnp.float32).mean((1, 2), keepdims=True)
    x = conv(HEAD_CHANNELS, 1, use_bias=True, name='conv_head')(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    sow_feature(self, 'pre_logits', x)
    if self.num_classes == 0:
      return x
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return Linear(self.num_classes, dtype=self.dtype,
                  name='classifier')(x).astype(jnp.float32)


def _register_width(name: str, width: float, paper_top1: float | None,
                    weights: str | None, notes: str = ''):
  @register_model(name, family='ghostnet', paper_top1=paper_top1,
                  weights=weights, notes=notes)
  def builder(**kwargs) -> GhostNet:
    return GhostNet(width=width, **kwargs)
  builder.__name__ = name
  builder.__doc__ = f'GhostNet {width}x.'
  return builder


ghostnet_050 = _register_width(
    'ghostnet_050', 0.5, 66.2, None,
    'no official PyTorch weights (0.5x exists in PaddleClas only)')
ghostnet_100 = _register_width(
    'ghostnet_100', 1.0, 73.9, 'state_dict_73.98.pth',
    'official weights: 73.98 top-1 with the official validate script')
ghostnet_130 = _register_width(
    'ghostnet_130', 1.3, 75.7, None,
    '1.3x weights were released for TensorFlow/MindSpore only')
