"""GhostNetV3: "Exploring the Training Strategies for Compact Models".

Liu et al., arXiv 2404.11202 (2024).

GhostNetV3 is GhostNetV2's network trained in a re-parameterisable form. Each
convolution of a Ghost module and the strided depthwise convolution of a
stride-2 bottleneck is, during training, a sum of parallel branches, each
ending in its own BatchNorm:

* primary (1x1 conv): ``primary_rpr_conv_{0,1,2}`` (conv -> bn) [+ a BN-only
  identity branch ``primary_rpr_skip`` when input and intrinsic channels are
  equal, which no registered width has];
* cheap (3x3 depthwise): ``cheap_rpr_conv_{0,1,2}`` (3x3 conv -> bn),
  ``cheap_rpr_scale`` (1x1 depthwise conv -> bn) and ``cheap_rpr_skip``
  (BN of the input, the identity branch);
* strided depthwise (k x k, stride 2): ``dw_rpr_conv_{0,1,2}`` and
  ``dw_rpr_scale`` (1x1 depthwise, stride 2, no padding);

ReLU (in ``ghost1``) follows the *sum*. Being linear up to that point, every
sum is exactly one convolution with a bias, and :func:`reparameterize` folds a
trained model into the *deploy* form (``create_model(name, deploy=True)``):
GhostNetV2's topology with ``primary_conv_0`` / ``cheap_operation_0`` /
``conv_dw`` convolutions that carry biases and no BatchNorm. The DFC attention
(``short_conv``), SE, shortcuts, stem and head are the same in both forms.

Checkpoint key names. The official code names the children of a branch
``conv`` and ``bn`` (``blocks.1.0.ghost1.primary_rpr_conv.0.bn.weight``);
these official names are the project's canonical form, used by the Flax
parameters (``params[...]['primary_rpr_conv_0']['bn']['scale']``) and written
by :func:`ghostnet_jax.convert.to_torch_state_dict`. timm calls the same
BatchNorm ``bn1``; the converter accepts both (the registry's
``torch_key_map`` is :func:`timm_to_official_key`), and
:func:`official_to_timm_key` renames an exported state_dict for timm's
``load_state_dict(strict=True)``. Deploy-form names are the same in both.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ghostnet_jax import registry, utils
from ghostnet_jax.ghostnet import GhostBottleneck, GhostNet
from ghostnet_jax.ghostnetv2 import FIRST_ATTENTION_LAYER, dfc_gate
from ghostnet_jax.layers import BatchNorm, Conv2d, ModuleDef
from ghostnet_jax.registry import register_model

NUM_BRANCHES = 3

# ---------------------------------------------------------------- key names

_BRANCH = (r'(?:primary_rpr_conv|cheap_rpr_conv|dw_rpr_conv)\.\d+'
           r'|primary_rpr_scale|cheap_rpr_scale|dw_rpr_scale')
_TIMM_BN = re.compile(rf'(^|\.)({_BRANCH})\.bn1\.')
_OFFICIAL_BN = re.compile(rf'(^|\.)({_BRANCH})\.bn\.')


def timm_to_official_key(key: str) -> str:
  """timm -> official: ``...primary_rpr_conv.0.bn1.w`` -> ``...0.bn.w``.

  Renames only the BatchNorm of re-parameterisation branches; every other key
  (``bn1`` of the stem or ``blocks.9.0``) is returned unchanged.
  """
  return _TIMM_BN.sub(r'\1\2.bn.', key)


def official_to_timm_key(key: str) -> str:
  """The inverse of :func:`timm_to_official_key` (official -> timm names)."""
  return _OFFICIAL_BN.sub(r'\1\2.bn1.', key)


# ------------------------------------------------------------------- modules


class ConvBn(nn.Module):
  """A re-parameterisation branch: ``conv`` (no bias) -> ``bn``.

  ``(N, H, W, Cin) -> (N, Ho, Wo, features)``.

  Attributes:
    features: output channels.
    kernel_size: int or ``(kh, kw)``; padding is ``k // 2`` (PyTorch).
    strides: convolution stride.
    groups: feature groups (``Cin`` for depthwise).
    conv, norm: layer factories.
    dilation: kernel dilation (output stride 16 / 8).
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.conv(self.features, self.kernel_size, strides=self.strides,
                  groups=self.groups, dilation=self.dilation, name='conv')(x)
    return self.norm(name='bn')(x, train)


