"""G-Ghost RegNetX and the GGhostStage wrapper.

The PyTorch side is ``ghostnet_jax/testing/g_ghost_reference.py``, an independent
implementation with the official module names. Parity tests randomise every
weight and every BatchNorm statistic of it, save the state_dict to a real
``.pth`` file and load that with the generic converter.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ghostnet_jax.testing import g_ghost_reference as R
import ghostnet_jax as gj
from ghostnet_jax import convert, g_ghost, registry
from ghostnet_jax.layers import BatchNorm, Conv2d
from ghostnet_jax.utils import abstract_variables
from ghostnet_jax.testing.torch_reference import (nchw, nhwc, random_flax_variables,
                             randomize_torch_model, relative_error)

MODELS = list(R.CONFIGS)

# Exact parameter counts (1000 classes) of the official definitions.
PARAMS = {
    'g_ghost_regnetx_002': 1_825_440,
    'g_ghost_regnetx_004': 2_884_456,
    'g_ghost_regnetx_006': 4_029_776,
    'g_ghost_regnetx_008': 5_248_328,
    'g_ghost_regnetx_016': 7_109_660,
    'g_ghost_regnetx_032': 10_511_000,
    'g_ghost_regnetx_040': 15_726_268,
    'g_ghost_regnetx_064': 17_993_748,
    'g_ghost_regnetx_080': 24_586_928,
    'g_ghost_regnetx_120': 30_627_208,
    'g_ghost_regnetx_160': 32_381_704,
    'g_ghost_regnetx_320': 62_815_448,
}
# GMACs at 224 as printed in the reference table.
GMACS = {
    'g_ghost_regnetx_002': 0.13, 'g_ghost_regnetx_004': 0.22,
    'g_ghost_regnetx_006': 0.39, 'g_ghost_regnetx_008': 0.53,
    'g_ghost_regnetx_016': 1.02, 'g_ghost_regnetx_032': 1.80,
    'g_ghost_regnetx_040': 2.23, 'g_ghost_regnetx_064': 4.06,
    'g_ghost_regnetx_080': 4.15, 'g_ghost_regnetx_120': 7.38,
    'g_ghost_regnetx_160': 9.00, 'g_ghost_regnetx_320': 17.16,
}
RELEASED = {
    'g_ghost_regnetx_032': (77.8, 'g_ghost_regnet_3.2g_77.8.pth'),
    'g_ghost_regnetx_040': (78.6, 'g_ghost_regnet_4.0g_78.6.pth'),
    'g_ghost_regnetx_080': (79.0, 'g_ghost_regnet_8.0g_79.0.pth'),
    'g_ghost_regnetx_160': (79.9, 'g_ghost_regnet_16.0g_79.9.pth'),
}
FEATURES = ('stride_2', 'stride_4', 'stride_8', 'stride_16', 'stride_32',
            'pre_logits', 'logits')
TOL = 1e-4


def _oihw(shape):
  """A Flax kernel shape in PyTorch's layout (HWIO -> OIHW, (in, out) ->
  (out, in))."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


def _torch_layout(name):
  with torch.device('meta'):
    ref = R.build(name)
  return {k: tuple(v.shape) for k, v in ref.state_dict().items()
          if not k.endswith('num_batches_tracked')}, ref


# ----------------------------------------------------------- sizes, layout


@pytest.mark.parametrize('name', MODELS)
def test_params_macs_and_keys(name):
  layout = convert.torch_layout(name)  # {torch key: (collection, path, shape)}
  assert sum(int(np.prod(shape)) for collection, _, shape in layout.values()
             if collection == 'params') == PARAMS[name]
  assert round(gj.count_macs(name) / 1e9, 2) == GMACS[name]

  torch_shapes, ref = _torch_layout(name)
  assert sum(p.numel() for p in ref.parameters()) == PARAMS[name]
  # Every Flax variable maps by the converter's generic rule onto exactly
  # the reference's (= the official) state_dict keys and shapes.
  assert set(layout) == set(torch_shapes)
  for key, (_, _, flax_shape) in layout.items():
    assert _oihw(flax_shape) == torch_shapes[key], key


