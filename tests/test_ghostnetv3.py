"""GhostNetV3: training and deploy forms, exact fusion, checkpoints, parity.

PyTorch reference: timm's ``ghostnetv3_*`` (training form) and the same model
after its ``convert_to_deploy()`` (deploy form). Every weight and BatchNorm
statistic is random (see :func:`condition_torch_model` for why the statistics
are calibrated before they are perturbed), the state_dicts go through real
``.pth`` files, and logits are compared as max |diff| / max |logit|.
"""

import copy
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ghostnet_jax as gj
from ghostnet_jax import convert
from ghostnet_jax.ghostnetv3 import (GhostModuleV3, _fold,
                                     official_to_timm_key,
                                     timm_to_official_key)
from ghostnet_jax.registry import get_entry
from ghostnet_jax.testing.torch_reference import compiled_apply, nchw, nhwc, randomize_torch_model, relative_error

PARAMS = {  # (training form, deploy form), 1000 classes.
    'ghostnetv3_050': (3_395_384, 2_853_176),
    'ghostnetv3_100': (8_129_028, 6_147_588),
    'ghostnetv3_130': (12_217_720, 8_948_296),
    'ghostnetv3_160': (17_275_700, 12_377_778),
}
TOL = 1e-4        # against timm
FUSION_TOL = 1e-5  # our deploy form against our training form


def condition_torch_model(model, size, seed=0):
  """Random weights and statistics that keep the network well conditioned.

  ``randomize_torch_model`` alone (statistics independent of the data) lets
  the activations of the 3-5 summed branches grow ~10x per block, to 1e13 at
  the last block, where the network is chaotic: timm's own training and
  deploy forms then disagree by 60% at the logits. So: random weights; the
  BN scale/shift of each branch divided by sqrt(branches in its sum);
  running statistics measured on a random batch at the test resolution, then
  perturbed (mean += N(0, 0.1) std, var *= U(0.8, 1.2)).
  """
  randomize_torch_model(model, seed=seed)
  g = torch.Generator().manual_seed(seed)
  groups = {}
  for name, m in model.named_modules():
    hit = re.match(r'(.*)\.(primary_rpr|cheap_rpr|dw_rpr)_', name)
    if hit and isinstance(m, torch.nn.BatchNorm2d):
      groups.setdefault(hit.groups(), []).append(m)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for members in groups.values():
      for m in members:
        m.weight.mul_(len(members) ** -0.5)
        m.bias.mul_(len(members) ** -0.5)
    for m in bns:
      m.reset_running_stats()
      m.momentum = None  # cumulative: the statistics of this one batch
    model.train()
    model(torch.randn(4, 3, size, size, generator=g))
    model.eval()
    for m in bns:
      m.momentum = 0.1
      m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g)
                          * 0.1 * m.running_var.sqrt())
      m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4
                         + 0.8)


