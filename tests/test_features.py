"""Backbone use: features_only / out_indices / output_stride, feature_info,
weight transfer.

References no one here wrote:

* timm's ``features_only`` maps (``FeatureListNet`` over the same randomised,
  converted weights) for ghostnet_100, ghostnetv2_100 and ghostnetv3_100
  (training and deploy form), and timm's ``feature_info``;
* for output stride 16 / 8, the same timm models with their PyTorch
  convolutions switched to stride 1 / dilation (``torch.nn.Conv2d``'s own
  atrous implementation), the dilation of each layer stated here from the
  block table;
* for Ghost-ResNet and G-Ghost's plain stages, the undilated network: a
  stride-free, dilated stack of convolutions, BN and ReLU computes, on every
  ``f``-th pixel, exactly the output of the strided stack (``f`` = the stride
  removed), so the OS-32 maps are a sub-lattice of the OS-16 / OS-8 maps;
* ``jax.lax.conv_general_dilated`` with ``rhs_dilation`` (``conv_impl='lax'``)
  for the package's ``'xla'`` / ``'ffi'`` lowerings.

Images are 64x64 (the last map is 2x2 at output stride 32).
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ghostnet_jax
from ghostnet_jax import convert, ops
from ghostnet_jax.g_ghost import GGhostRegNet
from ghostnet_jax.utils import abstract_variables
from test_ghostnetv3 import condition_torch_model
from ghostnet_jax.testing.torch_reference import (nchw, nhwc, random_flax_variables,
                             randomize_torch_model, relative_error)

TOL = 1e-4
SIZE = 64
TIMM_NAMES = ('ghostnet_100', 'ghostnetv2_100', 'ghostnetv3_100')
# name -> create_model kwargs of the Flax model compared with timm.
FORMS = {
    'ghostnet_100': ('ghostnet_100', {}),
    'ghostnetv2_100': ('ghostnetv2_100', {}),
    'ghostnetv3_100': ('ghostnetv3_100', {}),
    'ghostnetv3_100_deploy': ('ghostnetv3_100', {'deploy': True}),
}


def _images(batch=2, seed=0, size=SIZE):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(
      np.float32)


@pytest.fixture(scope='module')
def references(timm, tmp_path_factory):
  """form -> (timm model (eval), Flax variables converted from its file)."""
  cache = {}

  def get(form):
    if form not in cache:
      name, kwargs = FORMS[form]
      tmodel = timm.create_model(name, pretrained=False)
      if name.startswith('ghostnetv3'):
        condition_torch_model(tmodel, SIZE, seed=5)
        if kwargs.get('deploy'):
          tmodel.convert_to_deploy()
      else:
        randomize_torch_model(tmodel, seed=5)
      tmodel.eval()
      path = tmp_path_factory.mktemp(form) / 'model.pth'
      torch.save(tmodel.state_dict(), path)
      variables = convert.load_torch_checkpoint(str(path), name, **kwargs)
      cache[form] = tmodel, variables
    return cache[form]

  return get


def _timm_features(timm, tmodel, x):
  """The maps of timm's features_only wrapper around ``tmodel``."""
  from timm.models._features import FeatureListNet
  # What timm.create_model(name, features_only=True) builds for GhostNets
  # (feature_cfg flatten_sequential=True), around our randomised model.
  net = FeatureListNet(copy.deepcopy(tmodel), flatten_sequential=True).eval()
  with torch.no_grad():
    return [nhwc(t) for t in net(nchw(x))]


def _flax_features(name, variables, x, **kwargs):
  model = ghostnet_jax.create_model(name, features_only=True, **kwargs)
  variables = ghostnet_jax.transfer_variables(model, variables)
  return [np.asarray(m) for m in jax.jit(model.apply)(variables, x)]


def _errors(ours, theirs):
  assert [o.shape for o in ours] == [t.shape for t in theirs]
  return [relative_error(o, t) for o, t in zip(ours, theirs)]