def test_official_shapes_of_3_2gf():
  layout = convert.torch_layout('g_ghost_regnetx_032')
  shapes = {k: _oihw(v[2]) for k, v in layout.items()}
  assert len(shapes) == 432  # 518 tensors less 86 num_batches_tracked.
  assert shapes['layer2.merge.1.weight'] == (120, 480, 1, 1)
  assert shapes['layer2.cheap.0.weight'] == (120, 120, 1, 1)
  assert shapes['layer2.layers.0.conv2.weight'] == (72, 36, 3, 3)
  assert shapes['layer3.merge.1.weight'] == (216, 3240, 1, 1)
  assert shapes['layer4.0.conv2.weight'] == (1008, 48, 3, 3)
  assert shapes['fc.weight'] == (1000, 1008)
  assert shapes['layer2.base.downsample.0.weight'] == (192, 96, 1, 1)
  assert 'layer2.layers.0.downsample.0.weight' not in shapes
  assert sorted(k for k in shapes if k.startswith('layer3.merge.')) == [
      'layer3.merge.1.weight', 'layer3.merge.2.bias',
      'layer3.merge.2.running_mean', 'layer3.merge.2.running_var',
      'layer3.merge.2.weight', 'layer3.merge.4.weight', 'layer3.merge.5.bias',
      'layer3.merge.5.running_mean', 'layer3.merge.5.running_var',
      'layer3.merge.5.weight']


@pytest.mark.parametrize('name,stages', [
    ('g_ghost_regnetx_002', ((3, 72, 80, 6, 296), (4, 180, 188, 6, 1268))),
    ('g_ghost_regnetx_006', ((2, 36, 60, 18, 132), (3, 108, 132, 18, 564),
                             (4, 252, 276, 18, 1788))),
    ('g_ghost_regnetx_080', ((2, 90, 150, 90, 510),
                             (3, 360, 360, 90, 5400))),
    ('g_ghost_regnetx_320', ((2, 252, 420, 126, 1932),
                             (3, 630, 714, 126, 8274))),
])
def test_ghost_stage_widths(name, stages):
  """(raw, cheap, inner group width, merge input) per G-Ghost stage, as in
  the reference table."""
  layout = convert.torch_layout(name)
  shape = lambda key: _oihw(layout[key][2])
  ghost = sorted({k.split('.')[0] for k in layout if '.merge.' in k})
  assert ghost == [f'layer{s[0]}' for s in stages]
  for stage, raw, cheap, inner_gw, merge_in in stages:
    assert shape(f'layer{stage}.merge.1.weight')[:2] == (cheap, merge_in)
    assert shape(f'layer{stage}.cheap.0.weight')[:2] == (cheap, cheap)
    assert shape(f'layer{stage}.layers.0.conv2.weight')[:2] == (raw, inner_gw)


def test_registry():
  assert gj.list_models('g_ghost*') == MODELS
  for name in MODELS:
    entry = registry.get_entry(name)
    assert entry.family == 'g_ghost'
    top1, weights = RELEASED.get(name, (None, None))
    assert (entry.paper_top1, entry.weights) == (top1, weights)
    cfg = gj.get_eval_config(name)
    assert (cfg.input_size, round(cfg.input_size / cfg.crop_fraction),
            cfg.interpolation) == (224, 256, 'bilinear')


# ----------------------------------------------------------------- parity


@functools.lru_cache(maxsize=None)
def _jitted(name, **kwargs):
  """jit of apply returning (logits, sown features); cached per model."""
  model = gj.create_model(name, **kwargs)

  @jax.jit
  def run(variables, x):
    logits, state = model.apply(variables, x, mutable=['intermediates'])
    return logits, state['intermediates']

  return run


def _torch_forward(ref, x):
  """Logits and the same named features as the Flax model, via hooks."""
  feats = {}

  def keep(key):
    return lambda module, inputs, output=None: feats.__setitem__(
        key, inputs[0] if output is None else output)

  hooks = [ref.layer1.register_forward_pre_hook(keep('stride_2')),
           ref.fc.register_forward_pre_hook(keep('pre_logits'))]
  for i in range(1, 5):
    hooks.append(getattr(ref, f'layer{i}').register_forward_hook(
        keep(f'stride_{2 ** (i + 1)}')))
  try:
    feats['logits'] = ref(nchw(x))
  finally:
    for h in hooks:
      h.remove()
  return {k: nhwc(v) for k, v in feats.items()}


def _assert_features_close(flax_feats, torch_feats, tol=TOL):
  """Compares stage by stage; the message names the first stage that
  diverges."""
  errors = {}
  for key in FEATURES:
    a, b = np.asarray(flax_feats[key]), torch_feats[key]
    assert a.shape == b.shape, (key, a.shape, b.shape)
    errors[key] = relative_error(a, b)
  bad = [k for k in FEATURES if not errors[k] <= tol]
  assert not bad, (f'first divergence at {bad[0]}; max|diff|/max|ref| per '
                   f'stage: {errors}')
  return errors


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """name -> (randomised torch reference, variables loaded from its file)."""
  cache = {}

  def get(name):
    if name not in cache:
      ref = R.build(name)
      randomize_torch_model(ref, seed=MODELS.index(name))
      ref.eval()
      path = tmp_path_factory.mktemp('ckpt') / f'{name}.pth'
      torch.save(ref.state_dict(), path)
      cache[name] = ref, convert.load_torch_checkpoint(path, name)
    return cache[name]

  return get


