"""Torch-free readers: equal to the real loaders, and safe on hostile files."""

import argparse
import collections
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest
import torch

from ghostnet_jax import convert, weight_readers
from ghostnet_jax.weight_readers import UnsafePickleError, WeightFileError


@pytest.fixture(scope='module')
def state_dict():
  g = torch.Generator().manual_seed(0)
  sd = collections.OrderedDict()
  sd['conv.weight'] = torch.randn(8, 3, 3, 3, generator=g)
  sd['bn.running_var'] = torch.rand(8, generator=g)
  sd['bn.num_batches_tracked'] = torch.tensor(7)
  sd['total_ops'] = torch.zeros(1, dtype=torch.float64) + 3.5
  sd['half'] = torch.randn(4, 5, generator=g).half()
  sd['bf16'] = torch.randn(6, generator=g).bfloat16()
  base = torch.randn(5, 7, generator=g)
  sd['transposed'] = base.t()            # non-contiguous view
  sd['slice'] = base[1:3, 2:]            # offset + strides into a storage
  sd['scalar'] = torch.tensor(2.5)
  sd['empty'] = torch.zeros(0, 3)
  return sd


def _as_numpy(t):
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  return t.numpy()


@pytest.mark.parametrize('zipped', [True, False], ids=['zip', 'legacy'])
def test_torch_reader_equals_torch_load(state_dict, tmp_path, zipped):
  path = tmp_path / 'sd.pth'
  torch.save(state_dict, path, _use_new_zipfile_serialization=zipped)
  ours = weight_readers.read_torch(path)
  ref = torch.load(path, weights_only=True)
  assert list(ours) == list(ref)
  for k, v in ref.items():
    got = ours[k]
    assert got.shape == tuple(v.shape), k
    np.testing.assert_array_equal(np.asarray(got, np.float64)
                                  if got.dtype != np.int64 else got,
                                  _as_numpy(v).astype(np.float64)
                                  if got.dtype != np.int64 else _as_numpy(v))
  assert ours['total_ops'].dtype == np.float64
  assert ours['bn.num_batches_tracked'].dtype == np.int64


def test_training_checkpoint_with_namespace_and_ema(state_dict, tmp_path):
  path = tmp_path / 'ckpt.pth.tar'
  sd = {'w': state_dict['conv.weight']}
  ema = {'w': state_dict['conv.weight'] * 2}
  torch.save({'epoch': 3, 'arch': 'ghostnetv3', 'args':
              argparse.Namespace(lr=0.1, model='x'), 'state_dict': sd,
              'state_dict_ema': ema, 'metric': np.float64(77.1)}, path)
  obj = weight_readers.read_torch(path)
  assert obj['epoch'] == 3 and float(obj['metric']) == 77.1
  picked = convert.select_state_dict(obj, ema=None, source=str(path))
  np.testing.assert_array_equal(picked['w'], ema['w'].numpy())
  picked = convert.select_state_dict(obj, ema=False, source=str(path))
  np.testing.assert_array_equal(picked['w'], sd['w'].numpy())


