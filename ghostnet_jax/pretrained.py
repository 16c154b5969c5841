"""Pretrained weights in one call: ``load_pretrained(name, source=None)``.

::

    model = ghostnet_jax.create_model('ghostnet_130')
    variables = ghostnet_jax.load_pretrained('ghostnet_130')   # PaddleClas SSLD
    logits = model.apply(variables, images)

``source`` is a registered source tag of the model (see
:func:`ghostnet_jax.sources.list_sources` or ``python -m ghostnet_jax.summary
NAME``; default: the first loadable one), or a local file, an ``http(s)``
URL, or ``hf-hub:ORG/REPO`` (timm's ``model.safetensors``). The file's format
comes from the registered source, else from its name (``.safetensors``,
``.pth``/``.pth.tar``/``.bin``/``.pt``, ``.pdparams``, ``.ckpt``, and TF
bundles as ``PREFIX``, ``PREFIX.index`` or ``PREFIX.data-*-of-*``).

Some weights need a model built with extra fields, the source's
``model_kwargs``: the official TensorFlow checkpoint (``source='tf'``, or a
TF bundle) was trained with TF ``'SAME'`` padding, so::

    model = ghostnet_jax.create_model('ghostnet_100', padding='tf_same')
    variables = ghostnet_jax.load_pretrained('ghostnet_100', source='tf')

``load_pretrained`` prints that hint on stderr whenever it applies.

Files are downloaded (verified, resumable; :mod:`ghostnet_jax.download`) into
``<cache>/downloads``; Hub files go through ``huggingface_hub`` and its own
cache. The first load converts the file and keeps an orbax copy in
``<cache>/converted/<model>/<source>``; later loads restore that copy and need
neither the file nor any reader dependency. A damaged copy is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile

import jax
import numpy as np

from ghostnet_jax import convert, download, registry, sources, weight_mappings
from ghostnet_jax import weight_readers

HF_PREFIX = 'hf-hub:'
_EXT_FORMATS = (('.safetensors', 'safetensors'), ('.pdparams', 'pdparams'),
                ('.index', 'tf'),
                ('.ckpt', 'mindspore'), ('.pth.tar', 'torch'), ('.pth', 'torch'),
                ('.pt', 'torch'), ('.bin', 'torch'), ('.tar', 'torch'))
_FORMAT_LAYOUT = {'safetensors': 'timm', 'torch': 'official',
                  'pdparams': 'paddle', 'mindspore': 'mindcv', 'tf': 'tf'}
# Bumped when a conversion changes, so old converted copies are rebuilt.
CONVERSION_VERSION = 1


class PretrainedError(ValueError):
  """A pretrained source that cannot be loaded (names it and the problem)."""


def _guess_format(location: str) -> str:
  low = location.lower()
  for ext, fmt in _EXT_FORMATS:
    if low.endswith(ext):
      return fmt
  raise PretrainedError(
      f'Cannot tell the format of {location!r} from its name; expected one of '
      f'{", ".join(e for e, _ in _EXT_FORMATS)}.')


def resolve_source(name: str, source: str | None = None
                   ) -> sources.WeightSource:
  """The :class:`WeightSource` that ``load_pretrained(name, source)`` uses."""
  registry.get_entry(name)
  if source is None:
    chosen = sources.default_source(name)
    if chosen is None:
      tags = [s.tag for s in sources.list_sources(name)]
      raise PretrainedError(
          f'No pretrained weights are registered for {name}' +
          (f' that load exactly (known but not loadable: {tags})' if tags
           else '') + '; pass a local file, URL or hf-hub:ORG/REPO as source.')
    return chosen
  source = str(source)
  if source.startswith(HF_PREFIX):
    return sources.WeightSource(
        model=name, tag=source, url=source, format='safetensors',
        layout='timm', top1=None, preprocess='', filename='model.safetensors')
  if source.startswith(('http://', 'https://')):
    fmt = _guess_format(source.split('?')[0])
    return sources.WeightSource(model=name, tag=source, url=source,
                                format=fmt, layout=_FORMAT_LAYOUT[fmt],
                                top1=None, preprocess='')
  if (os.path.exists(source) or os.path.exists(source + '.index')
      or os.sep in source or source.startswith('.')):
    path = os.path.abspath(source)
    tf_index = weight_readers.tf_bundle_prefix(path) + '.index'
    if os.path.isfile(tf_index) and not path.endswith(
        ('.safetensors', '.pdparams', '.ckpt', '.pth', '.pt', '.bin', '.tar')):
      path = tf_index  # a TF bundle given by prefix, index or data shard
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Weight file not found: {path}')
    fmt = _guess_format(path)
    return sources.WeightSource(model=name, tag=path, url=path, format=fmt,
                                layout=_FORMAT_LAYOUT[fmt], top1=None,
                                preprocess='')
  chosen = sources.get_source(name, source)
  if not chosen.loadable:
    raise PretrainedError(
        f'Source {source!r} of {name} ({chosen.url}) is registered but not '
        f'loadable: {chosen.notes}')
  return chosen


def _local_file(src: sources.WeightSource, root: str) -> str:
  """Downloads (or finds) the source's file; returns its local path."""
  if src.url.startswith(HF_PREFIX):
    return _hf_file(src)
  if not src.url.startswith(('http://', 'https://')):
    return src.url
  dest = os.path.join(root, 'downloads', src.model, src.file_name) \
      if src.tag != src.url else os.path.join(
          root, 'downloads', 'url-' + _short_hash(src.url), src.file_name)
  path = download.fetch(src.url, dest, sha256=src.sha256,
                        sha256_prefix=src.sha256_prefix, size=src.size)
  if src.format == 'tf':  # the bundle's data shard lies next to its index
    url_prefix = weight_readers.tf_bundle_prefix(src.url)
    for url, dest_shard in zip(
        weight_readers.tf_data_files(url_prefix),
        weight_readers.tf_data_files(weight_readers.tf_bundle_prefix(path))):
      download.fetch(url, dest_shard)
  return path


