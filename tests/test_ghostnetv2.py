"""GhostNetV2: DFC attention pieces, sizes, and parity with timm.

Parity tests randomise every weight and every BatchNorm statistic of timm's
model, save the state_dict to a real ``.pth`` file, load it with the
converter and compare logits. Whole models run with ``conv_impl='lax'``: on
the CPU it compiles about twice as fast as the XLA lowering (the lowerings
agree to rounding; ``tests/test_ops.py`` checks them).
"""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ghostnet_jax as gj
from ghostnet_jax import convert
from ghostnet_jax.ghostnet import GHOSTNET_BLOCKS
from ghostnet_jax.ghostnetv2 import (DFCAttention, GhostModuleV2,
                                     avg_pool_2x2, nearest_upsample,
                                     torch_nearest_indices)
from ghostnet_jax.macs import _trace
from ghostnet_jax.utils import abstract_variables
from ghostnet_jax.testing.torch_reference import compiled_apply, nchw, nhwc, randomize_torch_model, relative_error

WIDTHS = {'ghostnetv2_100': 1.0, 'ghostnetv2_130': 1.3, 'ghostnetv2_160': 1.6}
PARAMS = {'ghostnetv2_100': 6_156_908, 'ghostnetv2_130': 8_960_404,
          'ghostnetv2_160': 12_392_698}
MMACS = {'ghostnetv2_100': 167.0, 'ghostnetv2_130': 269.3,
         'ghostnetv2_160': 398.6}
TOL = 1e-4