class _Evil:
  """Unpickling this runs ``func(*args)`` under a normal unpickler."""

  def __init__(self, func, args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _evil_objects(marker):
  return {
      'os.system': _Evil(os.system, (f'touch {marker}',)),
      'subprocess': _Evil(subprocess.call, (['touch', str(marker)],)),
      'builtins.eval': _Evil(eval, (f'open({str(marker)!r}, "w")',)),
  }


@pytest.mark.parametrize('attack', ['os.system', 'subprocess',
                                    'builtins.eval'])
@pytest.mark.parametrize('kind', ['torch_zip', 'torch_legacy', 'pdparams'])
def test_malicious_pickles_are_refused(attack, kind, tmp_path):
  marker = tmp_path / 'pwned'
  evil = _evil_objects(marker)[attack]
  payload = {'conv.weight': np.zeros((2, 2), np.float32), 'x': evil}
  path = tmp_path / ('evil.pdparams' if kind == 'pdparams' else 'evil.pth')
  if kind == 'pdparams':
    with open(path, 'wb') as f:
      pickle.dump(payload, f, protocol=2)
    reader = weight_readers.read_pdparams
  else:
    payload['conv.weight'] = torch.zeros(2, 2)
    torch.save(payload, path,
               _use_new_zipfile_serialization=kind == 'torch_zip')
    reader = weight_readers.read_torch
  with pytest.raises(UnsafePickleError) as e:
    reader(path)
  assert str(path) in str(e.value) and 'refusing' in str(e.value)
  module = {'os.system': ('posix', 'os'), 'subprocess': ('subprocess',),
            'builtins.eval': ('builtins',)}[attack]
  assert any(m in str(e.value) for m in module)
  assert not marker.exists()


def test_torch_reader_refuses_pickled_modules(tmp_path):
  path = tmp_path / 'model.pth'
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(UnsafePickleError, match='torch.nn'):
    weight_readers.read_torch(path)


def test_truncated_and_foreign_files(state_dict, tmp_path):
  path = tmp_path / 'sd.pth'
  torch.save(state_dict, path)
  data = path.read_bytes()
  for name, content in (('cut.pth', data[:len(data) // 2]),
                        ('text.pth', b'hello world'),
                        ('legacy_cut.pth', None)):
    p = tmp_path / name
    if content is None:
      torch.save(state_dict, p, _use_new_zipfile_serialization=False)
      content = p.read_bytes()[:-100]
    p.write_bytes(content)
    with pytest.raises(WeightFileError, match=str(p)):
      weight_readers.read_torch(p)
  # A flipped bit inside tensor data: the zip CRC catches it.
  flipped = bytearray(data)
  pos = data.find(b'data/0') + 200
  flipped[pos] ^= 0x01
  p = tmp_path / 'flipped.pth'
  p.write_bytes(bytes(flipped))
  with pytest.raises(WeightFileError):
    weight_readers.read_torch(p)


@pytest.mark.parametrize('protocol', [2, 4])
def test_pdparams_roundtrip_and_big_param_split(protocol, tmp_path):
  rs = np.random.RandomState(0)
  a = rs.randn(6, 4).astype(np.float32)
  b = rs.randn(10).astype(np.float32)
  obj = {'a.weight': a, 'b@@.0': b[:5], 'b@@.1': b[5:],
         'UnpackBigParamInfor@@': {'b': {'OriginShape': (2, 5),
                                         'slices': ['b@@.0', 'b@@.1']}},
         'StructuredToParameterName@@': {'a.weight': 'a_weights'}}
  path = tmp_path / 'p.pdparams'
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=protocol)
  out = weight_readers.read_pdparams(path)
  assert sorted(out) == ['a.weight', 'b']
  np.testing.assert_array_equal(out['a.weight'], a)
  np.testing.assert_array_equal(out['b'], b.reshape(2, 5))
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(WeightFileError, match=str(path)):
    weight_readers.read_pdparams(path)


def _pb_varint(n):
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _pb_field(number, payload):
  return _pb_varint(number << 3 | 2) + _pb_varint(len(payload)) + payload


def _ms_value(tag, array, type_name='Float32', packed=False):
  dims = b''.join(_pb_varint(1 << 3) + _pb_varint(d) for d in array.shape)
  if packed:
    dims = _pb_field(1, b''.join(_pb_varint(d) for d in array.shape))
  tensor = dims + _pb_field(2, type_name.encode()) + _pb_field(
      3, np.ascontiguousarray(array).tobytes())
  return _pb_field(1, _pb_field(1, tag.encode()) + _pb_field(2, tensor))


def test_mindspore_ckpt_from_the_documented_format(tmp_path):
  rs = np.random.RandomState(0)
  w = rs.randn(4, 3, 3, 3).astype(np.float32)
  big = rs.randn(10).astype(np.float32)
  data = (_ms_value('conv_stem.weight', w)
          + _ms_value('moments.conv_stem.weight', w * 0, packed=True)
          + _ms_value('global_step', np.array([5], np.int32), 'Int32')
          # a tensor split into two consecutive values with one tag
          + _ms_value('big', big[:6]).replace(b'\x08\x06', b'\x08\x0a', 1)
          + _pb_field(1, _pb_field(1, b'big') + _pb_field(
              2, _pb_field(2, b'Float32') + _pb_field(3, big[6:].tobytes()))))
  path = tmp_path / 'm.ckpt'
  path.write_bytes(data + b'crc_num' + struct.pack('>Q', 12345)[:10])
  out = weight_readers.read_mindspore_ckpt(path)
  np.testing.assert_array_equal(out['conv_stem.weight'], w)
  np.testing.assert_array_equal(out['big'], big)
  assert out['global_step'].tolist() == 5 or out['global_step'].size == 1
  path.write_bytes(data[:-7])
  with pytest.raises(WeightFileError, match=str(path)):
    weight_readers.read_mindspore_ckpt(path)