def _hf_file(src: sources.WeightSource) -> str:
  """``model.safetensors`` of an ``hf-hub:`` source, through huggingface_hub.

  Honours ``HF_HUB_OFFLINE`` and the Hub cache (``HF_HUB_CACHE``/``HF_HOME``).
  """
  repo = src.url[len(HF_PREFIX):]
  revision = None
  if '@' in repo:
    repo, revision = repo.split('@', 1)
  revision = revision or src.revision
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise PretrainedError('hf-hub sources need the huggingface_hub package '
                          '(pip install huggingface_hub).') from e
  from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  try:
    path = hf_hub_download(repo, src.filename or 'model.safetensors',
                           revision=revision,
                           local_files_only=download.is_offline())
  except (hf_errors.LocalEntryNotFoundError, OSError) as e:
    # hf_hub_download raises LocalEntryNotFoundError offline and on network
    # failure; revision pinned -> try what the cache has on main.
    if revision is not None:
      try:
        path = hf_hub_download(repo, src.filename or 'model.safetensors',
                               local_files_only=download.is_offline())
      except Exception:  # pylint: disable=broad-except
        path = None
      if path is not None:
        print(f'ghostnet_jax: {repo}@{revision[:8]} not cached; using the '
              'cached main revision.', file=sys.stderr)
        return _verify_hf(path, src)
    raise download.OfflineError(
        f'Cannot get {src.filename} of https://huggingface.co/{repo} '
        f'(revision {revision or "main"}): {e}. If you are offline, put the '
        'file in the Hugging Face cache with `huggingface-cli download '
        f'{repo} model.safetensors` on a connected machine, or pass the '
        'local file as source=.') from e
  return _verify_hf(path, src)