def _parity(converted, name, size, batch):
  ref, variables = converted(name)
  x = np.random.RandomState(size).randn(batch, size, size, 3).astype(
      np.float32)
  logits, feats = _jitted(name)(variables, x)
  feats = dict(feats, logits=logits)
  with torch.no_grad():
    expected = _torch_forward(ref, x)
  errors = _assert_features_close(feats, expected)
  print(f'{name} @{size}: logits max rel diff {errors["logits"]:.2e}')


@pytest.mark.parametrize('name,size,batch', [
    ('g_ghost_regnetx_002', 224, 1),
    ('g_ghost_regnetx_002', 193, 2),
    ('g_ghost_regnetx_032', 224, 1),
    ('g_ghost_regnetx_032', 193, 2),
])
def test_eval_parity(converted, name, size, batch):
  _parity(converted, name, size, batch)


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    'g_ghost_regnetx_004',  # 12-block G-Ghost layer4.
    'g_ghost_regnetx_080',  # released; ungrouped intrinsic blocks (raw == gw').
])
def test_eval_parity_more_variants(converted, name):
  _parity(converted, name, 65, 1)


def test_train_mode_parity():
  """Batch statistics in the forward pass and the running-stat updates.

  Batch 8: BN over few values amplifies rounding differences stage by stage
  (with batch 4, 2x2 maps at stride 32 are normalised over 16 values and the
  two frameworks' rounding grows to ~1e-4 at pre_logits; with 8, ~4e-5).
  """
  name = 'g_ghost_regnetx_006'  # G-Ghost stages 2, 3 and 4.
  ref = R.build(name, drop_rate=0.0)
  randomize_torch_model(ref, seed=7)
  variables = convert.load_torch_checkpoint(ref.state_dict(), name)
  ref.train()
  x = np.random.RandomState(1).randn(8, 64, 64, 3).astype(np.float32)
  with torch.no_grad():
    expected = _torch_forward(ref, x)
  updated = convert.load_torch_checkpoint(ref.state_dict(), name)

  model = gj.create_model(name, dropout=0.0)
  run = jax.jit(functools.partial(
      model.apply, train=True, mutable=['intermediates', 'batch_stats']))
  logits, state = run(variables, x)
  _assert_features_close(dict(state['intermediates'], logits=logits),
                         expected)

  stats = jax.tree_util.tree_leaves_with_path(state['batch_stats'])
  want = dict(jax.tree_util.tree_leaves_with_path(updated['batch_stats']))
  before = dict(jax.tree_util.tree_leaves_with_path(variables['batch_stats']))
  n_bn = sum(k.endswith('running_var') for k in ref.state_dict())
  assert len(stats) == len(want) == 2 * n_bn
  for path, value in stats:
    chex.assert_trees_all_close(value, want[path], rtol=1e-4, atol=1e-5)
    assert not np.allclose(value, before[path]), path


def test_round_trip_to_torch(converted):
  """Loaded variables -> to_torch_state_dict -> the same tensors, strictly
  loadable into the reference."""
  name = 'g_ghost_regnetx_032'
  ref, variables = converted(name)
  sd = convert.to_torch_state_dict(variables, name)
  fresh = R.build(name)
  fresh.load_state_dict(sd, strict=True)
  original = ref.state_dict()
  assert set(sd) == set(original)
  for key, value in fresh.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(value, original[key]), key


# A small G-Ghost RegNetX: plain stage 1, G-Ghost stages 2-4 (stage 2 with a
# single intrinsic block), a 256-wide stage 4 for init statistics.
SMALL = dict(depths=(1, 3, 4, 3), widths=(16, 32, 48, 256), group_width=8)


def test_he_fan_out_init():
  """Convolutions use kaiming_normal(fan_out, relu) like the official code."""
  model = g_ghost.GGhostRegNet(**SMALL)
  conv, _ = model.layer_factories()
  for kernel_size, groups in ((1, 1), (3, 32)):
    layer = conv(256, kernel_size, groups=groups)
    x = jnp.zeros((1, 4, 4, 256))
    k = jax.jit(layer.init)(jax.random.key(0), x)['params']['kernel']
    np.testing.assert_allclose(np.std(k), np.sqrt(2 / (256 * kernel_size ** 2)),
                               rtol=0.05)


