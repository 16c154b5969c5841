"""BatchNorm folding (``ghostnet_jax.inference``): the same function, faster.

For one model of every family, with random weights and random BatchNorm
statistics (so the normalisation is not the identity), the folded forward
equals the ordinary one to float32 rounding, the folded variables keep the
tree structure, and the folded BatchNorms really lose their arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghostnet_jax
from ghostnet_jax import inference
from ghostnet_jax.testing.torch_reference import (compiled_apply, random_flax_variables,
                             relative_error)

CASES = [
    ('ghostnet_050', {}),
    ('ghostnetv2_100', {}),
    ('ghostnetv3_050', {}),               # training form: BN-only branches
    ('ghostnetv3_050', {'deploy': True}),  # biased convs, no ghost-module BN
    ('g_ghost_regnetx_002', {}),
    ('ghost_resnet50_s4', {}),
]
# GhostNetV3's training form sums 3-5 randomly normalised branches per
# convolution: with BN scales ~1 its activations grow to 1e11 and a 1e-6
# change of the weights changes the logits by 30%, so no comparison means
# anything. Scaled by 0.4 its activations stay O(1).
BN_SCALE = {'ghostnetv3_050': 0.4}
# One-off runs: XLA's backend optimisation level 0 compiles in about half
# the time, with the same results to rounding.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _setup(name, kwargs, size=64):
  model = ghostnet_jax.create_model(name, **kwargs)
  x = np.random.RandomState(7).randn(2, size, size, 3).astype(np.float32)
  variables = random_flax_variables(model, x[:1], train=False)
  factor = BN_SCALE.get(name, 1.0) if not kwargs.get('deploy') else 1.0
  if factor != 1.0:
    variables['params'] = jax.tree_util.tree_map_with_path(
        lambda p, t: t * factor if p[-1].key == 'scale' else t,
        variables['params'])
  return model, variables, jnp.asarray(x)


def _batchnorm_paths(variables):
  paths = set()

  def visit(tree, path):
    if isinstance(tree, dict):
      if 'mean' in tree and 'var' in tree:
        paths.add(path)
      for k, v in tree.items():
        visit(v, path + (k,))

  visit(jax.device_get(variables['batch_stats']), ())
  return paths


@pytest.mark.parametrize('name, kwargs', CASES,
                         ids=[f'{n}{"-deploy" if k else ""}' for n, k in CASES])
def test_folded_forward_equals_the_original(name, kwargs):
  model, variables, x = _setup(name, kwargs)
  folded, paths = inference.fold_batchnorm(model, variables)
  assert paths and paths <= _batchnorm_paths(variables)
  assert (jax.tree_util.tree_structure(folded)
          == jax.tree_util.tree_structure(variables))
  for a, b in zip(jax.tree_util.tree_leaves(folded),
                  jax.tree_util.tree_leaves(variables)):
    assert a.shape == b.shape and a.dtype == b.dtype
  apply = compiled_apply(name, **kwargs)  # one compile serves both trees
  ref = apply(variables, x)
  fast = jax.jit(lambda v, x: inference.folded_apply(model, v, paths, x)).lower(
      folded, x).compile(FAST_COMPILE)(folded, x)
  assert relative_error(fast, ref) <= 1e-5
  # The folded variables also work with the ordinary apply (BN = identity).
  plain = apply(folded, x)
  assert relative_error(plain, ref) <= 1e-5


def test_every_ghostnet_batchnorm_follows_a_convolution():
  model, variables, _ = _setup('ghostnet_050', {})
  pairs = inference.conv_batchnorm_pairs(model, variables)
  assert set(pairs) == _batchnorm_paths(variables)
  assert pairs[('bn1',)] == ('conv_stem',)
  assert pairs[('blocks_1_0', 'ghost1', 'cheap_operation_1')] == (
      'blocks_1_0', 'ghost1', 'cheap_operation_0')


def test_identity_branch_batchnorms_are_not_folded():
  model, variables, _ = _setup('ghostnetv3_050', {})
  pairs = inference.conv_batchnorm_pairs(model, variables)
  skips = {p for p in _batchnorm_paths(variables) if p[-1] == 'cheap_rpr_skip'}
  assert skips and not skips & set(pairs)


def test_folded_trace_has_no_normalisation_arithmetic():
  model, variables, x = _setup('ghostnet_050', {})
  folded, paths = inference.fold_batchnorm(model, variables)
  text = jax.jit(lambda v, x: inference.folded_apply(model, v, paths, x)).lower(
      folded, x).as_text()
  assert 'rsqrt' not in text
  assert 'rsqrt' in jax.jit(
      lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()


def test_make_predict_fn():
  model, variables, x = _setup('ghostnet_050', {})
  predict = inference.make_predict_fn(model, variables)
  ref = model.apply(variables, x, train=False)
  assert relative_error(predict(x), ref) <= 1e-5
  unfolded = inference.make_predict_fn(model, variables, fold=False)
  assert relative_error(unfolded(x), ref) <= 1e-6
