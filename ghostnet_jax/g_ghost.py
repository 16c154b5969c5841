"""G-GhostNet: the G-Ghost stage and the G-Ghost RegNetX models.

"GhostNets on Heterogeneous Devices via Cheap Operations", Han et al.,
IJCV 2022 (arXiv 2201.03297): the GPU-side half of the paper.

Deep features within a stage are largely redundant across its blocks, so a
G-Ghost stage computes only part of its output with the (expensive) blocks
and derives the rest cheaply from the stage's first block:

* ``base`` is the stage's first block at full width (it changes resolution
  and width, as in the plain stage);
* its first ``raw`` channels (the *intrinsic* features) go through the
  middle blocks ``layers`` at width ``raw`` only (about half the width);
* its other ``cheap = features - raw`` channels (the *ghost* features) go
  through a 1x1 conv + BN, ``cheap``;
* ``merge`` (the paper's "mix") pools the outputs of ``base`` and of every
  middle block globally, concatenates them and maps them to ``cheap``
  channels with Conv1x1-BN-ReLU-Conv1x1-BN; the result is added to the ghost
  features (broadcast over space), followed by ReLU;
* ``end``, a full-width block, fuses ``concat([intrinsic, ghost])``.

:class:`GGhostStage` implements this around any block; :class:`GGhostRegNet`
applies it to the RegNetX "X block" (:class:`Bottleneck`). Module names follow
the official PyTorch code (``layer2.merge.1.weight`` is
``params['layer2']['merge_1']['kernel']``, ``layer1.0.conv2.weight`` is
``params['layer1_0']['conv2']['kernel']``), so :mod:`ghostnet_jax.convert`
loads the official checkpoints with its generic rule.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnet_jax.features import (FeatureLevel, StrideSchedule,
                                   check_output_stride, feature_taps,
                                   resolve_out_indices)
from ghostnet_jax.layers import (BatchNorm, Conv2d, Linear, ModuleDef,
                                 check_images, he_normal_fan_out, sow_feature)
from ghostnet_jax.registry import register_model

# Width of the stem convolution of every RegNet.
STEM_FEATURES = 32
# The official code shrinks the group width of the intrinsic-branch blocks.
INNER_GROUP_WIDTH_FACTOR = 0.75


def intrinsic_features(features: int, cheap_ratio: float,
                       divisor: int = 1) -> int:
  """Channels of the intrinsic branch of a G-Ghost stage.

  ``int(features * (1 - cheap_ratio) / divisor) * divisor``: the
  non-cheap share of ``features``, rounded down to a multiple of ``divisor``
  (RegNetX uses the inner group width, so the grouped convolutions divide).
  The ghost branch has ``features`` minus this many channels.
  """
  return int(features * (1 - cheap_ratio) / divisor) * divisor


class GGhostStage(nn.Module):
  """A G-Ghost stage around any block: ``num_blocks`` blocks' output for the
  price of about two full-width blocks plus ``num_blocks - 2`` narrow ones.

  ``(N, H, W, Cin) -> (N, ceil(H / strides), ceil(W / strides), features)``
  (for blocks that downsample like PyTorch convolutions)::

    x0 = base(x)                                  # features, stride `strides`
    e  = x0[..., :raw]                            # intrinsic features
    e1 = layers_0(e); ...; ek = layers_{k-1}(..)  # k = num_blocks - 2, width raw
    m  = merge(concat([pool(x0), pool(e1), ..., pool(ek)]))   # (N, 1, 1, cheap)
    c  = ReLU(cheap(x0[..., raw:]) + m)           # ghost features
    y  = end(concat([ek, c]))                     # features

  with ``raw = intrinsic_features(features, cheap_ratio, raw_divisor)``,
  ``cheap = features - raw``, ``pool`` the global average,
  ``merge = Conv1x1 -> BN -> ReLU -> Conv1x1 -> BN`` (modules ``merge_1``,
  ``merge_2``, ``merge_4``, ``merge_5``; the indices of the official
  ``nn.Sequential``, whose entries 0 and 3 are the pooling and ReLU) and
  ``cheap = Conv1x1 -> BN`` (``cheap_0``, ``cheap_1``).

  The block factories are called with keywords only,
  ``block(features=f, strides=s, name=n)``, and the module they return as
  ``module(x, **{block_train_arg: train})``; it must map
  ``(N, H, W, Cin) -> (N, H / s, W / s, f)`` for any ``Cin`` (a block
  normally adds a projection shortcut itself when ``s > 1`` or ``Cin != f``).
  ``base`` is ``block(features, strides)``, ``end`` is ``block(features, 1)``
  and ``layers_i`` is ``inner_block(raw, 1)``.

  Example: upgrade a plain stage of an existing Flax model. A ResNet stage ::

    for i in range(6):
      x = ResNetBlock(filters=256, strides=(2, 2) if i == 0 else (1, 1),
                      conv=conv, norm=norm, act=nn.relu)(x)

  becomes a G-Ghost stage with the same block (here Flax's example
  ``ResNetBlock``, whose ``__call__`` takes no ``train`` argument)::

    def block(features, strides, name):
      return ResNetBlock(filters=features, strides=(strides, strides),
                         conv=conv, norm=norm, act=nn.relu, name=name)

    x = GGhostStage(block=block, features=256, num_blocks=6, strides=2,
                    block_train_arg=None)(x, train=train)

  The stage's own BatchNorms (in ``cheap`` and ``merge``) take ``train`` and
  keep statistics in ``batch_stats`` like the rest of the model. Training
  needs at least two images per batch (``merge`` normalises pooled vectors).

  Attributes:
    block: factory of the full-width blocks ``base`` and ``end``.
    features: output channels of the stage.
    num_blocks: blocks the equivalent plain stage has (``>= 2``): ``base``,
      ``num_blocks - 2`` intrinsic blocks and ``end``.
    strides: stride of ``base`` (the stage's downsampling).
    cheap_ratio: approximate share of ghost channels (0.5 in the paper).
    inner_block: factory of the intrinsic-branch blocks; ``None`` uses
      ``block``.
    raw_divisor: the intrinsic width is rounded down to a multiple of this.
    block_train_arg: keyword through which blocks receive ``train``; ``None``
      calls them with ``x`` only.
    conv: convolution factory for ``cheap`` and ``merge`` (signature of
      :class:`ghostnet_jax.layers.Conv2d`).
    norm: BatchNorm factory for ``cheap`` and ``merge`` (signature of
      :class:`ghostnet_jax.layers.BatchNorm`).
  """
  block: Callable[..., nn.Module]
  features: int
  num_blocks: int
  strides: int = 2
  cheap_ratio: float = 0.5
  inner_block: Callable[..., nn.Module] | None = None
  raw_divisor: int = 1
  block_train_arg: str | None = 'train'
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm

  @property
  def raw_features(self) -> int:
    """Channels of the intrinsic branch."""
    return intrinsic_features(self.features, self.cheap_ratio,
                              self.raw_divisor)

  @property
  def cheap_features(self) -> int:
    """Channels of the ghost branch."""
    return self.features - self.raw_features

  def _check(self) -> None:
    where = f'GGhostStage {self.name!r}'
    if self.num_blocks < 2:
      raise ValueError(f'{where}: num_blocks must be >= 2 (base and end); '
                       f'got {self.num_blocks}. Use a plain stage instead.')
    if not 0.0 < self.cheap_ratio < 1.0:
      raise ValueError(f'{where}: cheap_ratio must be in (0, 1); got '
                       f'{self.cheap_ratio}.')
    if self.raw_divisor < 1:
      raise ValueError(f'{where}: raw_divisor must be >= 1; got '
                       f'{self.raw_divisor}.')
    raw = self.raw_features
    if raw < 1 or raw >= self.features:
      raise ValueError(
          f'{where}: features={self.features} with cheap_ratio='
          f'{self.cheap_ratio} and raw_divisor={self.raw_divisor} leaves '
          f'{raw} intrinsic and {self.features - raw} ghost channels; both '
          'must be positive. Use more features or a smaller raw_divisor.')

  def _run_block(self, module: nn.Module, x: jax.Array, train: bool,
                 features: int, role: str) -> jax.Array:
    if self.block_train_arg is None:
      y = module(x)
    else:
      y = module(x, **{self.block_train_arg: train})
    if not hasattr(y, 'shape') or y.ndim != 4 or y.shape[-1] != features:
      raise ValueError(
          f'GGhostStage {self.name!r}: the {role} block must return '
          f'(N, H, W, {features}); got {getattr(y, "shape", type(y))}.')
    return y

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    self._check()
    if train and x.shape[0] < 2:
      raise ValueError(
          f'GGhostStage {self.name!r}: training needs at least 2 images in '
          'the batch; the merge BatchNorms see one pooled vector per image, '
          'whose batch variance is undefined for one image (PyTorch raises '
          'here too).')
    raw, cheap = self.raw_features, self.cheap_features
    inner = self.block if self.inner_block is None else self.inner_block

    x0 = self._run_block(
        self.block(features=self.features, strides=self.strides, name='base'),
        x, train, self.features, 'base')
    e = x0[..., :raw]
    # Global average of every map the mix sees, in float32. Pooling the
    # pieces and concatenating the (N, 1, 1, C) results equals pooling their
    # concatenation, without materialising it.
    pooled = [x0.astype(jnp.float32).mean((1, 2), keepdims=True)]
    for i in range(self.num_blocks - 2):
      e = self._run_block(inner(features=raw, strides=1, name=f'layers_{i}'),
                          e, train, raw, f'layers_{i}')
      pooled.append(e.astype(jnp.float32).mean((1, 2), keepdims=True))

    # The mix works on pooled vectors: cheap to keep in float32.
    conv32 = functools.partial(self.conv, kernel_size=1, dtype=jnp.float32)
    m = jnp.concatenate(pooled, axis=-1)
    m = conv32(cheap, name='merge_1')(m)
    m = nn.relu(self.norm(dtype=jnp.float32, name='merge_2')(m, train))
    m = conv32(cheap, name='merge_4')(m)
    m = self.norm(dtype=jnp.float32, name='merge_5')(m, train)

    c = self.conv(cheap, 1, name='cheap_0')(x0[..., raw:])
    c = self.norm(name='cheap_1')(c, train)
    c = nn.relu(c + m.astype(c.dtype))

    y = jnp.concatenate([e, c.astype(e.dtype)], axis=-1)
    return self._run_block(self.block(features=self.features, strides=1,
                                      name='end'),
                           y, train, self.features, 'end')


class Bottleneck(nn.Module):
  """The RegNetX "X block": a ResNeXt bottleneck with expansion 1, no SE.

  ``(N, H, W, Cin) -> (N, ceil(H / strides), ceil(W / strides), features)``::

    y = ReLU(bn1(conv1(x)))        # 1x1, Cin -> features
    y = ReLU(bn2(conv2(y)))        # 3x3 / strides, groups = features // gw
    y = bn3(conv3(y))              # 1x1
    return ReLU(y + shortcut(x))

  with ``gw = min(features, group_width)``. The shortcut is the identity when
  ``strides == 1`` and ``Cin == features``, else ``downsample_0`` (1x1 conv /
  strides) -> ``downsample_1`` (BN).

  Attributes:
    features: output (and inner) channels.
    strides: stride of the 3x3 convolution and the shortcut.
    group_width: channels per group of the 3x3 convolution.
    conv, norm: layer factories.
    dilation: dilation of the 3x3 convolution (output stride 16 / 8).
    dilate_stride: compute the block at stride 1 (the parameters, the
      projection shortcut included, stay those of the strided block).
  """
  features: int
  strides: int = 1
  group_width: int = 1
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  dilation: int = 1
  dilate_stride: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    w = self.features
    if self.group_width < 1:
      raise ValueError(f'{self.name}: group_width must be >= 1; got '
                       f'{self.group_width}.')
    groups = w // min(w, self.group_width)
    y = self.conv(w, 1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, train))
    stride = 1 if self.dilate_stride else self.strides
    y = self.conv(w, 3, strides=stride, groups=groups, dilation=self.dilation,
                  name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y, train))
    y = self.conv(w, 1, name='conv3')(y)
    y = self.norm(name='bn3')(y, train)
    if self.strides != 1 or x.shape[-1] != w:
      shortcut = self.conv(w, 1, strides=stride, name='downsample_0')(x)
      shortcut = self.norm(name='downsample_1')(shortcut, train)
    else:
      shortcut = x
    return nn.relu(y + shortcut)


class GGhostRegNet(nn.Module):
  """G-Ghost RegNetX.

  ``(N, H, W, 3) -> (N, num_classes)`` (``(N, widths[-1])`` if
  ``num_classes`` is 0). Any ``H, W >= 1``: every stride-2 layer maps a size
  ``n`` to ``ceil(n / 2)``. Stem ``conv1`` 3x3/2 (32 channels) -> ``bn1`` ->
  ReLU -> four stages of stride 2 -> global average pool -> dropout -> ``fc``.
  Stage 1 is always a plain RegNetX stage (``layer1_0``, ``layer1_1``, ...);
  stages 2-4 are :class:`GGhostStage` s of :class:`Bottleneck` (``layer2``,
  ...) when they have more than two blocks, plain stages otherwise. The
  intrinsic-branch blocks use group width ``int(0.75 * group_width)``.

  Feature maps at strides 2 (stem), 4, 8, 16, 32 (stage outputs) and the
  pooled vector are recorded as ``stride_2`` ... ``stride_32``,
  ``pre_logits`` in the ``'intermediates'`` collection; see
  :func:`ghostnet_jax.extract_features`.

  Attributes:
    depths: blocks per stage (4 stages).
    widths: output channels per stage.
    group_width: channels per group of the 3x3 convolutions.
    num_classes: classifier outputs; 0 drops the classifier.
    dropout: dropout rate before ``fc`` (training only).
    cheap_ratio: share of ghost channels in G-Ghost stages.
    in_chans: input channels.
    dtype: computation dtype; parameters stay float32.
    conv_impl: convolution lowering (``'auto'``, ``'lax'``, ``'xla'``,
      ``'ffi'``; see :mod:`ghostnet_jax.ops`).
    bn_batch_groups: BatchNorm groups in training (1 = global statistics).
    features_only: return the list of feature maps of ``out_indices``:
      levels ``relu`` (the stem, /2) and ``layer1`` ... ``layer4`` (/4 ...
      /32), stopping after the deepest.
    out_indices: feature levels to return (``None``: all five).
    output_stride: 32, 16 or 8. A dilated stage runs its first block at
      stride 1 and dilates the 3x3 convolutions after it; the G-Ghost cheap
      path (1x1) and the mix's global pooling need no change.
  """
  depths: Sequence[int]
  widths: Sequence[int]
  group_width: int
  num_classes: int = 1000
  dropout: float = 0.2
  cheap_ratio: float = 0.5
  in_chans: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  bn_batch_groups: int = 1
  features_only: bool = False
  out_indices: Sequence[int] | None = None
  output_stride: int = 32

  def feature_levels(self, selected: bool = False) -> list[FeatureLevel]:
    """The feature levels (all, or those of ``out_indices``), no computing."""
    check_output_stride(self.output_stride, type(self).__name__)
    levels = [FeatureLevel(STEM_FEATURES, 2, 'relu')]
    schedule = StrideSchedule(self.output_stride, reduction=2)
    for i, width in enumerate(self.widths):
      schedule.step(2)
      levels.append(FeatureLevel(width, schedule.reduction, f'layer{i + 1}'))
    if selected:
      idx = resolve_out_indices(self.out_indices, len(levels),
                                type(self).__name__)
      levels = [levels[i] for i in idx]
    return levels

  def layer_factories(self) -> tuple[ModuleDef, ModuleDef]:
    conv = functools.partial(Conv2d, dtype=self.dtype, impl=self.conv_impl,
                             kernel_init=he_normal_fan_out())
    norm = functools.partial(BatchNorm, dtype=self.dtype,
                             batch_groups=self.bn_batch_groups)
    return conv, norm

  @property
  def inner_group_width(self) -> int:
    """Group width of the intrinsic-branch blocks of the G-Ghost stages."""
    return int(self.group_width * INNER_GROUP_WIDTH_FACTOR)

  def is_ghost_stage(self, index: int) -> bool:
    """Whether stage ``index`` (0-based) is a G-Ghost stage."""
    return index > 0 and self.depths[index] > 2

  def _check(self) -> None:
    if len(self.depths) != 4 or len(self.widths) != 4:
      raise ValueError(f'GGhostRegNet needs 4 depths and 4 widths; got '
                       f'depths={tuple(self.depths)}, '
                       f'widths={tuple(self.widths)}.')
    if min(self.depths) < 1:
      raise ValueError(f'Every stage needs a block; got depths='
                       f'{tuple(self.depths)}.')
    if any(self.is_ghost_stage(i) for i in range(4)) and (
        self.inner_group_width < 1):
      raise ValueError(
          f'group_width={self.group_width} gives an inner group width of '
          f'int(0.75 * {self.group_width}) = 0; G-Ghost stages need '
          'group_width >= 2.')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_images(x, self.in_chans, model=type(self).__name__)
    self._check()
    if (train and any(self.is_ghost_stage(i) for i in range(4))
        and x.shape[0] < 2 * self.bn_batch_groups):
      raise ValueError(
          f'Training needs at least 2 images per BatchNorm group (batch '
          f'{x.shape[0]}, bn_batch_groups={self.bn_batch_groups}): the '
          'G-Ghost merge normalises one pooled vector per image.')
    taps = feature_taps(self)
    conv, norm = self.layer_factories()

    x = conv(STEM_FEATURES, 3, strides=2, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x, train))
    sow_feature(self, 'stride_2', x)
    if taps is not None and taps.add(0, x):
      return taps.maps

    schedule = StrideSchedule(self.output_stride, reduction=2)
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      eff, dil_in, dil_out = schedule.step(2)
      first = functools.partial(Bottleneck, group_width=self.group_width,
                                conv=conv, norm=norm, dilation=dil_in,
                                dilate_stride=eff == 1)
      rest = functools.partial(Bottleneck, group_width=self.group_width,
                               conv=conv, norm=norm, dilation=dil_out)
      if self.is_ghost_stage(i):
        inner = functools.partial(Bottleneck,
                                  group_width=self.inner_group_width,
                                  conv=conv, norm=norm, dilation=dil_out)

        def block(features, strides, name, first=first, rest=rest):
          # GGhostStage builds `base` (the strided block) and `end`.
          make = first if name == 'base' else rest
          return make(features=features, strides=strides, name=name)

        x = GGhostStage(block=block, features=width, num_blocks=depth,
                        strides=2, cheap_ratio=self.cheap_ratio,
                        inner_block=inner, raw_divisor=self.inner_group_width,
                        conv=conv, norm=norm, name=f'layer{i + 1}')(x, train)
      else:
        for j in range(depth):
          make = first if j == 0 else rest
          x = make(features=width, strides=2 if j == 0 else 1,
                   name=f'layer{i + 1}_{j}')(x, train)
      sow_feature(self, f'stride_{schedule.reduction}', x)
      if taps is not None and taps.add(i + 1, x):
        return taps.maps

    x = x.astype(jnp.float32).mean((1, 2))
    sow_feature(self, 'pre_logits', x)
    if self.num_classes == 0:
      return x
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return Linear(self.num_classes, dtype=self.dtype,
                  name='fc')(x).astype(jnp.float32)


# name: (depths, widths, group width, paper top-1, official weight file)
G_GHOST_REGNETX_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...],
                                         int, float | None, str | None]] = {
    'g_ghost_regnetx_002': ((1, 1, 4, 7), (24, 56, 152, 368), 8, None, None),
    'g_ghost_regnetx_004': ((1, 2, 7, 12), (32, 64, 160, 384), 16, None,
                            None),
    'g_ghost_regnetx_006': ((1, 3, 5, 7), (48, 96, 240, 528), 24, None, None),
    'g_ghost_regnetx_008': ((1, 3, 7, 5), (64, 128, 288, 672), 16, None,
                            None),
    'g_ghost_regnetx_016': ((2, 4, 10, 2), (72, 168, 408, 912), 24, None,
                            None),
    'g_ghost_regnetx_032': ((2, 6, 15, 2), (96, 192, 432, 1008), 48, 77.8,
                            'g_ghost_regnet_3.2g_77.8.pth'),
    'g_ghost_regnetx_040': ((2, 5, 14, 2), (80, 240, 560, 1360), 40, 78.6,
                            'g_ghost_regnet_4.0g_78.6.pth'),
    'g_ghost_regnetx_064': ((2, 4, 10, 1), (168, 392, 784, 1624), 56, None,
                            None),
    'g_ghost_regnetx_080': ((2, 5, 15, 1), (80, 240, 720, 1920), 120, 79.0,
                            'g_ghost_regnet_8.0g_79.0.pth'),
    'g_ghost_regnetx_120': ((2, 5, 11, 1), (224, 448, 896, 2240), 112, None,
                            None),
    'g_ghost_regnetx_160': ((2, 6, 13, 1), (256, 512, 896, 2048), 128, 79.9,
                            'g_ghost_regnet_16.0g_79.9.pth'),
    'g_ghost_regnetx_320': ((2, 7, 13, 1), (336, 672, 1344, 2520), 168, None,
                            None),
}


def _register(name: str):
  depths, widths, gw, top1, weights = G_GHOST_REGNETX_CONFIGS[name]
  gflops = int(name.rsplit('_', 1)[-1]) / 10
  notes = (f'official weights, release tag g_ghost_regnet ({top1} top-1)'
           if weights else 'no official weights (architecture only)')

  @register_model(name, family='g_ghost', paper_top1=top1, weights=weights,
                  notes=notes)
  def builder(**kwargs) -> GGhostRegNet:
    return GGhostRegNet(depths=depths, widths=widths, group_width=gw,
                        **kwargs)

  builder.__name__ = name
  builder.__doc__ = (f'G-Ghost RegNetX-{gflops:.1f}GF: depths {depths}, '
                     f'widths {widths}, group width {gw}.')
  return builder


g_ghost_regnetx_002 = _register('g_ghost_regnetx_002')
g_ghost_regnetx_004 = _register('g_ghost_regnetx_004')
g_ghost_regnetx_006 = _register('g_ghost_regnetx_006')
g_ghost_regnetx_008 = _register('g_ghost_regnetx_008')
g_ghost_regnetx_016 = _register('g_ghost_regnetx_016')
g_ghost_regnetx_032 = _register('g_ghost_regnetx_032')
g_ghost_regnetx_040 = _register('g_ghost_regnetx_040')
g_ghost_regnetx_064 = _register('g_ghost_regnetx_064')
g_ghost_regnetx_080 = _register('g_ghost_regnetx_080')
g_ghost_regnetx_120 = _register('g_ghost_regnetx_120')
g_ghost_regnetx_160 = _register('g_ghost_regnetx_160')
g_ghost_regnetx_320 = _register('g_ghost_regnetx_320')
