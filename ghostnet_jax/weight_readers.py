"""Readers of other frameworks' weight files, without those frameworks.

Every reader returns ``{name: numpy.ndarray}`` with the file's own names and
layouts (the key mapping is :mod:`ghostnet_jax.weight_mappings`):

* :func:`read_safetensors` - ``.safetensors`` through ``safetensors.numpy``.
* :func:`read_torch` - PyTorch ``torch.save`` files (zip and legacy format)
  with a restricted unpickler: only the globals that rebuild tensors and plain
  containers are allowed; anything else (``os.system``, ``builtins.eval``,
  ...) is refused before it can run.
* :func:`read_pdparams` - PaddlePaddle ``paddle.save`` pickles of numpy
  arrays, with an unpickler that can only build numpy arrays.
* :func:`read_mindspore_ckpt` - MindSpore ``.ckpt`` (protobuf), parsed from
  the wire format.
* :func:`read_tf_checkpoint` - TensorFlow tensor bundles (``PREFIX.index`` +
  ``PREFIX.data-*-of-*``) through ``tf.train.load_checkpoint``; needs
  TensorFlow (the ``export`` extra). A bundle holds only tensors: reading one
  runs no code.

Untrusted files never execute code here.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Callable

import numpy as np


class WeightFileError(ValueError):
  """A weight file that cannot be read (names the file and the problem)."""


class UnsafePickleError(WeightFileError):
  """A pickle that asks for a global outside the allow-list."""


def _check_file(path: str) -> int:
  if not os.path.exists(path):
    raise FileNotFoundError(f'Weight file not found: {path}')
  if os.path.isdir(path):
    raise WeightFileError(f'{path} is a directory, not a weight file.')
  size = os.path.getsize(path)
  if size == 0:
    raise WeightFileError(f'{path} is empty (0 bytes).')
  return size


# --------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file as numpy arrays (no torch)."""
  path = os.fspath(path)
  _check_file(path)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own error types.
    raise WeightFileError(f'{path} is not a readable safetensors file '
                          f'(truncated or corrupt?): {e}') from e


# ------------------------------------------------------- restricted unpickler


class _Restricted(pickle.Unpickler):
  """An unpickler that resolves only allow-listed globals."""

  def __init__(self, file, path: str, allowed: dict[tuple[str, str], Any],
               what: str):
    super().__init__(file, encoding='latin1')
    self._path, self._allowed, self._what = path, allowed, what

  def find_class(self, module, name):
    # Protocol-2 files name Python 2 modules (``commands``, ``__builtin__``);
    # map them as pickle itself does, so the check and message see the real
    # module.
    module, name = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module),
                         name))
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'{self._path}: refusing to load: the pickle asks for the global '
          f'{module}.{name}, which is not needed by {self._what} (it could '
          'run code). The file is not a plain weight file; do not trust it.'
      ) from None


def _numpy_globals() -> dict[tuple[str, str], Any]:
  """The numpy globals that rebuild arrays, dtypes and scalars."""
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  except ImportError:  # numpy < 2
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  allowed = {}
  for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[(mod, '_reconstruct')] = _reconstruct
    allowed[(mod, 'scalar')] = multiarray.scalar
  allowed[('numpy', 'ndarray')] = np.ndarray
  allowed[('numpy', 'dtype')] = np.dtype
  allowed[('_codecs', 'encode')] = _latin1_encode
  allowed[('collections', 'OrderedDict')] = collections.OrderedDict
  return allowed


def _reconstruct(cls, shape, dtype):
  if cls is not np.ndarray:
    raise UnsafePickleError(f'array reconstruction of {cls!r} refused.')
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _latin1_encode(text, encoding='latin1'):
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError('_codecs.encode with unexpected arguments.')
  return text.encode('latin1')


def _check_no_objects(obj, path: str) -> None:
  """Object arrays could hide anything: refuse them."""
  if isinstance(obj, np.ndarray):
    if obj.dtype.hasobject:
      raise UnsafePickleError(f'{path}: holds an object array; refused.')
  elif isinstance(obj, dict):
    for v in obj.values():
      _check_no_objects(v, path)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _check_no_objects(v, path)


# --------------------------------------------------------------- PaddlePaddle


