"""Load official PyTorch checkpoints into Flax variables, and back.

The Flax modules are named after the official PyTorch modules, so one fixed
rule maps every parameter (all families)::

    Flax path                                 PyTorch key
    params/blocks_6_3/ghost1/primary_conv_0/kernel   blocks.6.3.ghost1.primary_conv.0.weight
    params/.../bn_dw/scale, bias              ....bn_dw.weight, bias
    batch_stats/.../mean, var                 ....running_mean, running_var

``_<digits>`` in a Flax name becomes ``.<digits>``. Convolution kernels go
from OIHW to HWIO, linear weights from ``(out, in)`` to ``(in, out)``.

Python::

    variables = load_torch_checkpoint('state_dict_73.98.pth', 'ghostnet_100')
    logits = create_model('ghostnet_100').apply(variables, images)

Command line (writes an orbax checkpoint that ``train.py`` and ``eval.py``
restore)::

    python -m ghostnet_jax.convert --model ghostnet_100 \\
        --torch-checkpoint state_dict_73.98.pth --output converted/ghostnet_100
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys
import warnings
import zipfile
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from ghostnet_jax import registry
from ghostnet_jax.utils import abstract_variables
from ghostnet_jax.utils import flatten_tree as _flatten
from ghostnet_jax.utils import unflatten_tree as _unflatten

# Keys that published checkpoints carry but no model owns: BatchNorm's
# counter and the thop profiler's buffers (GhostNetV2/V3 release files).
IGNORED_SUFFIXES = ('num_batches_tracked', 'total_ops', 'total_params')
# Wrappers around the state_dict in training checkpoints, by preference.
EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')
REGULAR_KEYS = ('state_dict', 'model', 'module', 'net')
STRIPPED_PREFIXES = ('module.', '_orig_mod.')

_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be turned into the requested model."""


def flax_to_torch_key(collection: str, path: Iterable[str]) -> str:
  """``('blocks_6_3', 'ghost1', 'primary_conv_0', 'kernel')`` ->
  ``'blocks.6.3.ghost1.primary_conv.0.weight'``."""
  *modules, leaf = path
  try:
    torch_leaf = _LEAF_TO_TORCH[(collection, leaf)]
  except KeyError:
    raise ValueError(f'No PyTorch name for {collection}/{"/".join(path)}.'
                     ) from None
  parts = [re.sub(r'_(\d+)(?=_|$)', r'.\1', m) for m in modules]
  return '.'.join(parts + [torch_leaf])


def torch_to_flax_array(value: np.ndarray, flax_ndim: int) -> np.ndarray:
  """OIHW -> HWIO for 4-D, ``(out, in)`` -> ``(in, out)`` for 2-D."""
  if flax_ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if flax_ndim == 2:
    return np.transpose(value, (1, 0))
  return value


def flax_to_torch_array(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if value.ndim == 2:
    return np.transpose(value, (1, 0))
  return value


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


@functools.lru_cache(maxsize=None)
def torch_layout(name: str, **create_kwargs) -> dict[str, tuple]:
  """``{torch_key: (collection, flax_path, flax_shape)}`` of model ``name``."""
  model = registry.create_model(name, **create_kwargs)
  variables = abstract_variables(model, image_size=64)
  layout = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables.get(collection, {})).items():
      layout[flax_to_torch_key(collection, path)] = (collection, path,
                                                     tuple(leaf.shape))
  return layout


def check_variables(variables: Mapping, model: str, num_classes: int,
                    source: str, **create_kwargs) -> None:
  """Checks a Flax variables tree (e.g. a restored orbax checkpoint) against
  ``create_model(model, num_classes=num_classes, **create_kwargs)``.

  Raises:
    CheckpointError: listing, in one message, every missing, unexpected and
      mis-shaped entry, named by its PyTorch key.
  """
  layout = torch_layout(model, num_classes=num_classes, **create_kwargs)
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables.get(collection, {})).items():
      try:
        key = flax_to_torch_key(collection, path)
      except ValueError:
        key = f'{collection}/{"/".join(path)}'
      flat[key] = tuple(np.shape(leaf))
  missing = sorted(k for k in layout if k not in flat)
  unexpected = sorted(k for k in flat if k not in layout)
  misshaped = [(k, _torch_shape(flat[k]), _torch_shape(layout[k][2]))
               for k in sorted(layout) if k in flat and flat[k] != layout[k][2]]
  if missing or unexpected or misshaped:
    raise CheckpointError(_format_mismatch(
        model, source, missing, unexpected, misshaped, []))