class GhostModuleV3(nn.Module):
  """GhostNetV3's Ghost module, in training or deploy form.

  ``(N, H, W, Cin) -> (N, H, W, out_features)``. Training form::

    p   = act(sum_i BN_i(Conv1x1_i(x)) [+ BN(x)])      # primary_rpr_*
    c   = act(sum_i BN_i(DW_dxd_i(p)) + BN(DW_1x1(p)) + BN(p))   # cheap_rpr_*
    out = concat([p, c])[..., :out_features]
    out = out * DFCAttention(x)                        # if attention

  where ``act`` is ReLU when ``relu`` (``ghost1``) and the identity otherwise
  (``ghost2``). Deploy form: ``p = act(Conv1x1(x) + b)`` (``primary_conv_0``),
  ``c = act(DW_dxd(p) + b)`` (``cheap_operation_0``).

  Attributes:
    out_features: output channels.
    ratio: intrinsic share ``1 / ratio`` (2 in every GhostNet).
    dw_size: kernel of the cheap depthwise convolution.
    relu: ReLU after the primary and the cheap sums.
    conv, norm: layer factories.
    attention: multiply by the DFC attention gate (official mode
      ``'ori_shortcut_mul_conv15'``, timm ``'shortcut'``).
    deploy: the fused single-convolution form.
    num_branches: conv-BN branches of each sum besides the scale and skip
      ones (3 in the official code).
    dilation: dilation of the cheap depthwise convolutions and of the DFC
      attention (output stride 16 / 8); the primary convolution is 1x1.

  The identity branch ``primary_rpr_skip`` exists, as in the official code,
  only when the input has ``ceil(out_features / ratio)`` channels; timm never
  creates it. No registered width has such a module.
  """
  out_features: int
  ratio: int = 2
  dw_size: int = 3
  relu: bool = True
  conv: ModuleDef = Conv2d
  norm: ModuleDef = BatchNorm
  attention: bool = False
  deploy: bool = False
  num_branches: int = NUM_BRANCHES
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    init = math.ceil(self.out_features / self.ratio)
    new = init * (self.ratio - 1)
    act = nn.relu if self.relu else (lambda y: y)
    gate = None
    if self.attention:
      gate = dfc_gate(self, x, self.out_features, self.conv, self.norm, train,
                      self.dilation)

    if self.deploy:
      p = self.conv(init, 1, use_bias=True, name='primary_conv_0')(x)
    else:
      p = _branch_sum(
          [ConvBn(init, 1, conv=self.conv, norm=self.norm,
                  name=f'primary_rpr_conv_{i}')(x, train)
           for i in range(self.num_branches)]
          + ([self.norm(name='primary_rpr_skip')(x, train)]
             if x.shape[-1] == init else []))
    p = act(p)

    if self.deploy:
      c = self.conv(new, self.dw_size, groups=init, use_bias=True,
                    dilation=self.dilation, name='cheap_operation_0')(p)
    else:
      branches = [ConvBn(new, self.dw_size, groups=init, conv=self.conv,
                         norm=self.norm, dilation=self.dilation,
                         name=f'cheap_rpr_conv_{i}')(p, train)
                  for i in range(self.num_branches)]
      if self.dw_size > 1:
        scale = ConvBn(new, 1, groups=init, conv=self.conv, norm=self.norm,
                       name='cheap_rpr_scale')
        branches.append(scale(p, train))
      if new == init:
        branches.append(self.norm(name='cheap_rpr_skip')(p, train))
      c = _branch_sum(branches)
    c = act(c)

    out = jnp.concatenate([p, c], axis=-1)[..., :self.out_features]
    if gate is not None:
      out = out * gate.astype(out.dtype)
    return out


def _branch_sum(branches: list[jax.Array]) -> jax.Array:
  out = branches[0]
  for b in branches[1:]:
    out = out + b
  return out