def _images(size, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(
      np.float32)


@pytest.fixture(scope='module')
def models(timm, tmp_path_factory):
  """``name -> dict`` of timm's two forms and the variables converted from
  their saved state_dicts (timm key names)."""
  cache = {}

  def get(name, calib_size=224):
    if name not in cache:
      tmodel = timm.create_model(name, pretrained=False)
      condition_torch_model(tmodel, calib_size, seed=len(cache) + 1)
      tdeploy = copy.deepcopy(tmodel)
      tdeploy.convert_to_deploy()
      folder = tmp_path_factory.mktemp('v3')
      torch.save(tmodel.state_dict(), folder / 'train.pth')
      torch.save(tdeploy.state_dict(), folder / 'deploy.pth')
      cache[name] = {
          'timm': tmodel, 'timm_deploy': tdeploy,
          'variables': convert.load_torch_checkpoint(folder / 'train.pth',
                                                     name),
          'deploy_variables': convert.load_torch_checkpoint(
              folder / 'deploy.pth', name, deploy=True),
      }
    return cache[name]

  return get


# ------------------------------------------------------------ key names


def test_timm_key_map():
  pairs = [
      ('blocks.1.0.ghost1.primary_rpr_conv.0.bn1.weight',
       'blocks.1.0.ghost1.primary_rpr_conv.0.bn.weight'),
      ('blocks.6.3.ghost2.cheap_rpr_conv.2.bn1.running_var',
       'blocks.6.3.ghost2.cheap_rpr_conv.2.bn.running_var'),
      ('blocks.3.0.ghost1.cheap_rpr_scale.bn1.bias',
       'blocks.3.0.ghost1.cheap_rpr_scale.bn.bias'),
      ('blocks.7.0.dw_rpr_conv.1.bn1.num_batches_tracked',
       'blocks.7.0.dw_rpr_conv.1.bn.num_batches_tracked'),
      ('blocks.7.0.dw_rpr_scale.bn1.running_mean',
       'blocks.7.0.dw_rpr_scale.bn.running_mean'),
  ]
  for timm_key, official in pairs:
    assert timm_to_official_key(timm_key) == official
    assert official_to_timm_key(official) == timm_key
  for same in ('bn1.weight', 'blocks.9.0.bn1.running_var',
               'blocks.1.0.ghost1.cheap_rpr_skip.weight',
               'blocks.1.0.ghost1.primary_rpr_conv.0.conv.weight',
               'blocks.3.0.ghost1.short_conv.1.weight',
               'blocks.1.0.ghost1.primary_conv.0.bias', 'conv_head.weight'):
    assert timm_to_official_key(same) == same
    assert official_to_timm_key(same) == same
  assert get_entry('ghostnetv3_100').torch_key_map is timm_to_official_key


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize('deploy', [False, True], ids=['train', 'deploy'])
@pytest.mark.parametrize('name', list(PARAMS))
def test_params_exact(name, deploy):
  # The converter's (cached) layout: every variable with its shape.
  layout = convert.torch_layout(name, **({'deploy': True} if deploy else {}))
  params = [(path, shape) for c, path, shape in layout.values()
            if c == 'params']
  assert sum(int(np.prod(shape)) for _, shape in params) == PARAMS[name][deploy]
  has = lambda part: any(part in path for path, _ in params)
  assert has('short_conv_5') and has('conv_head')
  assert has('primary_conv_0') == has('cheap_operation_0') == deploy
  assert has('primary_rpr_conv_2') == has('cheap_rpr_skip') == (not deploy)
  assert has('dw_rpr_scale') == (not deploy)
  assert not has('bn_dw') and not has('primary_rpr_skip')


def test_deploy_macs_equal_v2():
  """The deploy form is GhostNetV2's topology (paper: 0.17 GMACs at 1.0x)."""
  assert round(gj.count_macs('ghostnetv3_100', deploy=True) / 1e6, 1) == 167.0


def test_registry_entries():
  assert gj.list_models('ghostnetv3_*') == sorted(PARAMS)
  expected = {'ghostnetv3_050': (None, None),
              'ghostnetv3_100': (77.1, 'ghostnetv3-1.0.pth.tar'),
              'ghostnetv3_130': (79.1, None), 'ghostnetv3_160': (80.4, None)}
  for name, (top1, weights) in expected.items():
    entry = get_entry(name)
    assert (entry.paper_top1, entry.weights) == (top1, weights)
    assert entry.default_preprocess == 'official'


# ------------------------------------------------------- module level


def _module_variables(torch_module, flax_module, x, key_map=None):
  """Flax variables of a module from its torch state_dict (converter rule)."""
  sd = convert.clean_state_dict(torch_module.state_dict(), key_map)
  shapes = jax.eval_shape(flax_module.init, jax.random.key(0), x)
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in convert._flatten(shapes.get(collection, {})).items():
      key = convert.flax_to_torch_key(collection, path)
      flat[(collection,) + path] = jnp.asarray(
          convert.torch_to_flax_array(sd.pop(key), len(leaf.shape)))
  assert not sd, f'unused torch tensors: {sorted(sd)[:5]}'
  return convert._unflatten(flat)


def condition_torch_model_module(module, input_shape, seed=0):
  """:func:`condition_torch_model` for a module taking ``input_shape``."""
  randomize_torch_model(module, seed=seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.reset_running_stats()
        m.momentum = None
    module.train()
    module(torch.randn(*input_shape,
                       generator=torch.Generator().manual_seed(seed)))
    module.eval()


@pytest.mark.parametrize('mode,relu,hw', [
    ('original', True, (9, 9)), ('original', False, (8, 6)),
    ('shortcut', True, (7, 7)), ('shortcut', True, (10, 13))])
def test_ghost_module_matches_timm_both_forms(timm, mode, relu, hw, rng):
  from timm.models.ghostnet import GhostModuleV3 as TimmGhostModuleV3
  act = torch.nn.ReLU if relu else torch.nn.Identity
  tmod = TimmGhostModuleV3(12, 20, act_layer=act, mode=mode).eval()
  condition_torch_model_module(tmod, (2, 12, *hw))
  x = rng.randn(2, *hw, 12).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(tmod(nchw(x)))
  attention = mode == 'shortcut'
  module = GhostModuleV3(20, relu=relu, attention=attention)
  variables = _module_variables(tmod, module, x, timm_to_official_key)
  out = module.apply(variables, x)
  chex.assert_shape(out, (2, *hw, 20))
  assert relative_error(out, ref) < 1e-5

  tmod.reparameterize()
  with torch.no_grad():
    ref_deploy = nhwc(tmod(nchw(x)))
  deploy = GhostModuleV3(20, relu=relu, attention=attention, deploy=True)
  deploy_vars = _module_variables(tmod, deploy, x)
  assert relative_error(deploy.apply(deploy_vars, x), ref_deploy) < 1e-5
  params, stats = _fold(variables['params'], variables['batch_stats'], 1e-5)
  chex.assert_trees_all_close(params, deploy_vars['params'], rtol=1e-5,
                              atol=1e-6)
  fused = deploy.apply({'params': params, 'batch_stats': stats}, x)
  assert relative_error(fused, out) < FUSION_TOL


def test_fusion_with_primary_identity_branch(rng):
  """The official code adds a BN-only primary branch when input channels
  equal the intrinsic ones (no registered width has one); its fused kernel is
  the 1x1 identity matrix times gamma / std."""
  module = GhostModuleV3(16, relu=True)
  x = rng.randn(2, 6, 7, 8).astype(np.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  assert 'primary_rpr_skip' in shapes['params']
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(
          rng.uniform(0.5, 1.5, leaf.shape) if path[-1].key in ('scale', 'var')
          else rng.randn(*leaf.shape) * 0.3, jnp.float32), dict(shapes))
  params, stats = _fold(variables['params'], variables['batch_stats'], 1e-5)
  assert sorted(params) == ['cheap_operation_0', 'primary_conv_0']
  deploy = GhostModuleV3(16, relu=True, deploy=True)
  out = deploy.apply({'params': params, 'batch_stats': stats}, x)
  assert relative_error(out, module.apply(variables, x)) < FUSION_TOL


# -------------------------------------------------------- whole models


@pytest.mark.parametrize('size', [224, 193])
def test_both_forms_match_timm_and_fusion_is_exact(models, size):
  name = 'ghostnetv3_100'
  m = models(name)
  x = _images(size)
  with torch.no_grad():
    ref = m['timm'](nchw(x)).numpy()
    ref_deploy = m['timm_deploy'](nchw(x)).numpy()
  out = np.asarray(compiled_apply(name, conv_impl='lax')(m['variables'], x))
  deploy_fn = compiled_apply(name, deploy=True, conv_impl='lax')
  out_deploy = np.asarray(deploy_fn(m['deploy_variables'], x))
  fused = gj.reparameterize(name, m['variables'])
  out_fused = np.asarray(deploy_fn(fused, x))
  errs = {'train vs timm': relative_error(out, ref),
          'deploy vs timm deploy': relative_error(out_deploy, ref_deploy),
          'reparameterize vs our train': relative_error(out_fused, out),
          'reparameterize vs timm deploy': relative_error(out_fused,
                                                          ref_deploy)}
  print(f'{name} @{size}: ' + ', '.join(f'{k} {v:.2e}'
                                         for k, v in errs.items()))
  assert errs['train vs timm'] <= TOL
  assert errs['deploy vs timm deploy'] <= TOL
  assert errs['reparameterize vs our train'] <= FUSION_TOL
  assert errs['reparameterize vs timm deploy'] <= TOL
  # Our fused variables are timm's fused weights.
  chex.assert_trees_all_close(fused, m['deploy_variables'], rtol=1e-5,
                              atol=1e-6)


def test_official_file_layout(models, tmp_path):
  """``{state_dict, state_dict_ema}``, official ``bn`` names, thop buffers."""
  name = 'ghostnetv3_100'
  tmodel = models(name)['timm']

  def official(sd, factor):
    out = {}
    for k, v in sd.items():
      k = k.replace('.bn1.', '.bn.') if '_rpr_' in k else k
      out[k] = v * factor if v.is_floating_point() else v
    for module_name, _ in tmodel.named_modules():
      prefix = f'{module_name}.' if module_name else ''
      out[prefix + 'total_ops'] = torch.zeros(1, dtype=torch.float64)
      out[prefix + 'total_params'] = torch.zeros(1, dtype=torch.float64)
    return out

  sd = tmodel.state_dict()
  path = tmp_path / 'ghostnetv3-1.0.pth.tar'
  torch.save({'state_dict': official(sd, 1.0),
              'state_dict_ema': official(sd, 1.25)}, path)
  ema_sd = {k: v * 1.25 if v.is_floating_point() else v
            for k, v in sd.items()}
  expected_ema = convert.load_torch_checkpoint(ema_sd, name)
  chex.assert_trees_all_equal(convert.load_torch_checkpoint(path, name),
                              expected_ema)
  chex.assert_trees_all_equal(
      convert.load_torch_checkpoint(path, name, ema=True), expected_ema)
  regular = convert.load_torch_checkpoint(path, name, ema=False)
  chex.assert_trees_all_equal(regular, models(name)['variables'])
  key = 'blocks.1.0.ghost1.primary_rpr_conv.0.bn1.weight'
  np.testing.assert_array_equal(
      regular['params']['blocks_1_0']['ghost1']['primary_rpr_conv_0']['bn'][
          'scale'], sd[key].numpy())


def test_flax_to_torch_round_trip(timm, models):
  """Exports use the official names; timm needs ``official_to_timm_key``."""
  name = 'ghostnetv3_100'
  m = models(name)
  sd = convert.to_torch_state_dict(m['variables'], name)
  assert 'blocks.1.0.ghost1.primary_rpr_conv.0.bn.weight' in sd
  fresh = timm.create_model(name).eval()
  result = fresh.load_state_dict(sd, strict=False)
  assert result.missing_keys and all('.bn1.' in k
                                     for k in result.missing_keys)
  fresh.load_state_dict({official_to_timm_key(k): v for k, v in sd.items()},
                        strict=True)
  x = _images(97)
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(nchw(x)).numpy(),
                                  m['timm'](nchw(x)).numpy())
  # Deploy form: one naming; loads into timm's converted model as it is.
  fused = gj.reparameterize(name, m['variables'])
  deploy_sd = convert.to_torch_state_dict(fused, name, deploy=True)
  target = copy.deepcopy(fresh)
  target.convert_to_deploy()
  target.load_state_dict(deploy_sd, strict=True)
  with torch.no_grad():
    assert relative_error(target(nchw(x)).numpy(),
                          m['timm_deploy'](nchw(x)).numpy()) < 1e-5


def test_reparameterize_errors(models):
  name = 'ghostnetv3_100'
  m = models(name)
  with pytest.raises(ValueError, match='GhostNetV3'):
    gj.reparameterize('ghostnetv2_100', m['variables'])
  with pytest.raises(ValueError, match='already in the deploy form'):
    gj.reparameterize(name, m['deploy_variables'])
  with pytest.raises(ValueError, match='do not match ghostnetv3_050'):
    gj.reparameterize('ghostnetv3_050', m['variables'])
  with pytest.raises(ValueError, match='deploy'):
    gj.reparameterize(name, m['variables'], deploy=True)
  with pytest.raises(ValueError, match='mapping'):
    gj.reparameterize(name, [1, 2])


@pytest.mark.slow
def test_train_mode_matches_timm(models):
  """Batch statistics through every branch: logits and running stats."""
  name = 'ghostnetv3_100'
  m = models(name)
  tmodel = copy.deepcopy(m['timm']).train()
  tmodel.drop_rate = 0.0
  x = _images(97, batch=4, seed=1)
  with torch.no_grad():
    ref = tmodel(nchw(x)).numpy()
  out, state = compiled_apply(name, train=True, conv_impl='lax')(m['variables'], x)
  err = relative_error(out, ref)
  print(f'{name} train mode @97: max rel diff {err:.2e}')
  assert err <= TOL
  new = convert.to_torch_state_dict(
      {'params': m['variables']['params'], 'batch_stats': state['batch_stats']})
  tsd = {timm_to_official_key(k): v for k, v in tmodel.state_dict().items()}
  for key in ('blocks.7.0.dw_rpr_scale.bn.running_var',
              'blocks.8.3.ghost2.cheap_rpr_skip.running_mean',
              'blocks.8.3.ghost1.cheap_rpr_conv.2.bn.running_var',
              'blocks.8.3.ghost1.short_conv.5.running_var'):
    assert relative_error(new[key].numpy(), tsd[key].numpy()) < 1e-4, key


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ghostnetv3_050', 'ghostnetv3_130',
                                  'ghostnetv3_160'])
def test_other_widths_match_timm(models, name):
  m = models(name, calib_size=129)
  x = _images(129)
  with torch.no_grad():
    ref = m['timm'](nchw(x)).numpy()
    ref_deploy = m['timm_deploy'](nchw(x)).numpy()
  out = np.asarray(compiled_apply(name, conv_impl='lax')(m['variables'], x))
  deploy_fn = compiled_apply(name, deploy=True, conv_impl='lax')
  out_deploy = np.asarray(deploy_fn(m['deploy_variables'], x))
  out_fused = np.asarray(deploy_fn(gj.reparameterize(name, m['variables']),
                                   x))
  errs = (relative_error(out, ref), relative_error(out_deploy, ref_deploy),
          relative_error(out_fused, out))
  print(f'{name} @129: train {errs[0]:.2e}, deploy {errs[1]:.2e}, '
        f'fusion {errs[2]:.2e}')
  assert errs[0] <= TOL and errs[1] <= TOL and errs[2] <= FUSION_TOL