# ------------------------------------------------------------------ loading


def _is_tensor_like(v) -> bool:
  return hasattr(v, 'shape') and hasattr(v, 'dtype')


def read_torch_file(path: str | os.PathLike, *,
                    allow_pickle: bool = False) -> Any:
  """``torch.load`` with errors that say what is wrong with the file.

  Loads with ``weights_only=True`` (no arbitrary code runs); timm training
  checkpoints also pickle an ``argparse.Namespace``, which is allowed.
  ``allow_pickle=True`` loads anything (only for files you trust).
  """
  import torch  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Checkpoint file not found: {path}')
  if os.path.isdir(path):
    raise CheckpointError(
        f'{path} is a directory, not a PyTorch checkpoint file. Converted '
        'orbax checkpoints are read with ghostnet_jax.checkpoint.')
  size = os.path.getsize(path)
  if size == 0:
    raise CheckpointError(f'{path} is empty (0 bytes): not a checkpoint.')
  _check_zip_integrity(path, size)
  try:
    if allow_pickle:
      return torch.load(path, map_location='cpu', weights_only=False)
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for bad files.
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    with open(path, 'rb') as f:
      head = f.read(4)
    if head[:2] != b'PK' and head[:1] != b'\x80':
      raise CheckpointError(
          f'{path} ({size} bytes) is not a PyTorch checkpoint (no zip or '
          f'pickle header; it starts with {head!r}).') from e
    if 'Unsupported global' in str(e):
      detail = str(e)[str(e).index('Unsupported global'):].splitlines()[0]
      raise CheckpointError(
          f'{path} pickles Python objects beyond tensors ({detail[:200]}). '
          'If you trust the file, pass allow_pickle=True (--allow-pickle).'
      ) from e
    if head[:2] == b'PK':
      what = ('a zip archive that torch cannot read: the file is probably '
              'truncated or corrupt (re-download it)')
    else:
      what = ('a legacy pickle that torch cannot read: the file is probably '
              'truncated or corrupt')
    raise CheckpointError(f'{path} ({size} bytes) is {what}. torch.load '
                          f'said: {msg[:300]}') from e


def _check_zip_integrity(path: str, size: int) -> None:
  """Verifies the CRC-32 of every member of a zip-format checkpoint.

  ``torch.load`` does not check them, so a flipped bit inside a tensor's data
  would otherwise load as a silently wrong weight.
  """
  if not zipfile.is_zipfile(path):
    return
  try:
    with zipfile.ZipFile(path) as archive:
      bad = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise CheckpointError(
        f'{path} ({size} bytes) is a damaged zip archive ({e}): the file is '
        'probably truncated or corrupt (re-download it).') from e
  if bad is not None:
    raise CheckpointError(
        f'{path} ({size} bytes) is corrupt: the checksum of its member {bad!r} '
        'does not match its contents (re-download the file).')


def select_state_dict(obj: Any, ema: bool | None = None,
                      source: str = 'checkpoint') -> dict[str, Any]:
  """Finds the state_dict inside a loaded checkpoint.

  Handles a flat state_dict and wrappers (``state_dict``, ``state_dict_ema``,
  ``model``, ``module``, nested). ``ema=None`` takes the EMA weights when the
  file has them, ``True`` requires them, ``False`` refuses them.
  """
  if not isinstance(obj, Mapping):
    raise CheckpointError(
        f'{source} holds a {type(obj).__name__}, not a state_dict (a mapping '
        'of names to tensors). Save model.state_dict(), not the model.')
  if obj and all(_is_tensor_like(v) for v in obj.values()):
    if ema:
      raise CheckpointError(f'{source} is a plain state_dict with no EMA '
                            'weights, but EMA weights were requested.')
    return dict(obj)
  wrappers = [k for k in obj if isinstance(obj.get(k), Mapping)]
  ema_keys = [k for k in EMA_KEYS if k in obj and isinstance(obj[k], Mapping)]
  regular = [k for k in REGULAR_KEYS if k in obj and isinstance(obj[k], Mapping)]
  if ema and not ema_keys:
    raise CheckpointError(
        f'EMA weights requested, but {source} has no {"/".join(EMA_KEYS)} '
        f'entry (it has: {sorted(map(str, obj))[:20]}).')
  if ema_keys and ema is not False:
    chosen = ema_keys[0]
  elif regular:
    chosen = regular[0]
  elif len(wrappers) == 1:
    chosen = wrappers[0]
  else:
    raise CheckpointError(
        f'Cannot find a state_dict in {source}: top-level keys are '
        f'{sorted(map(str, obj))[:20]}; expected tensors or one of '
        f'{REGULAR_KEYS + EMA_KEYS}.')
  return select_state_dict(obj[chosen], ema=None if ema is None else False,
                           source=f'{source}[{chosen!r}]')


