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
}