def test_round_trip_from_flax():
  """Flax variables -> to_torch_state_dict -> strict load -> same outputs."""
  model = g_ghost.GGhostRegNet(**SMALL, num_classes=10)
  x = np.random.RandomState(0).randn(2, 33, 33, 3).astype(np.float32)
  variables = random_flax_variables(model, x[:1], seed=1)
  ref = R.GGhostRegNetRef(**SMALL, num_classes=10)
  ref.load_state_dict(convert.to_torch_state_dict(variables), strict=True)
  ref.eval()
  logits, state = jax.jit(functools.partial(
      model.apply, mutable=['intermediates']))(variables, x)
  with torch.no_grad():
    expected = _torch_forward(ref, x)
  _assert_features_close(dict(state['intermediates'], logits=logits),
                         expected)


# ------------------------------------------------------ shapes and errors


@pytest.mark.parametrize('size', [1, 33, 193])
def test_feature_shapes(size):
  model = gj.create_model('g_ghost_regnetx_002')
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = abstract_variables(model, image_size=32)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, x)
  feats = state['intermediates']
  assert logits.shape == (2, 1000)
  for stride, c in zip((2, 4, 8, 16, 32), (32, 24, 56, 152, 368)):
    s = -(-size // stride)
    assert feats[f'stride_{stride}'].shape == (2, s, s, c), stride
  assert feats['pre_logits'].shape == (2, 368)


def test_bad_inputs():
  model = gj.create_model('g_ghost_regnetx_002')
  variables = abstract_variables(model, image_size=32)
  with pytest.raises(ValueError, match='NCHW'):
    model.apply(variables, jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match='float'):
    model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match='at least 2 images per BatchNorm'):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=True,
                mutable=['batch_stats'])
  with pytest.raises(ValueError, match='at least 2 images per BatchNorm'):
    gj.create_model('g_ghost_regnetx_002', bn_batch_groups=2).apply(
        variables, jnp.zeros((2, 32, 32, 3)), train=True,
        mutable=['batch_stats'])
  bad = g_ghost.GGhostRegNet(depths=(1, 1, 4), widths=(8, 8, 8), group_width=8)
  with pytest.raises(ValueError, match='4 depths'):
    bad.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  bad = g_ghost.GGhostRegNet(depths=(1, 1, 4, 1), widths=(8, 16, 16, 16),
                             group_width=1)
  with pytest.raises(ValueError, match='inner group width'):
    bad.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_bfloat16_stage():
  """A RegNetX G-Ghost stage computing in bfloat16 follows float32."""

  def stage(dtype):
    conv = functools.partial(Conv2d, dtype=dtype)
    norm = functools.partial(BatchNorm, dtype=dtype)
    block = functools.partial(g_ghost.Bottleneck, group_width=8, conv=conv,
                              norm=norm)
    return gj.GGhostStage(block=block, features=48, num_blocks=4,
                          raw_divisor=8, conv=conv, norm=norm)

  x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 24), jnp.float32)
  variables = random_flax_variables(stage(jnp.float32), x)
  y32 = jax.jit(stage(jnp.float32).apply)(variables, x)
  y16 = jax.jit(stage(jnp.bfloat16).apply)(variables, x)
  assert y16.dtype == jnp.bfloat16
  assert relative_error(y16.astype(jnp.float32), y32) < 0.05


# -------------------------------------------------- the reusable wrapper


class ToyBlock(nn.Module):
  """A user block with its own field names and no ``train`` argument."""
  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.channels, (3, 3), strides=self.stride, padding=1,
                name='conv')(x)
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), strides=self.stride, name='proj')(x)
    return nn.relu(y + x)


def _toy_factory(features, strides, name):
  return ToyBlock(channels=features, stride=strides, name=name)


def _toy_stage(**kwargs):
  kwargs = dict(dict(block=_toy_factory, features=20, num_blocks=5, strides=2,
                     cheap_ratio=0.6, raw_divisor=4, block_train_arg=None),
                **kwargs)
  return gj.GGhostStage(**kwargs)