def clean_state_dict(state_dict: Mapping[str, Any],
                     key_map=None) -> dict[str, np.ndarray]:
  """Strips wrapper prefixes, drops ignored keys, converts to float32 numpy."""
  out, origin = {}, {}
  for raw_key, value in state_dict.items():
    key = str(raw_key)
    for prefix in STRIPPED_PREFIXES:
      while key.startswith(prefix):
        key = key[len(prefix):]
    if key.split('.')[-1] in IGNORED_SUFFIXES or key in IGNORED_SUFFIXES:
      continue
    if key_map is not None:
      key = key_map(key)
    if key in out:  # one would silently replace the other
      raise CheckpointError(
          f'{origin[key]!r} and {str(raw_key)!r} both name {key!r} once the '
          f'wrapper prefixes {STRIPPED_PREFIXES} are stripped; the checkpoint '
          'mixes two state_dicts. Pass the one you mean.')
    origin[key] = str(raw_key)
    out[key] = _to_numpy(value, key)
  return out


def _to_numpy(value, key: str) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    import torch  # pylint: disable=g-import-not-at-top
    t = value.detach().cpu()
    if not (t.is_floating_point() or t.is_complex()):
      raise CheckpointError(f'{key} has dtype {t.dtype}; expected floats.')
    if t.is_complex():
      raise CheckpointError(f'{key} is complex; expected real floats.')
    return t.to(torch.float32).numpy()
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.floating):
    raise CheckpointError(f'{key} has dtype {arr.dtype}; expected floats.')
  return arr.astype(np.float32)


def _fit(sd: Mapping[str, np.ndarray], layout: Mapping[str, tuple]) -> float:
  """Share of the union of keys present in both with the same shape."""
  same = sum(1 for k, (_, _, shape) in layout.items()
             if k in sd and tuple(sd[k].shape) == _torch_shape(shape))
  return same / max(len(set(sd) | set(layout)), 1)


def rank_models(state_dict: Mapping[str, Any],
                min_fit: float = 0.5) -> list[tuple[float, str]]:
  """Registered models ordered by how well ``state_dict`` fits them.

  The fit of a model is the share of all keys (the checkpoint's and the
  model's) that both have with the same shape: 1.0 is an exact match.
  Tracing every registered model is slow, so one model per family is tried
  first and only the families it resembles are searched in full.

  Returns:
    ``[(fit, name), ...]`` with ``fit >= min_fit``, best first.
  """
  families: dict[str, list[str]] = {}
  for name in registry.list_models():
    families.setdefault(registry.get_entry(name).family, []).append(name)

  def fit(name):
    entry = registry.get_entry(name)
    try:
      layout = torch_layout(name)
    except Exception:  # pylint: disable=broad-except  (cannot build)
      return 0.0, set(), 1
    sd = clean_state_dict(state_dict, entry.torch_key_map)
    return _fit(sd, layout), set(sd) & set(layout), len(set(sd) | set(layout))

  ranked = []
  for members in families.values():
    first = fit(members[0])
    if not first[1] or len(first[1]) / first[2] < 0.3:
      continue  # No key names in common with this family.
    ranked.append((first[0], members[0]))
    ranked += [(fit(n)[0], n) for n in members[1:]]
  ranked.sort(key=lambda t: (-t[0], t[1]))
  return [(f, n) for f, n in ranked if f >= min_fit]


