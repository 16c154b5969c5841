"""The official TensorFlow GhostNet 1.0x checkpoint loads exactly.

No weight file can be downloaded here, so the test writes a real TF tensor
bundle (``tf.raw_ops.SaveV2``) holding random weights and random BatchNorm
statistics under the official checkpoint's 435 variable names and shapes
(``data/tf_ghostnet_checkpoint_variables.txt``, read from the published
``.index``), runs an independent TensorFlow version of the TF network on it
(``tf.nn`` convolutions with ``padding='SAME'``, BGR input, the clip SE gate,
the head conv + BN), and compares its logits with
``create_model('ghostnet_100', padding='tf_same')`` on the weights
``load_pretrained`` made of the bundle (RGB input).
"""

import dataclasses
import hashlib
import os
import sys

import numpy as np
import pytest

import ghostnet_jax
from ghostnet_jax import convert, download, layers, ops, pretrained, sources
from ghostnet_jax import weight_readers
import extras
from ghostnet_jax.testing.torch_reference import compiled_apply, relative_error
from weights_server import WeightsServer

NAME = 'ghostnet_100'
HERE = os.path.dirname(os.path.abspath(__file__))
VARIABLES = os.path.join(HERE, 'data', 'tf_ghostnet_checkpoint_variables.txt')
SCOPE = 'MobileNetV2/'
BN_EPS = 1e-5  # tensorpack BatchNorm's default; the TF GhostNet sets none
# The TF network's bottlenecks (ghostnet_tensorflow/ghostnet.py _CONV_DEFS_0):
# (kernel, stride, expansion, output channels, SE).
BLOCKS = [(3, 1, 16, 16, 0), (3, 2, 48, 24, 0), (3, 1, 72, 24, 0),
          (5, 2, 72, 40, 1), (5, 1, 120, 40, 1), (3, 2, 240, 80, 0),
          (3, 1, 200, 80, 0), (3, 1, 184, 80, 0), (3, 1, 184, 80, 0),
          (3, 1, 480, 112, 1), (3, 1, 672, 112, 1), (5, 2, 672, 160, 1),
          (5, 1, 960, 160, 0), (5, 1, 960, 160, 1), (5, 1, 960, 160, 0),
          (5, 1, 960, 160, 1)]


def _tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    extras.missing('tensorflow is not installed (the export extra: '
                   'requirements-export.txt)')
  return tf


def _official_variables() -> dict[str, tuple[int, ...]]:
  out = {}
  with open(VARIABLES) as f:
    for line in f:
      if line.startswith('#') or not line.strip():
        continue
      name, shape = line.split()
      out[name] = tuple(int(d) for d in shape.split(','))
  return out