@pytest.mark.parametrize('form', sorted(FORMS))
def test_features_only_maps_match_timm(timm, references, form):
  name, kwargs = FORMS[form]
  tmodel, variables = references(form)
  x = _images()
  errs = _errors(_flax_features(name, variables, x, **kwargs),
                 _timm_features(timm, tmodel, x))
  print(f'{form} features_only vs timm, per level: '
        + ', '.join(f'{e:.1e}' for e in errs))
  assert max(errs) <= TOL, errs


@pytest.mark.parametrize('name', TIMM_NAMES)
@pytest.mark.parametrize('out_indices', [None, (1, 3), (-1,)])
def test_feature_info_matches_timm(timm, name, out_indices):
  kwargs = {} if out_indices is None else {'out_indices': out_indices}
  ref = timm.create_model(name, features_only=True, **kwargs).feature_info
  ours = ghostnet_jax.feature_info(name, **kwargs)
  assert [lv['num_chs'] for lv in ours] == ref.channels()
  assert [lv['reduction'] for lv in ours] == ref.reduction()
  assert [lv['module'] for lv in ours] == ref.module_name()


def test_feature_info_runs_nothing(monkeypatch):
  """feature_info builds no arrays: it works with tracing disabled."""
  monkeypatch.setattr(jax, 'eval_shape', None)
  info = ghostnet_jax.feature_info('ghostnet_130', output_stride=8)
  assert [lv['num_chs'] for lv in info] == [20, 32, 52, 104, 208]
  assert [lv['reduction'] for lv in info] == [2, 4, 8, 8, 8]


# ------------------------------------------------ documented shapes, errors

DOCUMENTED = {
    # name: [(channels, reduction, module)] at output stride 32
    'g_ghost_regnetx_002': [(32, 2, 'relu'), (24, 4, 'layer1'),
                            (56, 8, 'layer2'), (152, 16, 'layer3'),
                            (368, 32, 'layer4')],
    'ghost_resnet50_s2': [(64, 2, 'relu'), (256, 4, 'layer1'),
                          (512, 8, 'layer2'), (1024, 16, 'layer3'),
                          (2048, 32, 'layer4')],
    'ghost_resnet50_s4': [(64, 2, 'relu'), (256, 4, 'layer1'),
                          (512, 8, 'layer2'), (1024, 16, 'layer3'),
                          (2048, 32, 'layer4')],
}


@pytest.mark.parametrize('name', sorted(DOCUMENTED))
@pytest.mark.parametrize('output_stride', [32, 16, 8])
def test_documented_shapes(name, output_stride):
  model = ghostnet_jax.create_model(name, features_only=True,
                                    output_stride=output_stride)
  variables = abstract_variables(model, SIZE)
  maps = jax.eval_shape(model.apply, variables, jnp.zeros((2, SIZE, SIZE, 3)))
  want = [(2, SIZE // min(r, output_stride), SIZE // min(r, output_stride), c)
          for c, r, _ in DOCUMENTED[name]]
  assert [m.shape for m in maps] == want
  info = ghostnet_jax.feature_info(name, output_stride=output_stride)
  assert [(lv['num_chs'], lv['reduction'], lv['module']) for lv in info] == [
      (c, min(r, output_stride), m) for c, r, m in DOCUMENTED[name]]


@pytest.mark.parametrize('name', ['ghostnet_100', 'ghostnetv3_100',
                                  'g_ghost_regnetx_002', 'ghost_resnet50_s4'])
def test_dilated_model_has_the_classification_parameters(name):
  """output_stride changes no parameter: ImageNet checkpoints load."""
  ref = abstract_variables(ghostnet_jax.create_model(name), SIZE)
  for os_ in (16, 8):
    got = abstract_variables(
        ghostnet_jax.create_model(name, output_stride=os_), SIZE)
    assert (jax.tree_util.tree_structure(got)
            == jax.tree_util.tree_structure(ref))
    assert jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: a.shape == b.shape, got, ref))


