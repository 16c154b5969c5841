"""Key layouts of published weight files -> the official PyTorch state_dict.

Our models use the official PyTorch names (:mod:`ghostnet_jax.convert` maps
those onto Flax by a fixed rule), so every other publisher's file is first
turned into an official-layout ``{torch key: numpy array (torch shape)}``:

* ``official`` / ``timm``: already that (timm's GhostNetV3 ``bn1`` names are
  renamed by the registry's ``torch_key_map``).
* ``paddle``: PaddleClas ``GhostNet_x*`` - the TF-style GhostNet. It differs
  from the official network in three places, each mapped exactly:

  - SE gate ``clip(z, 0, 1)`` vs ``hard_sigmoid(z') = clip((z' + 3) / 6, 0, 1)``:
    with ``z' = 6 z - 3`` they agree, so the expand weights are scaled by 6 and
    its bias becomes ``6 b - 3``.
  - SE width ``mid // 4`` vs ``make_divisible(mid / 4, 4)`` (never smaller):
    the reduce layer gets zero rows (ReLU(0) = 0) and the expand layer zero
    columns for the extra channels.
  - Head ``conv (no bias) -> BN -> ReLU`` on the pooled 1x1 map vs ``conv with
    bias -> ReLU``: the BN is folded into the conv, ``W s`` and
    ``beta - mean s`` with ``s = gamma / sqrt(var + eps)``.

  Linear weights are stored ``(in, out)`` and are transposed.
* ``tf``: the official TensorFlow (tensorpack) GhostNet 1.0x checkpoint. The
  same TF-style network as PaddleClas's, variable for variable, so its names
  and layouts (HWIO kernels, ``[k, k, C, 1]`` depthwise kernels, SE and
  logits as 1x1 convs) are renamed to Paddle's and mapped by the ``paddle``
  rules. Two differences the model cannot absorb: the stem's input channels
  are flipped (the TF model reads BGR images, ours RGB), and TF pads
  ``'SAME'``, so the weights belong to ``GhostNet(padding='tf_same')``.
  BatchNorm eps is 1e-5, as ours and Paddle's (``PADDLE_BN_EPS``, used to
  fold the head): the layers are tensorpack ``BatchNorm`` calls (``epsilon=
  1e-5`` by default) and no argscope sets it (the slim arg-scope's 1e-3 only
  reaches ``slim.batch_norm``, which the network does not call). Images are
  normalised per colour with the ImageNet mean/std (in BGR order there), so
  after the flip the usual RGB mean/std apply.
* ``mindcv``: mindcv's ``ghostnet_*`` (the official architecture; BN leaves
  ``gamma/beta/moving_mean/moving_variance``; last 1x1 ``blocks.9.features``).
* ``ms_zoo``: MindSpore model zoo ``research/cv/ghostnet`` (flat ``blocks.0``
  ... ``blocks.16``, ``conv``/``bn`` sub-cells). Names are taken from its code.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ghostnet_jax.ghostnet import GHOSTNET_BLOCKS

PADDLE_BN_EPS = 1e-5

# MindSpore optimizer and bookkeeping entries (not weights of the network).
MS_IGNORED_PREFIXES = ('moments.', 'accum.', 'ema.', 'adam_m.', 'adam_v.',
                       'mean_grad.', 'mean_square.')
MS_IGNORED_NAMES = frozenset({
    'learning_rate', 'global_step', 'momentum', 'scale_sense', 'loss_scale',
    'current_iterator_step', 'last_overflow_iterator_step', 'epoch_num',
    'step_num', 'beta1_power', 'beta2_power'})

_BN_LEAF = {
    # Paddle
    '_mean': 'running_mean', '_variance': 'running_var',
    # MindSpore
    'gamma': 'weight', 'beta': 'bias', 'moving_mean': 'running_mean',
    'moving_variance': 'running_var',
}


def _block_prefix(i: int) -> str:
  """Flat block number (0..15) -> official ``blocks.<stage>.<j>``."""
  n = 0
  for stage, blocks in enumerate(GHOSTNET_BLOCKS):
    if i < n + len(blocks):
      return f'blocks.{stage}.{i - n}'
    n += len(blocks)
  raise KeyError(f'block {i} does not exist (GhostNet has {n}).')


LAST_BLOCK = f'blocks.{len(GHOSTNET_BLOCKS)}.0'


class MappingError(ValueError):
  """A file whose names do not fit the declared layout."""


# --------------------------------------------------------------------- Paddle

_PADDLE_CONVBN = {
    'ghost_module_1.primary_conv': ('ghost1.primary_conv.0', 'ghost1.primary_conv.1'),
    'ghost_module_1.cheap_operation': ('ghost1.cheap_operation.0', 'ghost1.cheap_operation.1'),
    'ghost_module_2.primary_conv': ('ghost2.primary_conv.0', 'ghost2.primary_conv.1'),
    'ghost_module_2.cheap_operation': ('ghost2.cheap_operation.0', 'ghost2.cheap_operation.1'),
    'depthwise_conv': ('conv_dw', 'bn_dw'),
    'shortcut_depthwise': ('shortcut.0', 'shortcut.1'),
    'shortcut_conv': ('shortcut.2', 'shortcut.3'),
}


def _paddle_convbn(rest: str) -> tuple[str, str, str] | None:
  """``<layer>._conv.weight`` -> (layer, conv or batch_norm, torch leaf)."""
  m = re.fullmatch(r'(.+)\._(conv|batch_norm)\.(weight|bias|_mean|_variance)',
                   rest)
  if m is None:
    return None
  layer, kind, leaf = m.groups()
  return layer, kind, _BN_LEAF.get(leaf, leaf)


def paddle_to_official(sd: Mapping[str, np.ndarray],
                       layout: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """PaddleClas GhostNet ``.pdparams`` -> official GhostNet state_dict.

  Args:
    sd: ``{paddle structured name: array}``.
    layout: :func:`ghostnet_jax.convert.torch_layout` of the target model
      (gives the SE widths to pad to).

  Keys that match no rule are passed through unchanged, so the converter's
  mismatch report names them.
  """
  out: dict[str, np.ndarray] = {}
  se: dict[str, dict[str, np.ndarray]] = {}
  head: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    value = np.asarray(value, np.float32)
    m = re.fullmatch(r'_ghostbottleneck_(\d+)\.(.+)', key)
    if m:
      prefix, rest = _block_prefix(int(m.group(1))), m.group(2)
      s = re.fullmatch(r'se_block\.(squeeze|excitation)\.(weight|bias)', rest)
      if s:
        se.setdefault(prefix, {})[f'{s.group(1)}.{s.group(2)}'] = value
        continue
      parsed = _paddle_convbn(rest)
      if parsed and parsed[0] in _PADDLE_CONVBN:
        conv, bn = _PADDLE_CONVBN[parsed[0]]
        name = conv if parsed[1] == 'conv' else bn
        out[f'{prefix}.{name}.{parsed[2]}'] = value
        continue
    elif key.startswith(('conv1.', 'conv_last.', 'fc_0.')):
      layer, kind, leaf = _paddle_convbn(key) or (None, None, None)
      if layer == 'conv1':
        out[('conv_stem.' if kind == 'conv' else 'bn1.') + leaf] = value
        continue
      if layer == 'conv_last':
        out[f'{LAST_BLOCK}.{"conv" if kind == "conv" else "bn1"}.{leaf}'] = value
        continue
      if layer == 'fc_0':
        head[f'{kind}.{leaf}'] = value
        continue
    elif key == 'fc_1.weight':
      out['classifier.weight'] = value.T
      continue
    elif key == 'fc_1.bias':
      out['classifier.bias'] = value
      continue
    out[key] = value  # unknown: reported by the converter
  for prefix, parts in se.items():
    out.update(_paddle_se(prefix, parts, layout))
  if head:
    out.update(_fold_head(head))
  return out


def _paddle_se(prefix: str, parts: dict[str, np.ndarray],
               layout: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  need = ('squeeze.weight', 'squeeze.bias', 'excitation.weight',
          'excitation.bias')
  missing = [n for n in need if n not in parts]
  if missing:
    raise MappingError(f'{prefix}: SE block lacks {missing}.')
  w1, b1 = parts['squeeze.weight'], parts['squeeze.bias']  # (mid, r), (r,)
  w2, b2 = parts['excitation.weight'], parts['excitation.bias']  # (r, mid)
  mid, r = w1.shape
  target = layout.get(f'{prefix}.se.conv_reduce.weight')
  rd = target[2][-1] if target is not None else r  # flax kernel (1,1,mid,rd)
  if rd < r:
    raise MappingError(f'{prefix}: SE width {r} is wider than the model\'s '
                       f'{rd}; not a GhostNet of this width.')
  reduce_w = np.zeros((rd, mid), np.float32)
  reduce_w[:r] = w1.T
  reduce_b = np.zeros((rd,), np.float32)
  reduce_b[:r] = b1
  expand_w = np.zeros((mid, rd), np.float32)
  expand_w[:, :r] = 6.0 * w2.T
  return {
      f'{prefix}.se.conv_reduce.weight': reduce_w[:, :, None, None],
      f'{prefix}.se.conv_reduce.bias': reduce_b,
      f'{prefix}.se.conv_expand.weight': expand_w[:, :, None, None],
      f'{prefix}.se.conv_expand.bias': (6.0 * b2 - 3.0).astype(np.float32),
  }


def _fold_head(head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  need = ('conv.weight', 'batch_norm.weight', 'batch_norm.bias',
          'batch_norm.running_mean', 'batch_norm.running_var')
  missing = [n for n in need if n not in head]
  if missing:
    raise MappingError(f'fc_0 (head conv + BN) lacks {missing}.')
  w = head['conv.weight'].astype(np.float64)
  scale = head['batch_norm.weight'] / np.sqrt(
      head['batch_norm.running_var'].astype(np.float64) + PADDLE_BN_EPS)
  bias = head['batch_norm.bias'] - head['batch_norm.running_mean'] * scale
  return {'conv_head.weight': (w * scale[:, None, None, None]
                               ).astype(np.float32),
          'conv_head.bias': bias.astype(np.float32)}


# ----------------------------------------------------------------- TensorFlow

TF_SCOPE = 'MobileNetV2/'  # the official model's variable scope
_TF_BN = {'gamma': 'weight', 'beta': 'bias', 'mean/EMA': '_mean',
          'variance/EMA': '_variance'}
# TF layer (in block N = i + 1) -> Paddle layer of ``_ghostbottleneck_i``.
_TF_BLOCK_LAYERS = {
    'up_pointwise/conv1': 'ghost_module_1.primary_conv',
    'up_pointwise/dw1': 'ghost_module_1.cheap_operation',
    'depthwise': 'depthwise_conv',
    'down_pointwise/conv1': 'ghost_module_2.primary_conv',
    'down_pointwise/dw1': 'ghost_module_2.cheap_operation',
    'shortcut_dw': 'shortcut_depthwise',
    'shortcut_1x1': 'shortcut_conv',
}
_TF_DEPTHWISE = ('up_pointwise/dw1', 'down_pointwise/dw1', 'depthwise',
                 'shortcut_dw')


def _tf_layer_leaf(name: str) -> tuple[str, str] | None:
  """``Conv2d_3_depthwise/output/mean/EMA`` -> (layer, Paddle leaf)."""
  m = re.fullmatch(r'(.+)/(W|DW|b|(?:bn|output)/(?:gamma|beta|mean/EMA|'
                   r'variance/EMA))', name)
  if m is None:
    return None
  layer, leaf = m.groups()
  if leaf in ('W', 'DW'):
    return layer, '_conv.weight'
  if leaf == 'b':
    return layer, 'bias'
  return layer, '_batch_norm.' + _TF_BN[leaf.split('/', 1)[1]]


def _tf_paddle_layer(layer: str, n_blocks: int) -> tuple[str, str] | None:
  """TF layer name -> (Paddle layer, kind); kind is ``conv``, ``dw``,
  ``se_fc1``, ``se_fc2`` or ``logits``. None for names of another model."""
  if layer == 'Conv2d_0':
    return 'conv1', 'conv'
  if layer == f'Conv2d_{n_blocks + 1}':
    return 'conv_last', 'conv'
  if layer == f'Conv2d_{n_blocks + 2}':
    return 'fc_0', 'conv'
  if layer == 'Logits/Conv2d_1c_1x1':
    return 'fc_1', 'logits'
  m = re.fullmatch(r'Conv2d_(\d+)_(.+)', layer)
  if m is None or not 1 <= int(m.group(1)) <= n_blocks:
    return None
  block, rest = f'_ghostbottleneck_{int(m.group(1)) - 1}', m.group(2)
  if rest in ('se/fc1', 'se/fc2'):
    return (f'{block}.se_block.' + ('squeeze' if rest == 'se/fc1'
                                    else 'excitation'), rest.replace('/', '_'))
  if rest in _TF_BLOCK_LAYERS:
    return (f'{block}.{_TF_BLOCK_LAYERS[rest]}',
            'dw' if rest in _TF_DEPTHWISE else 'conv')
  return None


_TF_LEAVES = {
    'conv': ('_conv.weight', '_batch_norm.weight', '_batch_norm.bias',
             '_batch_norm._mean', '_batch_norm._variance'),
    'logits': ('_conv.weight', 'bias'),
}
_TF_LEAVES['dw'] = _TF_LEAVES['conv']
_TF_LEAVES['se_fc1'] = _TF_LEAVES['se_fc2'] = _TF_LEAVES['logits']
_TF_LINEAR = ('logits', 'se_fc1', 'se_fc2')  # 1x1 convs that are Paddle Linears


def _tf_to_paddle_array(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
  """TF layout -> Paddle layout of one variable."""
  if leaf != '_conv.weight':
    return value
  if kind == 'dw':  # [k, k, C, 1] -> [C, 1, k, k]
    return value.transpose(2, 3, 0, 1)
  if kind == 'conv':  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  return value.reshape(value.shape[-2:])  # 1x1 conv as Linear: [in, out]


def tf_to_paddle(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Official TF GhostNet checkpoint -> PaddleClas ``GhostNet_x1_0`` names.

  Renames and re-lays every variable (module docstring) and flips the stem's
  input channels from BGR to RGB.

  Raises:
    MappingError: a checkpoint with none of the TF GhostNet names (another
      model), unknown variables, or layers that lack some of their
      variables - each naming the TF variables.
  """
  n_blocks = sum(len(s) for s in GHOSTNET_BLOCKS)
  out: dict[str, np.ndarray] = {}
  seen: dict[str, tuple[str, str, set]] = {}  # paddle layer -> tf layer, kind
  unknown = []
  for key, value in sd.items():
    name = key[len(TF_SCOPE):] if key.startswith(TF_SCOPE) else key
    parsed = _tf_layer_leaf(name)
    target = parsed and _tf_paddle_layer(parsed[0], n_blocks)
    if not target:
      unknown.append(key)
      continue
    (tf_layer, leaf), (layer, kind) = parsed, target
    if leaf not in _TF_LEAVES[kind]:
      unknown.append(key)
      continue
    value = np.asarray(value, np.float32)
    if layer == 'conv1' and leaf == '_conv.weight':
      value = value[:, :, ::-1, :]  # BGR -> RGB input channels
    value = _tf_to_paddle_array(kind, leaf, value)
    if kind in _TF_LINEAR and leaf == '_conv.weight':
      leaf = 'weight'  # Paddle Linear
    out[f'{layer}.{leaf}'] = value
    seen.setdefault(layer, (key[:len(key) - len(name)] + tf_layer, kind,
                            set()))[2].add(leaf)
  if not seen:
    raise MappingError(
        f'none of its {len(sd)} variables is named like the TensorFlow '
        f'GhostNet checkpoint ({TF_SCOPE}Conv2d_0/W, ...), e.g. '
        f'{sorted(sd)[:5]}: not that checkpoint.')
  if unknown:
    raise MappingError(
        f'{len(unknown)} variables are not part of the TensorFlow GhostNet '
        f'1.0x checkpoint: {sorted(unknown)[:20]}.')
  lacking = []
  for layer, (tf_layer, kind, leaves) in seen.items():
    for leaf in _TF_LEAVES[kind]:
      paddle_leaf = 'weight' if (kind in _TF_LINEAR
                                 and leaf == '_conv.weight') else leaf
      if paddle_leaf not in leaves:
        lacking.append(f'{tf_layer}/{_tf_leaf_name(tf_layer, leaf)}')
  if lacking:
    raise MappingError(f'{len(lacking)} variables are missing: '
                       f'{sorted(lacking)[:20]}.')
  return out


