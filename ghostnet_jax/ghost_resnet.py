"""Ghost-ResNet-50: ResNet-50 with its convolutions replaced by Ghost modules.

The ImageNet experiment of "GhostNet: More Features from Cheap Operations"
(Han et al., CVPR 2020): ResNet-50 whose convolutions are replaced by Ghost
modules with ratio ``s`` (2 or 4) and cheap depthwise kernel ``d = 3``.
The paper gives no layer-by-layer description, so the choices below are ours;
each is checked against the paper's parameter and FLOP counts.

Architecture (torchvision's ResNet-50 with Ghost modules)::

  conv1 7x7/2, 64 -> bn1 -> ReLU -> max-pool 3x3/2       plain, as ResNet-50
  layer1..layer4: 3, 4, 6, 3 bottlenecks (64, 128, 256, 512 planes, x4 out)
    conv1 = Ghost(planes,   1x1)          + ReLU
    conv2 = Ghost(planes,   3x3, stride)  + ReLU   (stride in the 3x3: v1.5)
    conv3 = Ghost(4*planes, 1x1)
    downsample_0 = Ghost(4*planes, 1x1, stride)     first block of a stage
    out = ReLU(conv3 + shortcut)
  global average pool -> fc = Ghost(num_classes, 1x1) on the pooled vector

Every ``Ghost(c, k, stride)`` is :class:`ghostnet_jax.ghostnet.GhostModule`:
a ``k x k`` primary conv with the replaced conv's stride to ``c / s`` maps ->
BN (-> ReLU), a 3x3 depthwise cheap conv to the other ``c (s - 1) / s`` ->
BN (-> ReLU), concatenated. The primary conv keeps the replaced conv's kernel
size and stride, which is how the paper defines the module (its primary
conv has the filter size, stride and padding of the ordinary convolution it
replaces). BN sits inside the module where ResNet-50 has BN after each conv,
ReLU on both branches where ResNet-50 has ReLU, and the cheap op reads the
activated intrinsic maps, as in GhostNet.

Decisions, and the evidence from the paper's numbers (13.0M params / 2.2B
FLOPs for s=2, 6.5M / 1.2B for s=4; ResNet-50 25.6M / 4.1B):

* Bottleneck v1.5 (stride on the 3x3, torchvision). Its ResNet-50 has the
  paper's 4.1B MACs (4.09B; v1 with the stride on the first 1x1 has 3.86B),
  and it gives 2.15B / 1.18B for the Ghost versions, where v1 gives
  2.03B / 1.12B. The official Ghost-ResNet file also strides the 3x3.
* Every bottleneck convolution, the projection shortcut included, is a Ghost
  module: the paper replaces ResNet-50's convolutions, and anything less
  could not reach its ~s-fold reduction.
* The stem stays a plain 7x7 conv (3 input channels: little to gain in
  parameters). A Ghost stem would take MACs to 2.10B / 1.10B, which do not
  round to the paper's 2.2B / 1.2B; the plain stem does.
* The classifier is a Ghost module too, on the pooled 1x1 map (``fc``:
  ``GhostConv`` with biases, no BN). This is the one choice the text does
  not spell out, and the parameter counts demand it: the dense 2048 x 1000
  classifier alone has 2.05M parameters, so with it the model cannot go below
  8.15M at s=4 (paper 6.5M, i.e. ResNet-50's 25.6M / 3.9, an ~s-fold
  reduction of the whole network). On a 1x1 map a 3x3 depthwise kernel only
  ever uses its centre tap, so the classifier's cheap op is 1x1 (same
  function, no dead weights): each ghost logit is ``a * intrinsic + b``.
  ``ghost_classifier=False`` keeps the dense ``nn.Linear`` classifier.

Sizes (224x224, MACs = conv + linear multiply-accumulates, the papers'
FLOPs; parameters include BN's scale and bias)::

                          params       MACs             paper
  ghost_resnet50_s2   12,930,012   2,149,999,860    13.0M  2.2B
  ghost_resnet50_s4    6,616,502   1,180,407,662     6.5M  1.2B
  s=2, dense fc       13,953,512   2,151,023,360
  s=4, dense fc        8,151,752   1,181,942,912
  ratio=1 (ResNet-50) 25,557,032   4,089,184,256    25.6M  4.1B

s=2 matches the paper to its precision: 12.93M vs 13.0M (-0.5%), 2.150B vs
2.2B (2.14999986B sits exactly on the rounding boundary of 2.1 / 2.2). s=4 matches the MACs
(1.18B vs 1.2B) and has 0.12M (+1.8%) more parameters than the paper's
6.5M. We found no reading of the paper that removes them (leaving out all
53,120 BN parameters gives 6.56M; a 3x3 cheap op in the classifier 6.62M);
the paper's counts may come from a slightly different model or counter.
Reductions against ResNet-50: 1.98x / 3.86x parameters, 1.90x / 3.46x MACs
(the stem, 118M MACs, is not reduced).

The official ``ghostnet_pytorch/ghost_resnet.py`` (Efficient-AI-Backbones,
2022, no weights) is a different model: its Ghost modules have no BN and
biased convolutions, and its classifier is a dense ``nn.Linear``. Its
forward uses 13,927,016 (s=2) / 8,125,256 (s=4) parameters and the same
2,151,023,360 / 1,181,942,912 MACs as our dense-classifier variant: it is
exactly ``ghost_classifier=False`` with each Ghost module's two BNs (2
numbers per channel) traded for biases (1 per channel), i.e. 26,496 fewer
(and its cheap op reads the intrinsic maps before the ReLU).
It also registers unused tensors (25.82M / 14.22M parameters in its
state_dict) and pools with a fixed ``AvgPool2d(7)``.

Module names follow torchvision's ResNet (``layer3_2/conv2/primary_conv_0``
<-> ``layer3.2.conv2.primary_conv.0``) with GhostNet's names inside the Ghost
modules; no PyTorch weights exist for this model.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnet_jax.ghost_layers import GhostConv
from ghostnet_jax.features import (FeatureLevel, StrideSchedule,
                                   check_output_stride, feature_taps,
                                   resolve_out_indices)
from ghostnet_jax.ghostnet import GhostModule
from ghostnet_jax.layers import (BatchNorm, Conv2d, Linear, ModuleDef,
                                 check_images, he_normal_fan_out, sow_feature)
from ghostnet_jax.registry import register_model

RESNET50_LAYERS = (3, 4, 6, 3)
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
STEM_CHANNELS = 64


class GhostResNetBottleneck(nn.Module):
  """ResNet bottleneck (v1.5) built from Ghost modules.

  ``(N, H, W, Cin) -> (N, H / strides, W / strides, 4 * planes)``::

    y = Ghost1x1(planes) -> ReLU -> Ghost3x3/stride(planes) -> ReLU
        -> Ghost1x1(4 * planes)
    return ReLU(y + shortcut(x))

  ``shortcut`` is the identity, or ``downsample_0`` = Ghost1x1/stride
  (4 * planes) when the stride or the channel count changes. Each Ghost
  module has BN on both of its branches; the ReLUs act on both branches.

  Attributes:
    planes: bottleneck width.
    strides: 1 or 2, on the 3x3 module and the shortcut.
    ratio: Ghost ratio ``s``.
    dw_size: cheap depthwise kernel ``d``.
    conv, norm: layer factories.
    dilation: dilation before the stride point (``conv1``, the 3x3 primary
      conv of ``conv2``).
    dilate_stride: the stride becomes 1 and the layers after it (the cheap
      ops of ``conv2`` and ``downsample_0``, ``conv3``) dilate by
      ``dilation * strides``; parameters unchanged.
  """
  planes: int
  strides: int = 1
  ratio: int = 2
  dw_size: int = 3
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  dilation: int = 1
  dilate_stride: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out_features = self.planes * EXPANSION
    ghost = functools.partial(GhostModule, ratio=self.ratio,
                              dw_size=self.dw_size, conv=self.conv,
                              norm=self.norm)
    d_in = self.dilation
    stride, d_out = self.strides, self.dilation
    if self.dilate_stride:
      stride, d_out = 1, self.dilation * self.strides
    y = ghost(self.planes, relu=True, dilation=d_in, name='conv1')(x, train)
    y = ghost(self.planes, relu=True, kernel_size=3, strides=stride,
              dilation=d_in, cheap_dilation=d_out, name='conv2')(y, train)
    y = ghost(out_features, relu=False, dilation=d_out, name='conv3')(y, train)
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = ghost(out_features, relu=False, strides=stride,
                       cheap_dilation=d_out, name='downsample_0')(x, train)
    else:
      shortcut = x
    return nn.relu(y + shortcut)


class GhostResNet(nn.Module):
  """Ghost-ResNet (module docstring); ``layers=(3, 4, 6, 3)`` is -50.

  ``(N, H, W, 3) -> (N, num_classes)`` (``(N, 2048)`` if ``num_classes`` is
  0). Output stride 32; any input size (global average pooling).

  Feature maps are recorded as ``stride_2`` (stem, 64 channels),
  ``stride_4`` ... ``stride_32`` (layer1..layer4 outputs, 256 ... 2048
  channels) and ``pre_logits`` (the pooled ``(N, 2048)`` vector) in the
  ``'intermediates'`` collection; see :func:`ghostnet_jax.extract_features`.

  Attributes:
    ratio: Ghost ratio ``s`` (1 gives a plain ResNet-50 v1.5).
    dw_size: cheap depthwise kernel ``d``.
    layers: bottlenecks per stage.
    ghost_classifier: the classifier is a Ghost module (paper's sizes); False
      keeps ResNet's dense layer.
    num_classes: classifier outputs; 0 drops the classifier.
    dropout: dropout rate before the classifier (ResNet-50 has none).
    in_chans: input channels.
    dtype: computation dtype; parameters stay float32.
    conv_impl: convolution lowering (see :mod:`ghostnet_jax.ops`).
    bn_batch_groups: BatchNorm groups in training (1 = global statistics).
    features_only: return the list of feature maps of ``out_indices``:
      levels ``relu`` (the stem before max-pooling, 64 channels, /2) and
      ``layer1`` ... ``layer4`` (256 ... 2048 channels, /4 ... /32),
      stopping after the deepest.
    out_indices: feature levels to return (``None``: all five).
    output_stride: 32, 16 or 8 (strides past it become dilation).
  """
  ratio: int = 2
  dw_size: int = 3
  layers: Sequence[int] = RESNET50_LAYERS
  ghost_classifier: bool = True
  num_classes: int = 1000
  dropout: float = 0.0
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
    levels = [FeatureLevel(STEM_CHANNELS, 2, 'relu')]
    schedule = StrideSchedule(self.output_stride, reduction=4)
    for i, planes in enumerate(STAGE_PLANES):
      schedule.step(2 if i > 0 else 1)
      levels.append(FeatureLevel(planes * EXPANSION, schedule.reduction,
                                 f'layer{i + 1}'))
    if selected:
      idx = resolve_out_indices(self.out_indices, len(levels),
                                type(self).__name__)
      levels = [levels[i] for i in idx]
    return levels

  def layer_factories(self) -> tuple[ModuleDef, ModuleDef]:
    # torchvision's ResNet initialisation: kaiming_normal_(mode='fan_out',
    # nonlinearity='relu') for the convolutions, BN scale 1 and bias 0.
    conv = functools.partial(
        Conv2d, dtype=self.dtype, impl=self.conv_impl,
        kernel_init=he_normal_fan_out())
    norm = functools.partial(BatchNorm, dtype=self.dtype,
                             batch_groups=self.bn_batch_groups)
    return conv, norm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_images(x, self.in_chans, model=type(self).__name__)
    if len(self.layers) != len(STAGE_PLANES) or min(self.layers) < 1:
      raise ValueError(f'layers must be 4 positive block counts, got '
                       f'{self.layers!r}.')
    if self.ghost_classifier and self.num_classes == 1 and self.ratio > 1:
      raise ValueError('A Ghost classifier needs num_classes >= 2; use '
                       'ghost_classifier=False for a single output.')
    taps = feature_taps(self)
    conv, norm = self.layer_factories()

    x = conv(STEM_CHANNELS, 7, strides=2, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x, train))
    sow_feature(self, 'stride_2', x)
    if taps is not None and taps.add(0, x):
      return taps.maps
    # PyTorch's MaxPool2d(3, 2, padding=1): the padding never wins the max.
    # Written as an explicit -inf pad and a VALID pool, the form the ONNX and
    # TFLite converters map to one Pad + MaxPool.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='VALID')

    schedule = StrideSchedule(self.output_stride, reduction=4)
    for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, self.layers)):
      eff, dil_in, dil_out = schedule.step(2 if i > 0 else 1)
      for j in range(blocks):
        s = 2 if i > 0 and j == 0 else 1
        x = GhostResNetBottleneck(planes, strides=s, ratio=self.ratio,
                                  dw_size=self.dw_size, conv=conv, norm=norm,
                                  dilation=dil_in if j == 0 else dil_out,
                                  dilate_stride=(j == 0 and eff != s),
                                  name=f'layer{i + 1}_{j}')(x, train)
      sow_feature(self, f'stride_{schedule.reduction}', x)
      if taps is not None and taps.add(i + 1, x):
        return taps.maps

    x = x.astype(jnp.float32).mean((1, 2))
    sow_feature(self, 'pre_logits', x)
    if self.num_classes == 0:
      return x
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    if self.ghost_classifier:
      x = GhostConv(self.num_classes, 1, ratio=self.ratio, dw_size=1,
                    use_bias=True, dtype=self.dtype, conv_impl=self.conv_impl,
                    name='fc')(x[:, None, None, :])
      x = x.reshape(x.shape[0], -1)
    else:
      x = Linear(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


def _register(name: str, ratio: int, paper_top1: float):
  @register_model(
      name, family='ghost_resnet', paper_top1=paper_top1, weights=None,
      notes=f'Ghost modules (s={ratio}, d=3) in ResNet-50 v1.5, Ghost '
            'classifier; no official weights')
  def builder(**kwargs) -> GhostResNet:
    return GhostResNet(ratio=ratio, **kwargs)
  builder.__name__ = name
  builder.__doc__ = f'Ghost-ResNet-50 with s={ratio}, d=3 (GhostNet paper).'
  return builder


ghost_resnet50_s2 = _register('ghost_resnet50_s2', 2, 75.0)
ghost_resnet50_s4 = _register('ghost_resnet50_s4', 4, 74.1)