def _random_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """Random values for every official variable: fan-in scaled kernels,
  BN statistics far from the identity, SE biases around the clip range."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in _official_variables().items():
    leaf = name.rsplit('/', 1)[-1]
    if leaf in ('W', 'DW'):
      depthwise = shape[3] == 1  # [k, k, C, 1]
      fan_in = shape[0] * shape[1] * (1 if depthwise else shape[2])
      v = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
    elif name.endswith('gamma'):
      v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith('beta'):
      v = rng.normal(0, 0.2, shape)
    elif name.endswith('mean/EMA'):
      v = rng.normal(0, 0.2, shape)
    elif name.endswith('variance/EMA'):
      v = rng.uniform(0.5, 2.0, shape)
    elif '_se/fc2/b' in name:
      v = rng.normal(0.5, 0.5, shape)  # some gates clipped, some not
    else:  # other biases
      v = rng.normal(0, 0.1, shape)
    out[name] = v.astype(np.float32)
  return out


def _save_bundle(prefix: str, weights: dict[str, np.ndarray]) -> None:
  tf = _tf()
  names = sorted(weights)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(weights[n]) for n in names])


def tf_ghostnet(x_bgr: np.ndarray, weights: dict[str, np.ndarray]):
  """The TF GhostNet 1.0x forward (inference) on BGR NHWC images.

  Returns (logits, names of the variables used)."""
  tf = _tf()
  used = set()

  def w(name):
    used.add(SCOPE + name)
    return tf.constant(weights[SCOPE + name])

  def bn(x, scope):
    return tf.nn.batch_normalization(
        x, w(f'{scope}/mean/EMA'), w(f'{scope}/variance/EMA'),
        w(f'{scope}/beta'), w(f'{scope}/gamma'), BN_EPS)

  def conv_bn(x, layer, stride=1, relu=True):
    x = tf.nn.conv2d(x, w(f'{layer}/W'), stride, padding='SAME')
    x = bn(x, f'{layer}/bn')
    return tf.nn.relu(x) if relu else x

  def dw_bn(x, layer, stride, kernel='W', norm='output', relu=False):
    x = tf.nn.depthwise_conv2d(x, w(f'{layer}/{kernel}'), [1, stride, stride, 1],
                               padding='SAME')
    x = bn(x, f'{layer}/{norm}')
    return tf.nn.relu(x) if relu else x

  def ghost(x, layer, out, relu):
    primary = conv_bn(x, f'{layer}/conv1', relu=relu)
    cheap = dw_bn(primary, f'{layer}/dw1', 1, kernel='DW',
                  norm='bn' if relu else 'output', relu=relu)
    return tf.concat([primary, cheap], -1)[..., :out]

  x = conv_bn(tf.constant(x_bgr), 'Conv2d_0', stride=2)
  cin = 16
  for n, (k, s, mid, out, se) in enumerate(BLOCKS, start=1):
    layer = f'Conv2d_{n}'
    if s == 1 and cin == out:
      res = x
    else:
      res = dw_bn(x, f'{layer}_shortcut_dw', s)
      res = conv_bn(res, f'{layer}_shortcut_1x1', relu=False)
    y = ghost(x, f'{layer}_up_pointwise', mid, relu=True)
    if s > 1:
      y = dw_bn(y, f'{layer}_depthwise', s)
    if se:
      z = tf.reduce_mean(y, [1, 2], keepdims=True)
      z = tf.nn.relu(tf.nn.conv2d(z, w(f'{layer}_se/fc1/W'), 1, 'SAME')
                     + w(f'{layer}_se/fc1/b'))
      z = tf.nn.conv2d(z, w(f'{layer}_se/fc2/W'), 1, 'SAME') + w(
          f'{layer}_se/fc2/b')
      y = y * tf.clip_by_value(z, 0.0, 1.0)
    y = ghost(y, f'{layer}_down_pointwise', out, relu=False)
    x = y + res
    cin = out
  x = conv_bn(x, 'Conv2d_17')
  x = tf.reduce_mean(x, [1, 2], keepdims=True)  # the final map is < 1024 wide
  x = conv_bn(x, 'Conv2d_18')
  logits = tf.nn.conv2d(x, w('Logits/Conv2d_1c_1x1/W'), 1, 'SAME') + w(
      'Logits/Conv2d_1c_1x1/b')
  return np.asarray(logits)[:, 0, 0, :], used


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
  """A TF bundle of random weights, its reference logits and input."""
  _tf()
  root = tmp_path_factory.mktemp('tf_bundle')
  weights = _random_weights()
  prefix = str(root / 'ghostnet_checkpoint')
  _save_bundle(prefix, weights)
  rng = np.random.default_rng(1)
  # 64 x 65: height even at every stride-2 layer (asymmetric TF padding),
  # width odd (symmetric).
  x_rgb = rng.normal(0, 1, (2, 64, 65, 3)).astype(np.float32)
  logits, used = tf_ghostnet(np.ascontiguousarray(x_rgb[..., ::-1]), weights)
  assert used == set(weights)  # the reference reads every variable
  return {'prefix': prefix, 'weights': weights, 'x': x_rgb, 'logits': logits}


def test_same_padding_is_tensorflows():
  from jax import lax
  for n in (1, 2, 7, 8, 64, 65):
    for k in (1, 3, 5):
      for s in (1, 2, 3):
        for d in (1, 2):
          eff = d * (k - 1) + 1
          want = lax.padtype_to_pads((n, n), (eff, eff), (s, s), 'SAME')
          got = ops.same_padding(k, d, input_size=(n, n), strides=s)
          assert [tuple(p) for p in want] == list(got), (n, k, s, d)
  assert ops.same_padding(3, input_size=(8, 9), strides=2) == ((0, 1), (1, 1))
  assert ops.same_padding(5, input_size=(8, 8), strides=2) == ((1, 2), (1, 2))
  assert ops.same_padding(5) == ((2, 2), (2, 2))  # the PyTorch default


def test_conv_same_matches_tensorflow():
  tf = _tf()
  import jax
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 8, 9, 4)).astype(np.float32)
  cases = [(k, groups, impl) for k in (3, 5) for groups in (1, 4)
           for impl in ('lax', 'xla', 'ffi')]
  for k, groups, impl in cases:  # every lowering, asymmetric pads included
    conv = layers.Conv2d(4, k, strides=2, padding='SAME', groups=groups,
                         impl=impl)
    variables = conv.init(jax.random.PRNGKey(0), x)
    kernel = np.asarray(variables['params']['kernel'])
    y = np.asarray(conv.apply(variables, x))
    if groups == 1:
      want = tf.nn.conv2d(x, kernel, 2, padding='SAME')
    else:  # (k, k, 1, C) -> TF depthwise (k, k, C, 1)
      want = tf.nn.depthwise_conv2d(x, kernel.transpose(0, 1, 3, 2),
                                    [1, 2, 2, 1], padding='SAME')
    np.testing.assert_allclose(y, np.asarray(want), rtol=1e-5, atol=1e-5,
                               err_msg=f'k={k} groups={groups} impl={impl}')
  with pytest.raises(ValueError, match="padding must be None, 'SAME'"):
    layers.Conv2d(4, 3, padding='VALID').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='padding must be one of'):
    ghostnet_jax.create_model(NAME, padding='same').init(
        jax.random.PRNGKey(0), x[..., :3])


def test_official_names_map_onto_ghostnet_100_exactly():
  """Without TensorFlow: the 435 official variables become exactly the
  variables of ghostnet_100 (none missing, none left over, shapes right)."""
  from ghostnet_jax import weight_mappings
  weights = _random_weights()
  sd = weight_mappings.tf_to_official(weights, convert.torch_layout(NAME))
  variables = convert.state_dict_to_variables(sd, NAME, source='tf')
  stem = np.asarray(variables['params']['conv_stem']['kernel'])
  np.testing.assert_array_equal(  # BGR -> RGB
      stem, weights[SCOPE + 'Conv2d_0/W'][:, :, ::-1, :])


def test_tf_checkpoint_logits_equal_tensorflow(bundle, tmp_path, monkeypatch,
                                               capsys):
  src = pretrained.resolve_source(NAME, 'tf')
  assert src.loadable and src.model_kwargs == {'padding': 'tf_same'}
  cache = tmp_path / 'cache'
  # A local bundle, given by its index (by prefix it is the same file).
  assert pretrained.resolve_source(NAME, bundle['prefix']).url == \
      bundle['prefix'] + '.index'
  monkeypatch.chdir(os.path.dirname(bundle['prefix']))  # a bare prefix
  assert pretrained.resolve_source(NAME, 'ghostnet_checkpoint').format == 'tf'
  variables = ghostnet_jax.load_pretrained(NAME, bundle['prefix'] + '.index',
                                           cache_dir=cache)
  assert "create_model('ghostnet_100', padding='tf_same')" in \
      capsys.readouterr().err
  apply = compiled_apply(NAME, padding='tf_same')
  out = np.asarray(apply(variables, bundle['x']))
  err = relative_error(out, bundle['logits'])
  assert err <= 1e-4, err
  # The padding matters: the default (PyTorch) model is off by far more.
  torch_pad = np.asarray(compiled_apply(NAME)(variables, bundle['x']))
  assert relative_error(torch_pad, bundle['logits']) > 1e-3

  # The registered source, served locally: index and data shard downloaded.
  index = open(bundle['prefix'] + '.index', 'rb').read()
  data = open(bundle['prefix'] + '.data-00000-of-00001', 'rb').read()
  for var in ('http_proxy', 'HTTP_PROXY'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
  server = WeightsServer()
  try:
    base = '/ghostnet_tensorflow/models/ghostnet_checkpoint'
    server.files[base + '.index'] = index
    server.files[base + '.data-00000-of-00001'] = data
    local = dataclasses.replace(src, url=server.url(base + '.index'),
                                sha256=hashlib.sha256(index).hexdigest())
    monkeypatch.setattr(sources, '_SOURCES', tuple(
        local if s is src else s for s in sources._SOURCES))  # pylint: disable=protected-access
    served = ghostnet_jax.load_pretrained(NAME, 'tf', cache_dir=cache)
    assert sorted(p for p, _ in server.log) == [
        base + '.data-00000-of-00001', base + '.index']
  finally:
    server.close()
  assert (cache / 'downloads' / NAME / 'ghostnet_checkpoint.index').is_file()
  assert (cache / 'downloads' / NAME /
          'ghostnet_checkpoint.data-00000-of-00001').is_file()
  err = relative_error(np.asarray(apply(served, bundle['x'])),
                       bundle['logits'])
  assert err <= 1e-4, err


def test_bad_tf_bundles_get_clear_errors(bundle, tmp_path, monkeypatch):
  tf = _tf()
  cache = tmp_path / 'cache'
  # Another model's bundle.
  other = str(tmp_path / 'resnet')
  tf.raw_ops.SaveV2(prefix=other, tensor_names=['resnet/conv1/kernel'],
                    shape_and_slices=[''],
                    tensors=[tf.zeros((3, 3, 3, 8))])
  with pytest.raises(convert.CheckpointError,
                     match=r'resnet\.index.*resnet/conv1/kernel.*not that'):
    ghostnet_jax.load_pretrained(NAME, other + '.index', cache_dir=cache)
  # Missing variables: named in TF's terms.
  weights = dict(bundle['weights'])
  del weights[SCOPE + 'Conv2d_5_se/fc2/b']
  del weights[SCOPE + 'Conv2d_4_depthwise/output/variance/EMA']
  short = str(tmp_path / 'short')
  _save_bundle(short, weights)
  with pytest.raises(convert.CheckpointError, match=(
      r"short\.index: 2 variables are missing: \['MobileNetV2/Conv2d_4_"
      r"depthwise/output/variance/EMA', 'MobileNetV2/Conv2d_5_se/fc2/b'\]")):
    ghostnet_jax.load_pretrained(NAME, short, cache_dir=cache)
  # The data shard is not there.
  os.remove(short + '.data-00000-of-00001')
  with pytest.raises(weight_readers.WeightFileError,
                     match=r'missing data file .*short\.data-00000-of-00001'):
    weight_readers.read_tf_checkpoint(short + '.index')
  # No TensorFlow: the error names the extra.
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with pytest.raises(weight_readers.WeightFileError,
                     match=r'needs TensorFlow.*ghostnet-jax\[export\]'):
    weight_readers.read_tf_checkpoint(bundle['prefix'])