def test_wrapper_structure_and_shapes():
  stage = _toy_stage()
  assert (stage.raw_features, stage.cheap_features) == (8, 12)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 15, 15, 6), jnp.float32)
  shapes = jax.eval_shape(stage.init, jax.random.key(0), x)
  p = jax.tree_util.tree_map(lambda v: v.shape, shapes['params'])
  assert p == {
      'base': {'conv': {'kernel': (3, 3, 6, 20), 'bias': (20,)},
               'proj': {'kernel': (1, 1, 6, 20), 'bias': (20,)}},
      # raw -> raw at stride 1: the toy block adds no projection.
      'layers_0': {'conv': {'kernel': (3, 3, 8, 8), 'bias': (8,)}},
      'layers_1': {'conv': {'kernel': (3, 3, 8, 8), 'bias': (8,)}},
      'layers_2': {'conv': {'kernel': (3, 3, 8, 8), 'bias': (8,)}},
      'end': {'conv': {'kernel': (3, 3, 20, 20), 'bias': (20,)}},
      'merge_1': {'kernel': (1, 1, 20 + 3 * 8, 12)},
      'merge_2': {'scale': (12,), 'bias': (12,)},
      'merge_4': {'kernel': (1, 1, 12, 12)},
      'merge_5': {'scale': (12,), 'bias': (12,)},
      'cheap_0': {'kernel': (1, 1, 12, 12)},
      'cheap_1': {'scale': (12,), 'bias': (12,)},
  }
  assert set(shapes['batch_stats']) == {'merge_2', 'merge_5', 'cheap_1'}

  variables = random_flax_variables(stage, x)
  y, state = jax.jit(functools.partial(
      stage.apply, train=True, mutable=['batch_stats']))(variables, x)
  chex.assert_shape(y, (2, 8, 8, 20))
  chex.assert_tree_all_finite(y)
  # Training updates the stage's own BatchNorm statistics.
  for bn in ('merge_2', 'merge_5', 'cheap_1'):
    assert not np.allclose(state['batch_stats'][bn]['mean'],
                           variables['batch_stats'][bn]['mean']), bn


def test_wrapper_computes_the_g_ghost_formula():
  """The stage output recomputed by hand from its parts' parameters."""
  stage = _toy_stage()
  x = jnp.asarray(np.random.RandomState(1).randn(2, 15, 15, 6), jnp.float32)
  variables = random_flax_variables(stage, x, seed=2)

  @jax.jit
  def by_hand(variables, x):
    p, stats = variables['params'], variables['batch_stats']

    def block(name, c, s, v):
      return ToyBlock(c, s).apply({'params': p[name]}, v)

    def conv_bn(conv, bn, v):
      v = Conv2d(12, 1).apply({'params': p[conv]}, v)
      return BatchNorm().apply({'params': p[bn], 'batch_stats': stats[bn]}, v)

    x0 = block('base', 20, 2, x)
    e, pooled = x0[..., :8], [x0.mean((1, 2), keepdims=True)]
    for i in range(3):
      e = block(f'layers_{i}', 8, 1, e)
      pooled.append(e.mean((1, 2), keepdims=True))
    m = conv_bn('merge_1', 'merge_2', jnp.concatenate(pooled, -1))
    m = conv_bn('merge_4', 'merge_5', jax.nn.relu(m))
    c = jax.nn.relu(conv_bn('cheap_0', 'cheap_1', x0[..., 8:]) + m)
    return block('end', 20, 1, jnp.concatenate([e, c], -1))

  got = jax.jit(stage.apply)(variables, x)
  chex.assert_trees_all_close(got, by_hand(variables, x), rtol=1e-5,
                              atol=1e-5)


def test_wrapper_errors():
  x = jnp.zeros((1, 8, 8, 4))
  def _init_shapes(stage):
    return jax.eval_shape(stage.init, jax.random.key(0), x)

  with pytest.raises(ValueError, match='num_blocks must be >= 2'):
    _init_shapes(_toy_stage(num_blocks=1))
  with pytest.raises(ValueError, match='cheap_ratio'):
    _init_shapes(_toy_stage(cheap_ratio=1.0))
  with pytest.raises(ValueError, match='intrinsic'):
    _init_shapes(_toy_stage(features=6, raw_divisor=8))

  def wrong_width(features, strides, name):
    return ToyBlock(channels=features + 1, stride=strides, name=name)

  with pytest.raises(ValueError, match='base block must return'):
    _init_shapes(_toy_stage(block=wrong_width))
  with pytest.raises(ValueError, match='at least 2 images'):
    jax.eval_shape(functools.partial(_toy_stage().apply, train=True,
                                     mutable=['batch_stats']),
                   _init_shapes(_toy_stage()), x)
  # A block without a `train` argument needs block_train_arg=None.
  with pytest.raises(TypeError, match='train'):
    _init_shapes(_toy_stage(block_train_arg='train'))