def _format_mismatch(name, source, missing, unexpected, misshaped, guesses):
  lines = [f'{source} does not match {name}: {len(missing)} missing, '
           f'{len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys.']
  if guesses:
    lines.append(f'It looks like a checkpoint of: {", ".join(guesses)}.')
  for title, items in (('missing', missing), ('unexpected', unexpected)):
    if items:
      lines.append(f'  {title} ({len(items)}):')
      lines += [f'    {k}' for k in items[:40]]
      if len(items) > 40:
        lines.append(f'    ... and {len(items) - 40} more')
  if misshaped:
    lines.append(f'  mis-shaped ({len(misshaped)}), checkpoint vs model '
                 '(PyTorch layout):')
    lines += [f'    {k}: {a} vs {b}' for k, a, b in misshaped[:40]]
    if len(misshaped) > 40:
      lines.append(f'    ... and {len(misshaped) - 40} more')
  return '\n'.join(lines)


def state_dict_to_variables(state_dict: Mapping[str, Any], name: str, *,
                            strict: bool = True, source: str = 'state_dict',
                            allow_nonfinite: bool = False,
                            **create_kwargs) -> dict:
  """Maps a (cleaned or raw) PyTorch state_dict onto model ``name``.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped key at
      once (strict), or naming non-finite tensors.
  """
  entry = registry.get_entry(name)
  try:
    sd = clean_state_dict(state_dict, entry.torch_key_map)
  except CheckpointError as e:
    raise CheckpointError(f'{source}: {e}') from None
  layout = torch_layout(name, **create_kwargs)

  missing = sorted(k for k in layout if k not in sd)
  unexpected = sorted(k for k in sd if k not in layout)
  misshaped = []
  for k, (_, _, flax_shape) in layout.items():
    if k in sd and tuple(sd[k].shape) != _torch_shape(flax_shape):
      misshaped.append((k, tuple(sd[k].shape), _torch_shape(flax_shape)))
  if misshaped or (strict and (missing or unexpected)):
    ranked = rank_models(state_dict)
    own_fit = dict((n, f) for f, n in ranked).get(name, 0.0)
    guesses = [n for f, n in ranked if n != name and f > own_fit][:3]
    raise CheckpointError(_format_mismatch(name, source, missing, unexpected,
                                           misshaped, guesses))
  if not strict and (missing or unexpected):
    warnings.warn(f'{source} -> {name}: ignoring {len(unexpected)} unexpected '
                  f'keys, leaving {len(missing)} missing keys at their '
                  f'initial values: {missing[:10]}')

  if not allow_nonfinite:
    bad = sorted(k for k in layout if k in sd and not np.isfinite(sd[k]).all())
    if bad:
      raise CheckpointError(
          f'{source}: {len(bad)} tensors hold NaN or Inf values, e.g. '
          f'{bad[:5]}. The checkpoint is corrupt or diverged; pass '
          'allow_nonfinite=True to load it anyway.')

  flat = {}
  init = None
  for k, (collection, path, flax_shape) in layout.items():
    if k in sd:
      value = torch_to_flax_array(sd[k], len(flax_shape))
    else:
      if init is None:
        model = registry.create_model(name, **create_kwargs)
        from ghostnet_jax.utils import init_variables  # pylint: disable=g-import-not-at-top
        init = init_variables(model, image_size=64)
      value = np.asarray(_flatten(init[collection])[path])
    flat[(collection,) + path] = jax.numpy.asarray(value)
  return _unflatten(flat)


def load_torch_checkpoint(path_or_state_dict: Any, name: str, *,
                          ema: bool | None = None, strict: bool = True,
                          allow_pickle: bool = False,
                          allow_nonfinite: bool = False,
                          **create_kwargs) -> dict:
  """Loads an official (or timm) PyTorch checkpoint into Flax variables.

  Args:
    path_or_state_dict: a ``.pth`` / ``.pth.tar`` path, or an already loaded
      object (a state_dict or a training checkpoint dict).
    name: registered model name, e.g. ``'ghostnet_100'``.
    ema: ``None`` uses ``state_dict_ema`` when present, ``True`` requires it,
      ``False`` uses the regular weights.
    strict: refuse missing or unexpected keys (mis-shaped keys are always
      refused).
    allow_pickle: let ``torch.load`` unpickle arbitrary objects.
    allow_nonfinite: accept NaN/Inf values.
    **create_kwargs: passed to :func:`ghostnet_jax.create_model` (e.g.
      ``num_classes``, ``deploy``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``create_model(name, ...)``.
  """
  registry.get_entry(name)  # Unknown names fail before any file I/O.
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    source = os.fspath(path_or_state_dict)
    obj = read_torch_file(source, allow_pickle=allow_pickle)
  else:
    source, obj = 'state_dict', path_or_state_dict
  state_dict = select_state_dict(obj, ema=ema, source=source)
  return state_dict_to_variables(state_dict, name, strict=strict,
                                 source=source,
                                 allow_nonfinite=allow_nonfinite,
                                 **create_kwargs)