def test_features_only_stops_at_the_deepest_level():
  model = ghostnet_jax.create_model('ghostnet_100', features_only=True,
                                    out_indices=(1, 2))
  variables = abstract_variables(model, SIZE)
  assert sorted(variables['params']) == [
      'blocks_0_0', 'blocks_1_0', 'blocks_2_0', 'blocks_3_0', 'bn1',
      'conv_stem']
  maps = jax.eval_shape(model.apply, variables, jnp.zeros((1, SIZE, SIZE, 3)))
  assert [m.shape for m in maps] == [(1, 16, 16, 24), (1, 8, 8, 40)]


@pytest.mark.parametrize('kwargs, match', [
    ({'out_indices': (5,)}, 'out of range'),
    ({'out_indices': (1, 1)}, 'distinct'),
    ({'out_indices': ('a',)}, 'ints'),
    ({'output_stride': 4}, 'output_stride'),
])
def test_bad_backbone_arguments_are_refused(kwargs, match):
  for name in ('ghostnet_050', 'g_ghost_regnetx_002', 'ghost_resnet50_s2'):
    with pytest.raises(ValueError, match=match):
      ghostnet_jax.feature_info(name, **kwargs)
  if 'output_stride' in kwargs:
    model = ghostnet_jax.create_model('ghostnet_050', **kwargs)
    with pytest.raises(ValueError, match=match):
      abstract_variables(model, SIZE)


# ---------------------------------------------------------- output stride


def _dilation_plan(blocks, output_stride):
  """{(i, j): (d_in, d_out, stride_removed)} for a GhostNet block table,
  written here from the DeepLab rule: once the network reaches
  ``output_stride``, a stride-s layer runs at stride 1 and everything after
  it dilates by s more."""
  plan, reduction, dilation = {}, 2, 1
  for i, stage in enumerate(blocks):
    for j, block in enumerate(stage):
      s = block[4]
      if s > 1 and reduction * s > output_stride:
        plan[i, j] = (dilation, dilation * s, True)
        dilation *= s
      else:
        reduction *= s
        plan[i, j] = (dilation, dilation, False)
  return plan