def _images(size, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(
      np.float32)


@pytest.fixture(scope='module')
def converted(timm, tmp_path_factory):
  """``name -> (timm model in eval mode, variables loaded from a .pth)``."""
  cache = {}

  def get(name):
    if name not in cache:
      model = timm.create_model(name, pretrained=False).eval()
      randomize_torch_model(model, seed=len(cache) + 1)
      path = tmp_path_factory.mktemp('v2') / f'{name}.pth'
      torch.save(model.state_dict(), path)
      cache[name] = model, convert.load_torch_checkpoint(path, name)
    return cache[name]

  return get


# ------------------------------------------------------------ DFC pieces


@pytest.mark.parametrize('in_size,out_size', [
    (3, 7), (7, 3), (2, 5), (4, 9), (6, 13), (12, 25), (24, 49), (5, 11),
    (28, 56), (1, 4), (7, 7), (9, 4), (10, 3)])
def test_nearest_indices_match_torch(in_size, out_size):
  x = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
  ref = F.interpolate(x, size=(out_size, 1), mode='nearest')
  np.testing.assert_array_equal(torch_nearest_indices(in_size, out_size),
                                ref[0, 0, :, 0].numpy().astype(np.int32))


def test_nearest_is_floor_rule_not_half_pixel():
  # 7 -> 3 (floor pool) -> 7: the case where the two rules differ.
  np.testing.assert_array_equal(torch_nearest_indices(3, 7),
                                [0, 0, 0, 1, 1, 2, 2])
  x = jnp.arange(3.0).reshape(1, 3, 1, 1)
  up = np.asarray(nearest_upsample(x, (7, 1)))[0, :, 0, 0]
  half_pixel = F.interpolate(torch.arange(3.0).reshape(1, 1, 3, 1),
                             size=(7, 1), mode='nearest-exact')
  assert list(half_pixel[0, 0, :, 0].numpy()) == [0, 0, 1, 1, 1, 2, 2]
  assert not np.array_equal(up, half_pixel[0, 0, :, 0].numpy())
  assert not np.array_equal(
      up, np.asarray(jax.image.resize(x, (1, 7, 1, 1), 'nearest'))[0, :, 0, 0])


@pytest.mark.parametrize('shape,size', [
    ((2, 3, 3, 4), (7, 7)), ((1, 3, 5, 2), (7, 11)), ((2, 6, 4, 3), (13, 9)),
    ((1, 28, 28, 2), (56, 56))])
def test_nearest_upsample_matches_torch(shape, size, rng):
  x = rng.randn(*shape).astype(np.float32)
  ref = F.interpolate(nchw(x), size=size, mode='nearest')
  np.testing.assert_array_equal(np.asarray(nearest_upsample(x, size)),
                                nhwc(ref))


@pytest.mark.parametrize('hw', [(7, 7), (8, 8), (13, 6), (2, 3)])
def test_avg_pool_floor_mode_matches_torch(hw, rng):
  x = rng.randn(2, *hw, 3).astype(np.float32)
  ref = F.avg_pool2d(nchw(x), kernel_size=2, stride=2)
  np.testing.assert_allclose(np.asarray(avg_pool_2x2(x)), nhwc(ref),
                             rtol=1e-6, atol=1e-6)


def test_dfc_attention_rejects_maps_below_2x2():
  x = jnp.zeros((1, 1, 5, 8))
  with pytest.raises(ValueError, match='at least 2x2'):
    DFCAttention(8).init(jax.random.key(0), x)


def test_small_image_error_names_minimum():
  model = gj.create_model('ghostnetv2_100')
  with pytest.raises(ValueError, match='33x33'):
    abstract_variables(model, image_size=32)


def _copy_torch_module(torch_module, flax_vars_shape):
  """Flax variables of a module from its torch state_dict (converter rule)."""
  sd = convert.clean_state_dict(torch_module.state_dict())
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in convert._flatten(flax_vars_shape.get(collection, {})
                                       ).items():
      key = convert.flax_to_torch_key(collection, path)
      flat[(collection,) + path] = jnp.asarray(
          convert.torch_to_flax_array(sd[key], len(leaf.shape)))
  assert len(flat) == len(sd), 'every torch tensor must be used'
  return convert._unflatten(flat)


@pytest.mark.parametrize('hw', [(7, 7), (9, 12), (14, 14)])
def test_ghost_module_v2_matches_timm(timm, hw, rng):
  from timm.models.ghostnet import GhostModuleV2 as TimmGhostModuleV2
  tmod = TimmGhostModuleV2(12, 20).eval()
  randomize_torch_model(tmod, seed=3)
  x = rng.randn(2, *hw, 12).astype(np.float32)
  module = GhostModuleV2(20)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  variables = _copy_torch_module(tmod, shapes)
  assert sorted(variables['params']) == [
      'cheap_operation_0', 'cheap_operation_1', 'primary_conv_0',
      'primary_conv_1', 'short_conv_0', 'short_conv_1', 'short_conv_2',
      'short_conv_3', 'short_conv_4', 'short_conv_5']
  with torch.no_grad():
    ref = nhwc(tmod(nchw(x)))
  out = module.apply(variables, x)
  chex.assert_shape(out, (2, *hw, 20))
  assert relative_error(out, ref) < 1e-5


# ---------------------------------------------------------- sizes and MACs


def _dfc_macs(width, image_size):
  """MACs of the three short_conv convolutions, from the block table."""
  md = gj.make_divisible
  res = (image_size - 1) // 2 + 1
  cin = md(16 * width)
  total, layer_id = 0, 0
  for stage in GHOSTNET_BLOCKS:
    for _, exp, c, _, s in stage:
      mid = md(exp * width)
      if layer_id >= 2:
        pooled = (res // 2) ** 2
        total += pooled * mid * (cin + 5 + 5)
      res = (res - 1) // s + 1
      cin = md(c * width)
      layer_id += 1
  return total


@pytest.mark.parametrize('name', list(PARAMS))
def test_params_and_macs_exact(name):
  """One abstract trace gives the variables and every conv's MACs."""
  layers, _, variables = _trace(gj.create_model(name), 224)
  assert gj.count_params(variables['params']) == PARAMS[name]
  macs = sum(r.macs for r in layers)
  assert round(macs / 1e6, 1) == MMACS[name]
  # The DFC convolutions are counted (at half resolution): v2 is v1 plus
  # exactly the three short_conv convolutions of every attention block.
  by_layer = {}
  for r in layers:
    if r.path[-1].startswith('short_conv'):
      by_layer[r.path[-1]] = by_layer.get(r.path[-1], 0) + r.macs
  assert set(by_layer) == {'short_conv_0', 'short_conv_2', 'short_conv_4'}
  assert by_layer['short_conv_2'] == by_layer['short_conv_4'] > 0
  assert sum(by_layer.values()) == _dfc_macs(WIDTHS[name], 224)
  if name == 'ghostnetv2_100':
    assert macs - gj.count_macs('ghostnet_100') == _dfc_macs(1.0, 224)


def test_registry_entries():
  assert gj.list_models('ghostnetv2_*') == sorted(PARAMS)
  from ghostnet_jax.registry import get_entry
  for name, top1, weights in [
      ('ghostnetv2_100', 75.3, 'ck_ghostnetv2_10.pth.tar'),
      ('ghostnetv2_130', 76.9, 'ck_ghostnetv2_13.pth.tar'),
      ('ghostnetv2_160', 77.8, 'ck_ghostnetv2_16.pth.tar')]:
    entry = get_entry(name)
    assert (entry.paper_top1, entry.weights) == (top1, weights)
    assert entry.default_preprocess == 'official'
    assert gj.get_eval_config(name).interpolation == 'bilinear'
  with pytest.raises(TypeError, match='deploy'):
    gj.create_model('ghostnetv2_100', deploy=True)


# ------------------------------------------------------------- parity


@pytest.mark.parametrize('size', [224, 193])
def test_eval_logits_match_timm(converted, size):
  tmodel, variables = converted('ghostnetv2_100')
  x = _images(size)
  with torch.no_grad():
    ref = tmodel(nchw(x)).numpy()
  out = np.asarray(compiled_apply('ghostnetv2_100', conv_impl='lax')(variables, x))
  chex.assert_shape(out, (2, 1000))
  err = relative_error(out, ref)
  print(f'ghostnetv2_100 eval @{size}: max rel diff {err:.2e}')
  assert err <= TOL


def test_train_mode_matches_timm(converted):
  """Batch statistics: logits and the updated running statistics."""
  name = 'ghostnetv2_100'
  tmodel, variables = converted(name)
  tmodel = copy.deepcopy(tmodel).train()
  tmodel.drop_rate = 0.0
  x = _images(97, batch=4, seed=1)
  with torch.no_grad():
    ref = tmodel(nchw(x)).numpy()
  out, state = compiled_apply(name, train=True, conv_impl='lax')(variables, x)
  err = relative_error(out, ref)
  print(f'{name} train mode @97: max rel diff {err:.2e}')
  assert err <= TOL
  new = convert.to_torch_state_dict(
      {'params': variables['params'], 'batch_stats': state['batch_stats']})
  tsd = tmodel.state_dict()
  for key in ('bn1.running_var', 'blocks.8.3.ghost1.short_conv.5.running_mean',
              'blocks.8.3.ghost1.short_conv.5.running_var',
              'blocks.3.0.ghost1.short_conv.3.running_var',
              'blocks.9.0.bn1.running_mean'):
    assert relative_error(new[key].numpy(), tsd[key].numpy()) < 1e-4, key


def test_flax_to_torch_round_trip(timm, converted):
  name = 'ghostnetv2_100'
  tmodel, variables = converted(name)
  sd = convert.to_torch_state_dict(variables, name)
  assert any('.short_conv.4.weight' in k for k in sd)
  fresh = timm.create_model(name).eval()
  fresh.load_state_dict(sd, strict=True)
  x = _images(224)
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(nchw(x)).numpy(),
                                  tmodel(nchw(x)).numpy())


def test_thop_keys_are_dropped(converted):
  """The released v2 files carry thop ``total_ops``/``total_params``."""
  name = 'ghostnetv2_100'
  tmodel, variables = converted(name)
  sd = dict(tmodel.state_dict())
  for module_name, _ in tmodel.named_modules():
    prefix = f'{module_name}.' if module_name else ''
    sd[prefix + 'total_ops'] = torch.zeros(1, dtype=torch.float64)
    sd[prefix + 'total_params'] = torch.zeros(1, dtype=torch.float64)
  loaded = convert.load_torch_checkpoint(sd, name)
  chex.assert_trees_all_equal(loaded, variables)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ghostnetv2_130', 'ghostnetv2_160'])
def test_eval_logits_match_timm_wider(converted, name):
  tmodel, variables = converted(name)
  x = _images(129)
  with torch.no_grad():
    ref = tmodel(nchw(x)).numpy()
  out = np.asarray(compiled_apply(name, conv_impl='lax')(variables, x))
  err = relative_error(out, ref)
  print(f'{name} eval @129: max rel diff {err:.2e}')
  assert err <= TOL