def _verify_hf(path: str, src: sources.WeightSource) -> str:
  """Checks a Hub file: against the registered SHA-256, and against its blob
  name (the Hub cache names LFS blobs by their SHA-256), so a damaged cache
  entry is never used."""
  blob = os.path.basename(os.path.realpath(path))
  if re.fullmatch(r'[0-9a-f]{64}', blob):
    digest = download.sha256_of(path)
    if digest != blob:
      raise download.ChecksumError(
          f'{path} is damaged: its SHA-256 is {digest} but the Hugging Face '
          f'cache stored it as {blob}. Delete {os.path.realpath(path)} and '
          'load again (online) to fetch it anew.')
  if src.sha256 is not None:
    try:
      download.verify_file(path, sha256=src.sha256)
    except download.ChecksumError as e:
      raise download.ChecksumError(
          f'{e} Delete it from the Hugging Face cache and load again.'
      ) from None
  return path


def _short_hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_state_dict(path: str, src: sources.WeightSource, name: str
                    ) -> dict[str, np.ndarray]:
  """Reads ``path`` and maps it to the official PyTorch layout of ``name``."""
  fmt = src.format
  if fmt == 'safetensors':
    raw = weight_readers.read_safetensors(path)
  elif fmt == 'torch':
    obj = weight_readers.read_torch(path)
    raw = convert.select_state_dict(obj, ema=src.ema, source=path)
  elif fmt == 'pdparams':
    raw = weight_readers.read_pdparams(path)
  elif fmt == 'mindspore':
    raw = weight_readers.read_mindspore_ckpt(path)
  elif fmt == 'tf':
    raw = weight_readers.read_tf_checkpoint(path)
  else:
    raise PretrainedError(f'{path}: no reader for format {fmt!r}.')
  layout = src.layout
  if fmt == 'mindspore' and src.tag == src.url:  # a file given by path/URL
    layout = 'ms_zoo' if any(k.startswith('blocks.16.') for k in raw) \
        else 'mindcv'
  mapper = weight_mappings.LAYOUTS[layout]
  torch_layout = convert.torch_layout(name)
  try:
    return mapper(raw, torch_layout)
  except weight_mappings.MappingError as e:
    raise convert.CheckpointError(f'{path}: {e}') from None


def convert_file(path: str, src: sources.WeightSource, name: str) -> dict:
  """Reads, maps and converts one file into ``create_model(name)`` variables."""
  sd = read_state_dict(path, src, name)
  return convert.state_dict_to_variables(sd, name, source=path)


def _converted_dir(root: str, src: sources.WeightSource, file_sha: str | None
                   ) -> str:
  if src.tag == src.url:  # ad hoc: key the copy by what it came from
    key = 'file-' + (file_sha[:16] if file_sha else _short_hash(src.url))
  else:
    key = src.tag
  return os.path.join(root, 'converted', src.model, key)


def _metadata(src: sources.WeightSource, path: str, file_sha: str) -> dict:
  return {'model': src.model, 'num_classes': 1000, 'source': src.tag,
          'url': src.url, 'format': src.format, 'file': path,
          'file_sha256': file_sha, 'conversion': CONVERSION_VERSION,
          'top1': src.top1}


def _restore_cached(directory: str, src: sources.WeightSource
                    ) -> dict | None:
  """The converted copy, or None if absent; a damaged one is removed."""
  if not os.path.isdir(directory):
    return None
  from ghostnet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    variables, meta = checkpoint.restore_converted(directory)
    if meta.get('model') != src.model or meta.get('url') != src.url or \
        meta.get('conversion') != CONVERSION_VERSION:
      raise ValueError(f'it holds {meta.get("model")} from {meta.get("url")} '
                       f'(conversion {meta.get("conversion")})')
    convert.check_variables(variables, src.model, 1000, directory)
    leaves = jax.tree_util.tree_leaves(variables)
    if not all(np.isfinite(np.asarray(x)).all() for x in leaves):
      raise ValueError('it holds NaN/Inf values')
    return variables
  except Exception as e:  # pylint: disable=broad-except  (any damage)
    print(f'ghostnet_jax: converted copy {directory} is unusable ({e}); '
          'converting again.', file=sys.stderr)
    shutil.rmtree(directory, ignore_errors=True)
    return None