def _dilate_torch_model(tmodel, output_stride):
  """timm's GhostNet with its convolutions made atrous in place."""
  from ghostnet_jax.ghostnet import GHOSTNET_BLOCKS
  plan = _dilation_plan(GHOSTNET_BLOCKS, output_stride)
  for name, mod in tmodel.named_modules():
    if not isinstance(mod, torch.nn.Conv2d) or not name.startswith('blocks.'):
      continue
    _, i, j, rest = name.split('.', 3)
    if (int(i), int(j)) not in plan:
      continue
    d_in, d_out, removed = plan[int(i), int(j)]
    # ghost2 works on the output of the (removed) stride; everything else
    # of a block (ghost1 and its DFC attention, conv_dw, shortcut) before it.
    d = d_out if rest.startswith('ghost2') else d_in
    kh, kw = mod.kernel_size
    mod.dilation = (d, d)
    mod.padding = (d * (kh - 1) // 2, d * (kw - 1) // 2)
    if removed:
      mod.stride = (1, 1)
  return tmodel


@pytest.mark.parametrize('output_stride', [16, 8])
@pytest.mark.parametrize('form', sorted(FORMS))
def test_dilated_features_match_dilated_timm(timm, references, form,
                                             output_stride):
  name, kwargs = FORMS[form]
  tmodel, variables = references(form)
  x = _images(seed=1)
  dilated = _dilate_torch_model(copy.deepcopy(tmodel), output_stride)
  theirs = _timm_features(timm, dilated, x)
  assert theirs[-1].shape[1] == SIZE // output_stride
  ours = _flax_features(name, variables, x, output_stride=output_stride,
                        **kwargs)
  errs = _errors(ours, theirs)
  print(f'{form} OS{output_stride} vs dilated timm, per level: '
        + ', '.join(f'{e:.1e}' for e in errs))
  assert max(errs) <= TOL, errs


def _sublattice_errors(make, output_stride):
  """Relative errors of OS-32 maps against every f-th pixel of the dilated
  maps (f = the stride the level lost); ``make(**kw)`` builds the model."""
  x = _images(seed=2)
  base = make(features_only=True)
  variables = random_flax_variables(base, x)
  ref = jax.jit(base.apply)(variables, x)
  dil = make(features_only=True, output_stride=output_stride)
  out = jax.jit(dil.apply)(variables, x)
  errs = []
  for r, o in zip(ref, out):
    f = o.shape[1] // r.shape[1]
    errs.append(relative_error(o[:, ::f, ::f], r))
  assert out[-1].shape[1] == SIZE // output_stride
  return errs


@pytest.mark.parametrize('output_stride', [16, 8])
def test_ghost_resnet_dilated_maps_contain_the_strided_maps(output_stride):
  make = functools.partial(ghostnet_jax.create_model, 'ghost_resnet50_s2',
                           layers=(1, 2, 1, 2))
  errs = _sublattice_errors(make, output_stride)
  assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize('output_stride', [16, 8])
def test_g_ghost_plain_stages_dilated_contain_the_strided_maps(output_stride):
  # depths <= 2: layer3 and layer4 are plain RegNetX stages (no global mix).
  make = functools.partial(GGhostRegNet, depths=(1, 1, 2, 2),
                           widths=(24, 56, 152, 368), group_width=8)
  errs = _sublattice_errors(make, output_stride)
  assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize('name, kwargs', [
    ('g_ghost_regnetx_002', {}),            # G-Ghost stages dilated
    ('ghostnetv2_100', {}),
    ('ghost_resnet50_s4', {'layers': (1, 1, 2, 2)}),
])
def test_dilated_lowerings_equal_lax(name, kwargs):
  """'xla' (and 'ffi', which falls back to it for dilated depthwise convs)
  against lax.conv_general_dilated with rhs_dilation."""
  x = _images(seed=3)
  outs = {}
  for impl in ('lax', 'xla', 'ffi'):
    model = ghostnet_jax.create_model(name, features_only=True,
                                      output_stride=8, conv_impl=impl,
                                      **kwargs)
    if impl == 'lax':
      variables = random_flax_variables(model, x)
    outs[impl] = jax.jit(model.apply)(variables, x)
  for impl in ('xla', 'ffi'):
    errs = [relative_error(a, b) for a, b in zip(outs[impl], outs['lax'])]
    assert max(errs) <= 1e-5, (impl, errs)


@pytest.mark.parametrize('impl', ['xla', 'ffi'])
@pytest.mark.parametrize('kernel, groups, stride, dilation', [
    ((3, 3), 'dw', 1, 2), ((5, 5), 'dw', 2, 3), ((1, 5), 'dw', 1, 4),
    ((3, 3), 4, 1, 2),
])
def test_dilated_conv_lowerings(impl, kernel, groups, stride, dilation, rng):
  c = 8
  g = c if groups == 'dw' else groups
  x = jnp.asarray(rng.randn(2, 13, 11, c).astype(np.float32))
  k = jnp.asarray(rng.randn(*kernel, c // g, c).astype(np.float32))
  pad = ops.same_padding(kernel, dilation)
  ref = jax.lax.conv_general_dilated(
      x, k, (stride, stride), pad, rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=g)
  out = ops.conv2d(x, k, strides=stride, groups=g, impl=impl,
                   dilation=dilation)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.grad(lambda xx: jnp.sum(f(xx) ** 2))(x)
  np.testing.assert_allclose(
      grad(lambda xx: ops.conv2d(xx, k, strides=stride, groups=g, impl=impl,
                                 dilation=dilation)),
      grad(lambda xx: jax.lax.conv_general_dilated(
          xx, k, (stride, stride), pad, rhs_dilation=(dilation, dilation),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=g)), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------- weight transfer


@pytest.fixture(scope='module')
def classifier_variables():
  model = ghostnet_jax.create_model('ghostnet_050')
  return random_flax_variables(model, jnp.zeros((1, SIZE, SIZE, 3)))


def test_transfer_into_features_only_ignores_the_head(classifier_variables):
  model = ghostnet_jax.create_model('ghostnet_050', features_only=True,
                                    out_indices=(2, 3), output_stride=16)
  v = ghostnet_jax.transfer_variables(model, classifier_variables)
  assert 'classifier' not in v['params'] and 'blocks_9_0' not in v['params']
  leaf = v['params']['blocks_3_0']['conv_dw']['kernel']
  assert leaf is classifier_variables['params']['blocks_3_0']['conv_dw'][
      'kernel']
  maps = jax.jit(model.apply)(v, _images(1))
  assert [m.shape for m in maps] == [(1, 8, 8, 20), (1, 4, 4, 40)]


def test_transfer_is_strict(classifier_variables):
  model = ghostnet_jax.create_model('ghostnet_050', features_only=True)
  params = dict(classifier_variables['params'])
  del params['blocks_2_0']
  with pytest.raises(ValueError, match=r'missing \[.*blocks_2_0'):
    ghostnet_jax.transfer_variables(
        model, {**classifier_variables, 'params': params})
  params = dict(classifier_variables['params'], extra_layer={'kernel': 0})
  with pytest.raises(ValueError, match=r'unknown \[.*extra_layer'):
    ghostnet_jax.transfer_variables(
        model, {**classifier_variables, 'params': params})
  bad = jax.tree_util.tree_map(lambda a: a, classifier_variables)
  bad['params']['bn1'] = {'scale': jnp.ones(7), 'bias': jnp.zeros(7)}
  with pytest.raises(ValueError, match=r'mis-shaped \[.*bn1/bias'):
    ghostnet_jax.transfer_variables(model, bad)
  # A wider model's weights do not fit.
  wide = random_flax_variables(ghostnet_jax.create_model('ghostnet_100'),
                               jnp.zeros((1, SIZE, SIZE, 3)))
  with pytest.raises(ValueError, match='mis-shaped'):
    ghostnet_jax.transfer_variables(model, wide)


def test_new_head_keeps_the_backbone(classifier_variables):
  x = _images(2)
  model = ghostnet_jax.create_model('ghostnet_050', num_classes=7)
  with pytest.raises(ValueError, match='fresh'):
    ghostnet_jax.transfer_variables(model, classifier_variables)
  fresh = random_flax_variables(model, x, seed=1)
  v = ghostnet_jax.transfer_variables(model, classifier_variables, fresh)
  assert all(v['params']['classifier'][k] is fresh['params']['classifier'][k]
             for k in ('kernel', 'bias'))
  src = classifier_variables['params']
  same = jax.tree_util.tree_map(
      lambda a, b: a is b,
      {k: w for k, w in v['params'].items() if k != 'classifier'},
      {k: w for k, w in src.items() if k != 'classifier'})
  assert all(jax.tree_util.tree_leaves(same))
  # num_classes=0: the pre-logits of the 1000-class model, unchanged.
  headless = ghostnet_jax.create_model('ghostnet_050', num_classes=0)
  hv = ghostnet_jax.transfer_variables(headless, classifier_variables)
  full = ghostnet_jax.create_model('ghostnet_050')
  _, inter = jax.jit(lambda v, x: full.apply(
      v, x, mutable=['intermediates']))(classifier_variables, x)
  assert relative_error(jax.jit(headless.apply)(hv, x),
                        inter['intermediates']['pre_logits']) <= 1e-5