def to_torch_state_dict(variables: Mapping, name: str | None = None,
                        **create_kwargs) -> 'collections.OrderedDict':
  """Flax variables -> a PyTorch state_dict with the official key names.

  The result loads with ``strict=True`` into the official / timm model
  (GhostNetV3's training form: into the official one; timm names its branch
  BatchNorms ``bn1``: rename with
  :func:`ghostnet_jax.ghostnetv3.official_to_timm_key`).
  ``num_batches_tracked`` is written as 0 for every BatchNorm. With ``name``
  the variables are first checked against the model's layout.
  """
  import torch  # pylint: disable=g-import-not-at-top
  out = collections.OrderedDict()
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables.get(collection, {})).items():
      flat[flax_to_torch_key(collection, path)] = np.asarray(leaf, np.float32)
  if name is not None:
    layout = torch_layout(name, **create_kwargs)
    missing = sorted(set(layout) - set(flat))
    unexpected = sorted(set(flat) - set(layout))
    misshaped = [(k, _torch_shape(flat[k].shape),
                  _torch_shape(layout[k][2])) for k in layout
                 if k in flat and flat[k].shape != layout[k][2]]
    if missing or unexpected or misshaped:
      raise CheckpointError(_format_mismatch(
          name, 'variables', missing, unexpected, misshaped, []))
  for key, value in flat.items():
    out[key] = torch.from_numpy(np.array(flax_to_torch_array(value)))
    if key.endswith('.running_var'):
      out[key[:-len('running_var')] + 'num_batches_tracked'] = torch.tensor(0)
  return out


# ---------------------------------------------------------------------- CLI


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ghostnet_jax.convert',
      description='Convert an official PyTorch GhostNet checkpoint into an '
      'orbax checkpoint that train.py and eval.py can restore.')
  parser.add_argument('--model', required=True,
                      help='registered model name, e.g. ghostnet_100')
  parser.add_argument('--torch-checkpoint', required=True,
                      help='.pth / .pth.tar file as published')
  parser.add_argument('--output', required=True,
                      help='directory for the orbax checkpoint (must not '
                      'exist or be empty)')
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--ema', dest='ema', action='store_true', default=None,
                     help='require and use the EMA weights')
  group.add_argument('--no-ema', dest='ema', action='store_false',
                     help='use the regular weights even if EMA ones exist')
  parser.add_argument('--num-classes', type=int, default=1000)
  parser.add_argument('--deploy', action='store_true',
                      help='the checkpoint is in re-parameterised (deploy) '
                      'form (GhostNetV3)')
  parser.add_argument('--non-strict', action='store_true',
                      help='allow missing/unexpected keys (missing ones keep '
                      'their random initial values)')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='unpickle arbitrary objects (trusted files only)')
  args = parser.parse_args(argv)

  from ghostnet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  create_kwargs = {'deploy': True} if args.deploy else {}
  try:
    checkpoint.check_output_dir(args.output)
    variables = load_torch_checkpoint(
        args.torch_checkpoint, args.model, ema=args.ema,
        strict=not args.non_strict, allow_pickle=args.allow_pickle,
        num_classes=args.num_classes, **create_kwargs)
    from ghostnet_jax.utils import count_params  # pylint: disable=g-import-not-at-top
    metadata = {
        'model': args.model, 'num_classes': args.num_classes,
        'model_kwargs': create_kwargs,
        'source': os.path.abspath(args.torch_checkpoint),
        'ema': args.ema, 'num_params': count_params(variables['params']),
    }
    checkpoint.save_converted(args.output, variables, metadata)
  except (CheckpointError, FileNotFoundError, FileExistsError, ValueError,
          TypeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Converted {args.torch_checkpoint} -> {args.output} '
        f'({args.model}, {metadata["num_params"]:,} parameters).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