def _save_cached(directory: str, variables: dict, meta: dict) -> None:
  """Writes the converted copy atomically (a temp dir renamed into place)."""
  from ghostnet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-', dir=parent)
  try:
    target = os.path.join(tmp, 'ckpt')
    checkpoint.save_converted(target, variables, meta)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(target, directory)
  except OSError as e:
    print(f'ghostnet_jax: could not keep a converted copy at {directory} '
          f'({e}); the weights are loaded but will be converted again next '
          'time.', file=sys.stderr)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_pretrained(name: str, source: str | None = None, *,
                    cache_dir: str | os.PathLike | None = None) -> dict:
  """Pretrained variables of ``create_model(name)``.

  Args:
    name: registered model name, e.g. ``'ghostnet_100'``.
    source: a registered source tag of ``name`` (``None``: the default, the
      first loadable one of :func:`ghostnet_jax.sources.list_sources`), a
      local file, an ``http(s)`` URL or ``hf-hub:ORG/REPO``.
    cache_dir: cache root (default ``$GHOSTNET_JAX_CACHE`` or
      ``~/.cache/ghostnet_jax``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``create_model(name,
    **src.model_kwargs)`` (1000 classes; ``src = resolve_source(name,
    source)``; the kwargs are empty except for the TensorFlow checkpoint,
    ``padding='tf_same'``, announced on stderr);
    ``model.apply(variables, images)`` takes RGB NHWC images prepared as the
    source's ``eval_config`` says.

  Raises:
    ValueError: unknown model or source; PretrainedError / CheckpointError /
      WeightFileError for files that cannot be loaded; OfflineError,
      ChecksumError, DownloadError (all OSError) for downloads.
  """
  src = resolve_source(name, source)
  _announce_model_kwargs(src)
  root = download.cache_root(cache_dir)
  is_local = not src.url.startswith(('http://', 'https://', HF_PREFIX))
  file_sha = download.sha256_of(src.url) if is_local else None
  directory = _converted_dir(root, src, file_sha)
  variables = _restore_cached(directory, src)
  if variables is not None:
    return variables
  path = _local_file(src, root)
  if file_sha is None:
    file_sha = download.sha256_of(path)
  variables = convert_file(path, src, name)
  _save_cached(directory, variables, _metadata(src, path, file_sha))
  return variables


def _announce_model_kwargs(src: sources.WeightSource) -> None:
  """Tells the user which model the weights need, when it is not the
  default one (the parameters fit both; only the outputs differ)."""
  kwargs = src.model_kwargs
  if kwargs:
    args = ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
    print(f'ghostnet_jax: these weights ({src.tag}) need '
          f'create_model({src.model!r}, {args}).', file=sys.stderr)


def describe_sources(name: str) -> str:
  """A text table of the registered sources of ``name``."""
  rows = sources.list_sources(name)
  if not rows:
    return f'{name}: no registered pretrained weights.'
  default = sources.default_source(name)
  lines = [f'Pretrained sources of {name} (load_pretrained({name!r}, '
           'source=TAG)):']
  for s in rows:
    mark = '*' if default is not None and s is default else ' '
    top1 = f'{s.top1:.2f}' if s.top1 is not None else '-'
    state = '' if s.loadable else '  [not loadable]'
    lines.append(f' {mark} {s.tag:<14} {s.format:<11} top-1 {top1:>6}  '
                 f'{s.url}{state}')
    lines.append(f'     {"":<14} eval: {s.preprocess}')
    if s.model_kwargs:
      args = ', '.join(f'{k}={v!r}' for k, v in s.model_kwargs.items())
      lines.append(f'     {"":<14} model: create_model({name!r}, {args})')
  lines.append(' * = default')
  return '\n'.join(lines)


__all__ = ['load_pretrained', 'resolve_source', 'describe_sources',
           'convert_file', 'read_state_dict', 'PretrainedError']
