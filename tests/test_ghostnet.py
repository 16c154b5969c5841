"""GhostNet v1: exact sizes, and parity with timm's PyTorch GhostNet.

timm's ``ghostnet_050/100/130`` is the reference no one here wrote. Every
weight and every BatchNorm statistic is randomised, the state_dict goes
through a real ``torch.save`` file and ``load_torch_checkpoint``, and logits
(and every block's activations) are compared.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ghostnet_jax
from ghostnet_jax import convert
from ghostnet_jax.utils import abstract_variables
from ghostnet_jax.testing.torch_reference import (compiled_apply, nchw, nhwc, random_flax_variables,
                             randomize_torch_model, relative_error)

WIDTHS = {'ghostnet_050': 0.5, 'ghostnet_100': 1.0, 'ghostnet_130': 1.3}
PARAMS = {'ghostnet_050': 2_587_292, 'ghostnet_100': 5_182_508,
          'ghostnet_130': 7_358_820}
MACS_M = {'ghostnet_050': 42.3, 'ghostnet_100': 141.2, 'ghostnet_130': 227.0}
TOL = 1e-4


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_count_is_exact(name):
  variables = abstract_variables(ghostnet_jax.create_model(name))
  assert ghostnet_jax.count_params(variables['params']) == PARAMS[name]


@pytest.mark.parametrize('name', sorted(MACS_M))
def test_macs_match_the_paper_count(name):
  assert round(ghostnet_jax.count_macs(name) / 1e6, 1) == MACS_M[name]


def test_make_divisible_rounds_like_the_official_code():
  md = ghostnet_jax.make_divisible
  assert md(16 * 0.5) == 8
  assert md(9) == 12          # 8 would drop > 10 %
  assert md(36 * 0.25) == 12  # the 0.5x SE case of the reference notes
  assert md(184 * 1.3) == 240
  assert md(960 * 1.3) == 1248
  assert md(1.0) == 4


def test_unknown_model_lists_known_names():
  with pytest.raises(ValueError, match='ghostnet_100') as e:
    ghostnet_jax.create_model('ghostnet_1000')
  assert 'Known models' in str(e.value)


@pytest.mark.parametrize('shape, match', [
    ((224, 224, 3), 'shape'),
    ((1, 3, 64, 64), 'NCHW'),
    ((1, 64, 64, 4), '3 channels'),
])
def test_bad_image_shapes_are_refused(shape, match):
  model = ghostnet_jax.create_model('ghostnet_050')
  variables = abstract_variables(model, image_size=64)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.apply, variables, jnp.zeros(shape))


# --------------------------------------------------------------- parity


def _reference(timm, name, seed, tmp_path_factory):
  model = timm.create_model(name, pretrained=False).eval()
  randomize_torch_model(model, seed)
  path = tmp_path_factory.mktemp(name) / f'{name}.pth'
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope='module', params=sorted(WIDTHS))
def pair(request, timm, tmp_path_factory):
  """(name, timm model, Flax variables loaded from the torch.save file)."""
  name = request.param
  torch_model, path = _reference(timm, name, 7, tmp_path_factory)
  variables = convert.load_torch_checkpoint(str(path), name)
  return name, torch_model, variables


def _flax_logits(name, variables, x, **kwargs):
  return np.asarray(compiled_apply(name, **kwargs)(variables, x))


@pytest.mark.parametrize('size', [224, 193])
def test_eval_logits_match_timm(pair, size):
  name, torch_model, variables = pair
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  with torch.no_grad():
    ref = torch_model(nchw(x)).numpy()
  err = relative_error(_flax_logits(name, variables, x), ref)
  print(f'{name} {size}x{size}: max|diff|/max|logit| = {err:.2e}')
  assert err <= TOL


def _first_divergent_block(torch_model, model, variables, x, tol):
  """Compares every block's output; returns (block, error) of the first
  block that diverges, or (None, worst error)."""
  captured = {}
  hooks = []
  for i, stage in enumerate(torch_model.blocks):
    for j, block in enumerate(stage):
      def hook(_, __, out, key=f'blocks_{i}_{j}'):
        captured[key] = nhwc(out)
      hooks.append(block.register_forward_hook(hook))
  with torch.no_grad():
    torch_model(nchw(x))
  for h in hooks:
    h.remove()
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=True, mutable=['intermediates']))(
          variables, x)
  inter = state['intermediates']
  worst = 0.0
  for key, ref in captured.items():  # Forward order.
    err = relative_error(inter[key]['__call__'][0], ref)
    worst = max(worst, err)
    if err > tol:
      return key, err
  return None, worst


def test_every_block_matches_timm(pair):
  name, torch_model, variables = pair
  x = np.random.RandomState(1).randn(1, 96, 96, 3).astype(np.float32)
  model = ghostnet_jax.create_model(name)
  block, err = _first_divergent_block(torch_model, model, variables, x, TOL)
  assert block is None, f'{name}: first divergent block {block} ({err:.2e})'


def test_divergence_is_located(timm, tmp_path_factory):
  """The per-block comparison names the block whose weights differ."""
  torch_model, path = _reference(timm, 'ghostnet_050', 3, tmp_path_factory)
  variables = convert.load_torch_checkpoint(str(path), 'ghostnet_050')
  params = jax.tree_util.tree_map(np.array, variables['params'])
  params['blocks_6_2']['ghost2']['primary_conv_0']['kernel'] *= 1.5
  variables = {**variables, 'params': params}
  x = np.random.RandomState(1).randn(1, 64, 64, 3).astype(np.float32)
  model = ghostnet_jax.create_model('ghostnet_050')
  block, err = _first_divergent_block(torch_model, model, variables, x, TOL)
  assert block == 'blocks_6_2' and err > TOL


def test_train_mode_forward_matches_timm(pair):
  """Batch statistics in the forward pass and the running-statistic update
  (PyTorch updates the running variance with the unbiased batch variance)."""
  name, torch_model, variables = pair
  x = np.random.RandomState(2).randn(4, 64, 64, 3).astype(np.float32)
  ref = copy.deepcopy(torch_model).train()
  ref.drop_rate = 0.0
  with torch.no_grad():
    ref_logits = ref(nchw(x)).numpy()
  logits, updates = compiled_apply(name, train=True)(variables, x)
  assert relative_error(logits, ref_logits) <= TOL
  ours = convert.to_torch_state_dict(
      {'params': variables['params'], 'batch_stats': updates['batch_stats']})
  theirs = ref.state_dict()
  stats = [k for k in theirs if k.endswith(('running_mean', 'running_var'))]
  assert len(stats) == 2 * 80
  for key in stats:
    np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(),
                               rtol=1e-4, atol=1e-5, err_msg=key)


def test_flax_to_torch_round_trip(pair, timm):
  name, _, variables = pair
  state_dict = convert.to_torch_state_dict(variables, name)
  fresh = timm.create_model(name, pretrained=False).eval()
  result = fresh.load_state_dict(state_dict, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  x = np.random.RandomState(3).randn(2, 97, 97, 3).astype(np.float32)
  with torch.no_grad():
    ref = fresh(nchw(x)).numpy()
  assert relative_error(_flax_logits(name, variables, x), ref) <= TOL


def test_conv_lowerings_give_the_same_logits():
  """One parameter layout, four lowerings: the same function to rounding."""
  x = np.random.RandomState(4).randn(2, 64, 64, 3).astype(np.float32)
  variables = random_flax_variables(ghostnet_jax.create_model('ghostnet_100'),
                                    x)
  outs = {impl: _flax_logits('ghostnet_100', variables, x, conv_impl=impl)
          for impl in ('lax', 'xla', 'ffi', 'auto')}
  # Same math, different summation order: rounding-level differences only.
  for impl in ('xla', 'ffi', 'auto'):
    assert relative_error(outs[impl], outs['lax']) <= 1e-5, impl


def test_extract_features_strides_and_channels():
  model = ghostnet_jax.create_model('ghostnet_100')
  variables = abstract_variables(model, image_size=64)
  feats = jax.eval_shape(
      lambda v, x: ghostnet_jax.extract_features(model, v, x), variables,
      jnp.zeros((2, 64, 64, 3)))
  expected = {'stride_2': (2, 32, 32, 16), 'stride_4': (2, 16, 16, 24),
              'stride_8': (2, 8, 8, 40), 'stride_16': (2, 4, 4, 112),
              'stride_32': (2, 2, 2, 960), 'pre_logits': (2, 1280)}
  assert {k: v.shape for k, v in feats.items()} == expected


def test_headless_model_returns_pre_logits():
  model = ghostnet_jax.create_model('ghostnet_050', num_classes=0)
  variables = abstract_variables(model, image_size=32)
  assert 'classifier' not in variables['params']
  out = jax.eval_shape(model.apply, variables, jnp.zeros((3, 32, 32, 3)))
  assert out.shape == (3, 1280)


def test_bfloat16_compute_keeps_float32_params():
  x = np.random.RandomState(5).randn(2, 32, 32, 3).astype(np.float32)
  ref = ghostnet_jax.create_model('ghostnet_050')
  variables = random_flax_variables(ref, x)
  model = ghostnet_jax.create_model('ghostnet_050', dtype=jnp.bfloat16)
  shapes = abstract_variables(model, image_size=32)
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree_util.tree_leaves(shapes))
  lo = jax.jit(model.apply)(variables, x)
  hi = jax.jit(ref.apply)(variables, x)
  assert lo.dtype == jnp.float32
  assert relative_error(lo, hi) < 5e-2