def read_pdparams(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A ``paddle.save`` state_dict: ``{structured name: array}``.

  Drops Paddle's name table (``StructuredToParameterName@@``) and reassembles
  arrays that protocol-2/3 files split into ``key@@.0``, ``key@@.1``, ...
  """
  path = os.fspath(path)
  _check_file(path)
  with open(path, 'rb') as f:
    head = f.read(2)
    f.seek(0)
    if head[:1] != b'\x80':
      raise WeightFileError(f'{path} is not a pickle (starts with {head!r}); '
                            'not a .pdparams file.')
    try:
      obj = _Restricted(f, path, _numpy_globals(),
                        'a .pdparams file').load()
    except UnsafePickleError:
      raise
    except Exception as e:
      raise WeightFileError(f'{path} is not a readable .pdparams pickle '
                            f'(truncated or corrupt?): {e}') from e
  if not isinstance(obj, dict):
    raise WeightFileError(f'{path} holds a {type(obj).__name__}, not a '
                          'state_dict.')
  _check_no_objects(obj, path)
  obj = dict(obj)
  obj.pop('StructuredToParameterName@@', None)
  big = obj.pop('UnpackBigParamInfor@@', None)
  if big:
    for key, info in big.items():
      parts = [obj.pop(s) for s in info['slices']]
      obj[key] = np.concatenate([p.ravel() for p in parts]).reshape(
          info['OriginShape'])
  out = {}
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      raise WeightFileError(f'{path}: entry {k!r} is a {type(v).__name__}, '
                            'not an array.')
    out[str(k)] = v
  return out


# -------------------------------------------------------------------- PyTorch

_TORCH_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'LongStorage': np.int64,
    'IntStorage': np.int32, 'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
  """Stands for ``torch.FloatStorage`` etc.: only carries the dtype."""

  def __init__(self, name: str):
    if name == 'BFloat16Storage':
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      self.dtype = np.dtype(_TORCH_DTYPES[name])
    self.name = name


class _Storage:
  """A storage whose bytes may arrive after the pickle (legacy format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.array = dtype, numel, None


class _PendingTensor:
  """A tensor waiting for its storage's bytes."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  def resolve(self, path: str) -> np.ndarray:
    base = self.storage.array
    if base is None:
      raise WeightFileError(f'{path}: a tensor refers to missing data.')
    if not self.size:
      return np.array(base[self.offset], copy=True)
    end = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)
                            ) + 1
    if self.offset < 0 or end > base.size or min(self.stride) < 0:
      raise WeightFileError(f'{path}: a tensor lies outside its storage '
                            '(corrupt file).')
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[self.offset:], shape=self.size,
        strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, _Storage):
    raise UnsafePickleError('tensor rebuilt from something not a storage.')
  return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _Namespace:
  """Stands for ``argparse.Namespace`` (training arguments): inert."""


def _torch_globals() -> dict[tuple[str, str], Any]:
  allowed = _numpy_globals()
  allowed.update({
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('argparse', 'Namespace'): _Namespace,
  })
  for name in list(_TORCH_DTYPES) + ['BFloat16Storage']:
    allowed[('torch', name)] = _StorageType(name)
  return allowed


class _TorchUnpickler(_Restricted):

  def __init__(self, file, path, load_storage: Callable[..., _Storage]):
    super().__init__(file, path, _torch_globals(), 'a PyTorch state_dict')
    self._load_storage = load_storage

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise WeightFileError(f'{self._path}: unexpected persistent id '
                            f'{str(pid)[:80]}.')
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
      raise UnsafePickleError(f'{self._path}: storage of unknown type.')
    return self._load_storage(storage_type, *pid[2:])


def _resolve(obj, path: str):
  if isinstance(obj, _PendingTensor):
    return obj.resolve(path)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, path)) for k, v in obj.items()) \
        if isinstance(obj, collections.OrderedDict) else \
        {k: _resolve(v, path) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_resolve(v, path) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, path) for v in obj)
  if isinstance(obj, _Namespace):
    return argparse.Namespace()  # Training arguments are not needed here.
  return obj


def _read_torch_zip(path: str) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise WeightFileError(f'{path} is a damaged zip archive ({e}): probably '
                          'truncated or corrupt; download it again.') from e
  with archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise WeightFileError(f'{path} is a zip archive without data.pkl: not '
                            'a PyTorch checkpoint.')
    prefix = pkl[0][:-len('data.pkl')]
    bad = archive.testzip()
    if bad is not None:
      raise WeightFileError(f'{path} is corrupt: the checksum of member '
                            f'{bad!r} does not match (download it again).')
    byteorder = 'little'
    if f'{prefix}byteorder' in names:
      byteorder = archive.read(f'{prefix}byteorder').decode().strip()

    def load_storage(storage_type, key, location, numel, *unused):
      del location, unused
      raw = archive.read(f'{prefix}data/{key}')
      dtype = storage_type.dtype.newbyteorder('<' if byteorder == 'little'
                                              else '>')
      st = _Storage(storage_type.dtype, numel)
      st.array = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
      return st

    with archive.open(pkl[0]) as f:
      return _TorchUnpickler(io.BytesIO(f.read()), path, load_storage).load()


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _read_torch_legacy(path: str) -> Any:
  storages: dict[str, _Storage] = {}

  def load_storage(storage_type, key, location, numel, view=None):
    del location
    if view is not None:
      raise WeightFileError(f'{path}: storage views are not supported.')
    if key not in storages:
      storages[key] = _Storage(storage_type.dtype, numel)
    return storages[key]

  with open(path, 'rb') as f:
    safe = _Restricted(f, path, {}, 'a PyTorch header')
    try:
      magic = safe.load()
      if magic != _LEGACY_MAGIC:
        raise WeightFileError(f'{path} is a pickle but not a PyTorch file.')
      safe.load()  # protocol version
      safe.load()  # sys info
      obj = _TorchUnpickler(f, path, load_storage).load()
      keys = _Restricted(f, path, {}, 'a PyTorch key list').load()
      for key in keys:
        st = storages[key]
        (numel,) = struct.unpack('<q', f.read(8))
        raw = f.read(numel * st.dtype.itemsize)
        if len(raw) != numel * st.dtype.itemsize:
          raise EOFError('storage data ends early')
        st.array = np.frombuffer(raw, dtype=st.dtype)
    except (UnsafePickleError, WeightFileError):
      raise
    except Exception as e:
      raise WeightFileError(f'{path} is a legacy PyTorch file that cannot be '
                            f'read (truncated or corrupt?): {e}') from e
  return obj


def read_torch(path: str | os.PathLike) -> Any:
  """What ``torch.save`` wrote (a state_dict or a training checkpoint dict),
  with tensors as numpy arrays; torch is not needed.

  Only tensor storages, ``OrderedDict``, ``argparse.Namespace`` (returned
  empty) and numpy scalars may appear in the pickle.
  """
  path = os.fspath(path)
  size = _check_file(path)
  with open(path, 'rb') as f:
    head = f.read(4)
  try:
    if head[:2] == b'PK':
      obj = _read_torch_zip(path)
    elif head[:1] == b'\x80':
      obj = _read_torch_legacy(path)
    else:
      raise WeightFileError(f'{path} ({size} bytes) is not a PyTorch file (no '
                            f'zip or pickle header; it starts with {head!r}).')
  except (UnsafePickleError, WeightFileError, FileNotFoundError):
    raise
  except Exception as e:
    raise WeightFileError(f'{path} ({size} bytes) cannot be read (truncated '
                          f'or corrupt?): {e}') from e
  return _resolve(obj, path)


# ------------------------------------------------------------------ MindSpore

_MS_DTYPES = {
    'Float32': np.float32, 'Float16': np.float16, 'Float64': np.float64,
    'Int8': np.int8, 'Int16': np.int16, 'Int32': np.int32, 'Int64': np.int64,
    'UInt8': np.uint8, 'Uint8': np.uint8, 'UInt16': np.uint16,
    'UInt32': np.uint32, 'UInt64': np.uint64, 'Bool': np.bool_,
}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise EOFError('varint runs past the end')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 70:
      raise ValueError('varint too long')


def _fields(buf: bytes):
  """Yields ``(field number, wire type, value)`` of one protobuf message."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      n, pos = _varint(buf, pos)
      if pos + n > len(buf):
        raise EOFError('field runs past the end')
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f'unsupported wire type {wire}')
    yield field, wire, value


def _ms_tensor(buf: bytes) -> tuple[list[int], str, bytes]:
  dims, dtype, content = [], None, b''
  for field, wire, value in _fields(buf):
    if field == 1 and wire == 0:
      dims.append(value)
    elif field == 1 and wire == 2:  # packed
      p = 0
      while p < len(value):
        d, p = _varint(value, p)
        dims.append(d)
    elif field == 2:
      dtype = value.decode()
    elif field == 3:
      content = value
  return dims, dtype, content


def read_mindspore_ckpt(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a MindSpore ``.ckpt``: ``{parameter name: array}``.

  Includes optimizer entries (``moments.*`` ...); the mapping drops them.
  A ``crc_num`` tail is stripped; encrypted checkpoints are refused.
  """
  path = os.fspath(path)
  _check_file(path)
  with open(path, 'rb') as f:
    data = f.read()
  marker = data.rfind(b'crc_num')
  if marker != -1 and len(data) - marker <= 7 + 20:
    data = data[:marker]
  chunks: dict[str, list[bytes]] = {}
  meta: dict[str, tuple[list[int], str]] = {}
  try:
    for field, wire, value in _fields(data):
      if field != 1 or wire != 2:
        raise ValueError(f'unexpected top-level field {field}')
      tag, tensor = None, None
      for f2, _, v2 in _fields(value):
        if f2 == 1:
          tag = v2.decode()
        elif f2 == 2:
          tensor = _ms_tensor(v2)
      if tag is None or tensor is None:
        continue  # map tensors and other entries carry no dense weights
      dims, dtype, content = tensor
      chunks.setdefault(tag, []).append(content)
      if tag not in meta or (dims and not meta[tag][0]):
        meta[tag] = (dims, dtype)  # slices of a split tensor: first shape
  except (ValueError, EOFError, UnicodeDecodeError) as e:
    raise WeightFileError(f'{path} is not a readable MindSpore checkpoint '
                          f'(truncated, encrypted or not a .ckpt): {e}'
                          ) from None
  out = {}
  for tag, parts in chunks.items():
    dims, dtype = meta[tag]
    if dtype not in _MS_DTYPES:
      continue  # strings and other non-numeric bookkeeping entries
    arr = np.frombuffer(b''.join(parts), dtype=np.dtype(_MS_DTYPES[dtype]
                                                        ).newbyteorder('<'))
    shape = [] if dims in ([0], [1]) and arr.size == 1 else dims
    if int(np.prod(shape)) != arr.size:
      raise WeightFileError(f'{path}: {tag} has {arr.size} values for shape '
                            f'{dims} (corrupt file).')
    out[tag] = arr.reshape(shape).astype(_MS_DTYPES[dtype])
  if not out:
    raise WeightFileError(f'{path} holds no tensors: not a MindSpore '
                          'checkpoint.')
  return out


# ----------------------------------------------------------------- TensorFlow

TF_EXTRA_HINT = ("pip install 'ghostnet-jax[export]' (tensorflow-cpu; pins in "
                 'requirements-export.txt)')
_TF_DATA_SHARD = re.compile(r'\.data-\d{5}-of-\d{5}$')


def tf_bundle_prefix(path: str | os.PathLike) -> str:
  """The prefix of a TF tensor bundle given as ``PREFIX``, ``PREFIX.index``
  or one of its ``PREFIX.data-NNNNN-of-NNNNN`` shards."""
  path = os.fspath(path)
  if path.endswith('.index'):
    return path[:-len('.index')]
  return _TF_DATA_SHARD.sub('', path)


def tf_data_files(prefix: str, num_shards: int = 1) -> list[str]:
  """``PREFIX.data-00000-of-0000N`` ... (the files next to the index)."""
  return [f'{prefix}.data-{i:05d}-of-{num_shards:05d}'
          for i in range(num_shards)]


def read_tf_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All floating-point variables of a TensorFlow checkpoint (tensor bundle).

  Args:
    path: ``PREFIX``, ``PREFIX.index`` or a ``PREFIX.data-*`` shard.

  Returns:
    ``{variable name: array}`` with TF's names and layouts (conv kernels
    HWIO). Integer / string entries (``global_step``, object graphs) are
    left out.

  Raises:
    WeightFileError: TensorFlow missing (naming the extra), or a bundle that
      cannot be read (index or data shard missing, truncated, corrupt).
    FileNotFoundError: no ``PREFIX.index``.
  """
  prefix = tf_bundle_prefix(path)
  index = prefix + '.index'
  _check_file(index)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightFileError(
        f'{index} is a TensorFlow checkpoint; reading it needs TensorFlow: '
        f'{TF_EXTRA_HINT}.') from e
  try:
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    out = {}
    for name, dtype in dtypes.items():
      if dtype.is_floating:
        out[name] = np.asarray(reader.get_tensor(name))
  except Exception as e:  # tf.errors.OpError and friends
    shards = [f for f in tf_data_files(prefix) if not os.path.exists(f)]
    hint = (f' (missing data file {shards[0]}: download it next to the '
            'index)' if shards else '')
    raise WeightFileError(f'{index} is not a readable TensorFlow checkpoint'
                          f'{hint}: {type(e).__name__}: {e}') from None
  if not out:
    raise WeightFileError(f'{index} holds no floating-point variables: not '
                          'a checkpoint of a network.')
  return out