class GhostBottleneckV3(GhostBottleneck):
  """The Ghost bottleneck with a re-parameterisable strided depthwise conv.

  Same as :class:`~ghostnet_jax.ghostnet.GhostBottleneck` (pass
  :class:`GhostModuleV3` factories as ``ghost1`` / ``ghost2``), except the
  stride-2 depthwise convolution: in training form
  ``sum_i BN_i(DW_kxk_i(y)) + BN(DW_1x1(y))`` (``dw_rpr_conv_{0,1,2}``,
  ``dw_rpr_scale``; all stride 2, no activation), in deploy form one biased
  ``conv_dw`` (no ``bn_dw``).

  Attributes:
    deploy: the fused form.
    num_branches: parallel k x k branches.
  """
  deploy: bool = False
  num_branches: int = NUM_BRANCHES

  def strided_depthwise(self, y: jax.Array, train: bool) -> jax.Array:
    mid, k, s = self.mid_features, self.dw_kernel_size, self.effective_stride
    d = self.dilation
    if self.deploy:
      return self.conv(mid, k, strides=s, groups=mid, use_bias=True,
                       dilation=d, name='conv_dw')(y)
    branches = [ConvBn(mid, k, strides=s, groups=mid, conv=self.conv,
                       norm=self.norm, dilation=d,
                       name=f'dw_rpr_conv_{i}')(y, train)
                for i in range(self.num_branches)]
    if k > 1:
      branches.append(ConvBn(mid, 1, strides=s, groups=mid, conv=self.conv,
                             norm=self.norm, name='dw_rpr_scale')(y, train))
    return _branch_sum(branches)


class GhostNetV3(GhostNet):
  """GhostNetV3 for any width multiplier, training or deploy form.

  ``(N, H, W, 3) -> (N, num_classes)``. GhostNetV2's network (DFC attention in
  ``ghost1`` of blocks ``layer_id >= 2``) built from :class:`GhostModuleV3`
  and :class:`GhostBottleneckV3`. Other attributes as
  :class:`~ghostnet_jax.ghostnet.GhostNet`; note the official GhostNetV3
  forward applies no dropout (timm applies 0.2, the default here; pass
  ``dropout=0.0`` for the official behaviour). Inputs must be at least 33x33.

  Attributes:
    deploy: build the fused inference form; get its variables from trained
      ones with :func:`reparameterize`.
  """
  deploy: bool = False

  def make_block(self, layer_id: int, mid: int, out: int, k: int, stride: int,
                 se_ratio: float, name: str, **dilation) -> nn.Module:
    conv, norm = self.layer_factories()
    ghost = functools.partial(GhostModuleV3, deploy=self.deploy)
    ghost1 = functools.partial(
        ghost, attention=layer_id >= FIRST_ATTENTION_LAYER)
    return GhostBottleneckV3(mid, out, dw_kernel_size=k, stride=stride,
                             se_ratio=se_ratio, ghost1=ghost1, ghost2=ghost,
                             deploy=self.deploy, conv=conv, norm=norm,
                             name=name, **dilation)


# ---------------------------------------------------------- re-parameterise


def _fuse_conv_bn(kernel, params: Mapping, stats: Mapping,
                  eps: float) -> tuple[np.ndarray, np.ndarray]:
  """Folds BN into a bias-free conv (float64): ``(W * t, beta - mean * t)``."""
  f64 = lambda a: np.asarray(a, np.float64)
  t = f64(params['scale']) / np.sqrt(f64(stats['var']) + eps)
  return f64(kernel) * t, f64(params['bias']) - f64(stats['mean']) * t