def _tf_leaf_name(tf_layer: str, leaf: str) -> str:
  """Paddle leaf -> the TF variable name inside ``tf_layer`` (messages)."""
  if leaf == '_conv.weight':
    return 'DW' if tf_layer.endswith('/dw1') else 'W'
  if leaf == 'bias':
    return 'b'
  bn = 'output' if tf_layer.endswith(
      ('_depthwise', '_shortcut_dw', 'down_pointwise/dw1')) else 'bn'
  tf_leaf = {v: k for k, v in _TF_BN.items()}[leaf.rsplit('.', 1)[1]]
  return f'{bn}/{tf_leaf}'


def tf_to_official(sd: Mapping[str, np.ndarray],
                   layout: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """Official TF GhostNet 1.0x checkpoint -> official GhostNet state_dict,
  for ``GhostNet(padding='tf_same')`` with RGB input (module docstring)."""
  return paddle_to_official(tf_to_paddle(sd), layout)


# ------------------------------------------------------------------ MindSpore


def _ms_leaf(key: str) -> str:
  head, _, leaf = key.rpartition('.')
  return f'{head}.{_BN_LEAF.get(leaf, leaf)}' if head else key


def ms_ignored(key: str) -> bool:
  return key in MS_IGNORED_NAMES or key.startswith(MS_IGNORED_PREFIXES)


def mindcv_to_official(sd: Mapping[str, np.ndarray],
                       layout: Mapping[str, tuple] | None = None
                       ) -> dict[str, np.ndarray]:
  """mindcv ``ghostnet_*`` checkpoint -> official GhostNet state_dict."""
  del layout
  out = {}
  last = f'blocks.{len(GHOSTNET_BLOCKS)}'
  for key, value in sd.items():
    if ms_ignored(key):
      continue
    key = key.replace(f'{last}.features.0.', f'{LAST_BLOCK}.conv.')
    key = key.replace(f'{last}.features.1.', f'{LAST_BLOCK}.bn1.')
    out[_ms_leaf(key)] = np.asarray(value, np.float32)
  return out


_MSZOO_SUB = (
    (r'(ghost[12])\.(primary_conv|cheap_operation)\.conv\.', r'\1.\2.0.'),
    (r'(ghost[12])\.(primary_conv|cheap_operation)\.bn\.', r'\1.\2.1.'),
    (r'dw\.conv\.', 'conv_dw.'), (r'dw\.bn\.', 'bn_dw.'),
    (r'shortcut\.0\.conv\.', 'shortcut.0.'), (r'shortcut\.0\.bn\.', 'shortcut.1.'),
    (r'shortcut\.1\.conv\.', 'shortcut.2.'), (r'shortcut\.1\.bn\.', 'shortcut.3.'),
)


def ms_zoo_to_official(sd: Mapping[str, np.ndarray],
                       layout: Mapping[str, tuple] | None = None
                       ) -> dict[str, np.ndarray]:
  """MindSpore model zoo ``research/cv/ghostnet`` -> official state_dict."""
  del layout
  n_blocks = sum(len(s) for s in GHOSTNET_BLOCKS)
  out = {}
  for key, value in sd.items():
    if ms_ignored(key):
      continue
    m = re.fullmatch(r'blocks\.(\d+)\.(.+)', key)
    if m:
      i, rest = int(m.group(1)), m.group(2)
      if i == n_blocks:
        rest = rest.replace('bn.', 'bn1.', 1) if rest.startswith('bn.') else rest
        key = f'{LAST_BLOCK}.{rest}'
      elif i < n_blocks:
        for pattern, repl in _MSZOO_SUB:
          rest = re.sub(pattern, repl, rest)
        key = f'{_block_prefix(i)}.{rest}'
    out[_ms_leaf(key)] = np.asarray(value, np.float32)
  return out


def identity(sd, layout=None):
  del layout
  return dict(sd)


LAYOUTS = {
    'official': identity,
    'timm': identity,
    'paddle': paddle_to_official,
    'mindcv': mindcv_to_official,
    'ms_zoo': ms_zoo_to_official,
    'tf': tf_to_official,
}