def _identity_kernel(shape: tuple[int, ...]) -> np.ndarray:
  """The kernel ``(kh, kw, in // groups, out)`` of ``y = x`` (out == in)."""
  kh, kw, in_per_group, out = shape
  k = np.zeros(shape, np.float64)
  k[kh // 2, kw // 2, np.arange(out) % in_per_group, np.arange(out)] = 1.0
  return k


def _pad_to(kernel: np.ndarray, kh: int, kw: int) -> np.ndarray:
  """Zero-pads a 1x1 kernel to the centre of ``kh x kw`` (odd sizes)."""
  ph, pw = (kh - kernel.shape[0]) // 2, (kw - kernel.shape[1]) // 2
  return np.pad(kernel, ((ph, ph), (pw, pw), (0, 0), (0, 0)))


def _fuse_branches(params: Mapping, stats: Mapping, prefix: str,
                   eps: float) -> dict[str, jax.Array]:
  """Sums ``{prefix}_conv_i``, ``{prefix}_scale`` and ``{prefix}_skip``.

  Returns ``{'kernel', 'bias'}`` of the fused convolution, in the dtype of
  the branch kernels.
  """
  convs = [k for k in params if re.fullmatch(rf'{prefix}_conv_\d+', k)]
  dtype = np.asarray(params[convs[0]]['conv']['kernel']).dtype
  kernel = bias = 0.0
  for name in convs:
    k, b = _fuse_conv_bn(params[name]['conv']['kernel'], params[name]['bn'],
                         stats[name]['bn'], eps)
    kernel, bias = kernel + k, bias + b
  kh, kw = kernel.shape[:2]
  if f'{prefix}_scale' in params:
    name = f'{prefix}_scale'
    k, b = _fuse_conv_bn(params[name]['conv']['kernel'], params[name]['bn'],
                         stats[name]['bn'], eps)
    kernel, bias = kernel + _pad_to(k, kh, kw), bias + b
  if f'{prefix}_skip' in params:
    name = f'{prefix}_skip'
    k, b = _fuse_conv_bn(_identity_kernel(kernel.shape), params[name],
                         stats[name], eps)
    kernel, bias = kernel + k, bias + b
  return {'kernel': jnp.asarray(kernel.astype(dtype)),
          'bias': jnp.asarray(bias.astype(dtype))}


_FUSED_NAME = {'primary_rpr': 'primary_conv_0',
               'cheap_rpr': 'cheap_operation_0', 'dw_rpr': 'conv_dw'}
_BRANCH_PREFIXES = tuple(_FUSED_NAME)


def _fold(params: Mapping, stats: Mapping, eps: float) -> tuple[dict, dict]:
  """Replaces every group of branches (recursively) by its fused conv."""
  new_params, new_stats = {}, {}
  for prefix, fused in _FUSED_NAME.items():
    if f'{prefix}_conv_0' in params:
      new_params[fused] = _fuse_branches(params, stats, prefix, eps)
  for key, value in params.items():
    if key.startswith(_BRANCH_PREFIXES):
      continue
    if isinstance(value, Mapping):
      new_params[key], s = _fold(value, stats.get(key, {}), eps)
      if s:
        new_stats[key] = s
    else:
      new_params[key] = value
  for key, value in stats.items():
    if not isinstance(value, Mapping):
      new_stats[key] = value
  return new_params, new_stats


@functools.lru_cache(maxsize=32)
def _variable_shapes(name: str, **create_kwargs: Any) -> dict:
  """``{(collection,) + path: shape}`` of a model's variables (traced with
  ``jax.eval_shape``, no compute; cached per model and arguments)."""
  abstract = utils.abstract_variables(
      registry.create_model(name, **create_kwargs), image_size=64)
  return {(c,) + path: tuple(leaf.shape)
          for c in ('params', 'batch_stats')
          for path, leaf in utils.flatten_tree(abstract.get(c, {})).items()}


def _check_layout(name: str, tree: Mapping, what: str,
                  create_kwargs: Mapping) -> None:
  """Raises a ValueError unless ``tree`` has the variables of the model."""
  want = _variable_shapes(name, **create_kwargs)
  got = {}
  for c in ('params', 'batch_stats'):
    for path, leaf in utils.flatten_tree(tree.get(c, {})).items():
      got[(c,) + path] = tuple(np.shape(leaf))
  if got == want:
    return
  fmt = lambda keys: sorted('/'.join(k) for k in keys)[:5]
  misshaped = [k for k in want.keys() & got.keys() if want[k] != got[k]]
  raise ValueError(
      f'{what} do not match {name}: missing {fmt(want.keys() - got.keys())}, '
      f'unexpected {fmt(got.keys() - want.keys())}, mis-shaped '
      f'{fmt(misshaped)} (at most 5 of each shown).')


def reparameterize(name: str, variables: Mapping, *, eps: float = 1e-5,
                   **create_kwargs: Any) -> dict:
  """Training-form GhostNetV3 variables -> deploy-form variables.

  Every group of re-parameterisation branches becomes one convolution with a
  bias: each ``conv -> bn`` branch is folded as ``W * t``, ``beta - mean * t``
  with ``t = gamma / sqrt(var + eps)``; the 1x1 scale branch is zero-padded
  to the centre of the k x k kernel (for the stride-2 depthwise conv it reads
  the same pixels as the centre tap, so this is exact); the BN-only identity
  branch is an identity kernel times ``t``; kernels and biases are summed.
  Computed in float64 and cast back to the kernels' dtype. The deploy model
  reproduces the training form's *evaluation* output (running statistics).

  Args:
    name: a registered ``ghostnetv3_*`` model.
    variables: ``{'params': ..., 'batch_stats': ...}`` of
      ``create_model(name, **create_kwargs)`` (training form).
    eps: the BatchNorm epsilon (PyTorch's 1e-5).
    **create_kwargs: as given to ``create_model`` (``num_classes`` is read
      from the classifier when not given).

  Returns:
    Variables for ``create_model(name, deploy=True, **create_kwargs)``.

  Raises:
    ValueError: if ``name`` is not GhostNetV3 or ``variables`` do not fit its
      training form.
  """
  entry = registry.get_entry(name)
  if entry.family != 'ghostnetv3':
    raise ValueError(f'reparameterize() applies to GhostNetV3 models; '
                     f'{name!r} is a {entry.family} model.')
  if 'deploy' in create_kwargs:
    raise ValueError('Pass the training-form create_model arguments (no '
                     '`deploy`); reparameterize() returns the deploy form.')
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError("variables must be a mapping with 'params' and "
                     "'batch_stats'.")
  params, stats = variables['params'], variables.get('batch_stats', {})
  if 'num_classes' not in create_kwargs:
    head = params.get('classifier')
    num_classes = int(np.shape(head['kernel'])[-1]) if head else 0
    if num_classes != 1000:  # Else the default (and the cached layout).
      create_kwargs['num_classes'] = num_classes
  if 'conv_dw' in params.get('blocks_1_0', {}):
    raise ValueError(f'These {name} variables are already in the deploy form.')
  _check_layout(name, variables, 'The training-form variables', create_kwargs)
  new_params, new_stats = _fold(params, stats, eps)
  out = {'params': new_params, 'batch_stats': new_stats}
  _check_layout(name, out, 'The re-parameterised variables',
                dict(create_kwargs, deploy=True))
  return out


def deploy_form(model: 'GhostNetV3', variables: Mapping
                ) -> tuple['GhostNetV3', dict]:
  """``(model in deploy form, its variables)`` from a training-form module.

  What :func:`reparameterize` does for a registry name, for a module in hand
  (the trainer's, with its own fields such as ``dtype`` or
  ``bn_batch_groups``). ``variables``: host arrays (``numpy``) of ``model``.
  The models' BatchNorms use PyTorch's epsilon, 1e-5. A module already in
  deploy form is returned as it is.
  """
  if model.deploy:
    return model, dict(variables)
  params, stats = _fold(variables['params'], variables.get('batch_stats', {}),
                        1e-5)
  return model.clone(deploy=True), {'params': params, 'batch_stats': stats}


# ----------------------------------------------------------------- registry


def _register_width(name: str, width: float, paper_top1: float | None,
                    weights: str | None, notes: str):
  @register_model(name, family='ghostnetv3', paper_top1=paper_top1,
                  weights=weights, notes=notes,
                  default_preprocess='official',
                  torch_key_map=timm_to_official_key)
  def builder(**kwargs) -> GhostNetV3:
    return GhostNetV3(width=width, **kwargs)
  builder.__name__ = name
  builder.__doc__ = (f'GhostNetV3 {width}x (training form; deploy=True for '
                     'the fused form).')
  return builder


ghostnetv3_050 = _register_width(
    'ghostnetv3_050', 0.5, None, None, 'no paper number, no weights')
ghostnetv3_100 = _register_width(
    'ghostnetv3_100', 1.0, 77.1, 'ghostnetv3-1.0.pth.tar',
    'official weights (release GhostNetV3, training form); 77.1 is the '
    'state_dict_ema entry (selected by default), state_dict gives 76.93')
ghostnetv3_130 = _register_width(
    'ghostnetv3_130', 1.3, 79.1, None, 'no released weights')
ghostnetv3_160 = _register_width(
    'ghostnetv3_160', 1.6, 80.4, None, 'no released weights')
