"""Ghost-ResNet-50: sizes from a closed form, paper numbers, forward, training.

The sizes are checked against a per-layer formula written here from the
architecture (ResNet-50 v1.5 with every bottleneck conv and the shortcut as a
Ghost module, plain stem, Ghost classifier), not against the model code.
Whole-model forwards use small images to stay fast on a CPU.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghostnet_jax
from ghostnet_jax import macs as macs_lib
from ghostnet_jax.ghost_resnet import GhostResNet

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (planes, blocks)
NUM_CLASSES = 1000


def ghost_cost(cin, cout, k, out_hw, s, d=3, bn=True, bias=False):
  """(params, MACs) of one Ghost module: k x k primary, d x d cheap op."""
  m = math.ceil(cout / s)
  n = m * (s - 1)
  params = k * k * cin * m + d * d * n
  params += 2 * (m + n) if bn else 0
  params += (m + n) if bias else 0
  return params, out_hw * out_hw * (k * k * cin * m + d * d * n)


def closed_form(s, image=224, ghost_fc=True, bn=True, bias=False):
  """Parameters and MACs of Ghost-ResNet-50 from the architecture table."""
  hw = image // 2
  params, macs = 7 * 7 * 3 * 64 + 2 * 64, hw * hw * 7 * 7 * 3 * 64  # stem
  hw //= 2  # max-pool
  cin = 64
  for i, (planes, blocks) in enumerate(STAGES):
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      out_hw = hw // stride
      layers = [(cin, planes, 1, hw), (planes, planes, 3, out_hw),
                (planes, 4 * planes, 1, out_hw)]
      if j == 0:
        layers.append((cin, 4 * planes, 1, out_hw))  # downsample
      for ci, co, k, o in layers:
        p, m = ghost_cost(ci, co, k, o, s, bn=bn, bias=bias)
        params, macs = params + p, macs + m
      cin, hw = 4 * planes, out_hw
  if ghost_fc:  # 1x1 primary and 1x1 cheap op with biases on the pooled map
    p, m = ghost_cost(2048, NUM_CLASSES, 1, 1, s, d=1, bn=False, bias=True)
  else:
    p, m = 2048 * NUM_CLASSES + NUM_CLASSES, 2048 * NUM_CLASSES
  return params + p, macs + m


def sizes(model, image=224):
  layers, _, variables = macs_lib._trace(model, image)
  return (ghostnet_jax.count_params(variables['params']),
          sum(r.macs for r in layers))


# name -> (ratio, paper params in M, paper FLOPs in B)
PAPER = {'ghost_resnet50_s2': (2, 13.0, 2.2), 'ghost_resnet50_s4': (4, 6.5, 1.2)}


@pytest.mark.parametrize('name', sorted(PAPER))
def test_sizes_equal_the_closed_form_and_are_near_the_paper(name):
  s, paper_params, paper_flops = PAPER[name]
  model = ghostnet_jax.create_model(name, conv_impl='lax')
  params, macs = sizes(model)
  assert (params, macs) == closed_form(s)
  # Documented figures (module docstring / README).
  assert (params, macs) == {2: (12_930_012, 2_149_999_860),
                            4: (6_616_502, 1_180_407_662)}[s]
  # The paper rounds to 0.1M / 0.1B; s=2's 2.14999986B sits on the boundary.
  assert abs(params / 1e6 - paper_params) <= 0.12
  assert abs(macs / 1e9 - paper_flops) <= 0.0501


def test_ratio_one_is_torchvision_resnet50():
  # torchvision's resnet50: 25,557,032 parameters, 4.09 GFLOPs.
  params, macs = sizes(GhostResNet(ratio=1, conv_impl='lax'))
  assert params == 25_557_032 == closed_form(1)[0]
  assert macs == closed_form(1)[1]
  assert round(macs / 1e9, 2) == 4.09


def test_dense_classifier_relates_to_the_official_file():
  # The official ghost_resnet.py forward (computed by running it): Ghost
  # modules with biased convs and no BN, dense fc. Same MACs as ours; BN's two
  # numbers per channel instead of one bias: one extra per Ghost channel.
  official = {2: (13_927_016, 2_151_023_360), 4: (8_125_256, 1_181_942_912)}
  ghost_channels = sum(
      (2 * p + 4 * p) * b + 4 * p for p, b in STAGES)  # conv1..3 + downsample
  assert ghost_channels == 26_496
  for s in (2, 4):
    assert closed_form(s, ghost_fc=False, bn=False, bias=True) == official[s]
  params, macs = sizes(GhostResNet(ratio=4, ghost_classifier=False,
                                   conv_impl='lax'))
  assert (params, macs) == closed_form(4, ghost_fc=False)
  assert params - ghost_channels == official[4][0]
  assert macs == official[4][1]


def test_registry_entries():
  assert ghostnet_jax.list_models('ghost_resnet*') == sorted(PAPER)
  from ghostnet_jax.registry import get_entry
  for name, top1 in (('ghost_resnet50_s2', 75.0), ('ghost_resnet50_s4', 74.1)):
    entry = get_entry(name)
    assert entry.family == 'ghost_resnet'
    assert entry.paper_top1 == top1
    assert entry.weights is None
  model = ghostnet_jax.create_model('ghost_resnet50_s4', num_classes=10)
  assert (model.ratio, model.dw_size, model.num_classes) == (4, 3, 10)


def test_forward_shapes_and_feature_strides():
  # Abstract evaluation: the full model's shapes without compiling it.
  model = ghostnet_jax.create_model('ghost_resnet50_s4', conv_impl='lax')
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

  def forward(x):
    variables = model.init(jax.random.key(0), x)
    return (variables,) + model.apply(variables, x, train=True,
                                      mutable=['batch_stats', 'intermediates'])

  variables, logits, state = jax.eval_shape(forward, x)
  chex.assert_shape(logits, (2, NUM_CLASSES))
  expected = {'stride_2': (2, 32, 32, 64), 'stride_4': (2, 16, 16, 256),
              'stride_8': (2, 8, 8, 512), 'stride_16': (2, 4, 4, 1024),
              'stride_32': (2, 2, 2, 2048), 'pre_logits': (2, 2048)}
  assert {k: v.shape for k, v in state['intermediates'].items()} == expected
  # Stem BN + two BNs in each of the 52 Ghost modules, mean and var each.
  assert len(jax.tree_util.tree_leaves(state['batch_stats'])) == 2 * 105
  # The 3x3 Ghost module of a strided block, with its own BNs.
  conv2 = variables['params']['layer2_0']['conv2']
  chex.assert_shape(conv2['primary_conv_0']['kernel'], (3, 3, 128, 32))
  chex.assert_shape(conv2['cheap_operation_0']['kernel'], (3, 3, 1, 96))
  assert set(conv2) == {'primary_conv_0', 'primary_conv_1',
                        'cheap_operation_0', 'cheap_operation_1'}
  chex.assert_shape(variables['params']['layer2_0']['downsample_0']
                    ['primary_conv_0']['kernel'], (1, 1, 256, 128))
  fc = variables['params']['fc']
  chex.assert_shape(fc['primary_conv_0']['kernel'], (1, 1, 2048, 250))
  chex.assert_shape(fc['cheap_operation_0']['kernel'], (1, 1, 1, 750))


def random_variables(model, x, seed=0):
  """Variables of the model's shapes, drawn with NumPy.

  ``jax.jit(model.init)`` compiles every initializer (seconds of CPU for a
  ResNet); the tests below need values, not the initializers (whose shapes
  are what the size tests check).
  """
  rng = np.random.RandomState(seed)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32)
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope='module')
def tiny():
  """One block per stage (every code path of -50), compiled once.

  Returns the model, its variables, the batch, and one jitted evaluation:
  eval logits of the batch and of the batch with other images replaced, and
  train-mode logits and state.
  """
  model = GhostResNet(ratio=2, layers=(1, 1, 1, 1), num_classes=10,
                      conv_impl='lax')
  x = jax.random.normal(jax.random.key(2), (3, 64, 64, 3))
  variables = random_variables(model, x)

  @jax.jit
  def run(variables, x):
    other = x.at[0].set(-x[0]).at[2].set(2 * x[2])
    train_logits, state = model.apply(variables, x, train=True,
                                      mutable=['batch_stats'])
    return (model.apply(variables, x), model.apply(variables, other),
            train_logits, state)

  return model, variables, x, run(variables, x)


def test_train_mode_updates_every_batch_norm(tiny):
  _, variables, _, (_, _, train_logits, state) = tiny
  chex.assert_shape(train_logits, (3, 10))
  chex.assert_tree_all_finite(train_logits)
  old = jax.tree_util.tree_leaves_with_path(variables['batch_stats'])
  new = jax.tree_util.tree_leaves(state['batch_stats'])
  assert len(old) == len(new) == 2 * (1 + 2 * 4 * 4)
  for (path, a), b in zip(old, new):
    assert not np.allclose(a, b), jax.tree_util.keystr(path)


def test_eval_forward_is_per_image(tiny):
  # Eval-mode BN uses running statistics: an image's logits do not depend on
  # the rest of the batch.
  _, _, _, (logits, logits_other, _, _) = tiny
  chex.assert_shape(logits, (3, 10))
  np.testing.assert_allclose(logits_other[1], logits[1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits_other[0], logits[0])


def test_ghost_classifier_ghost_logits_are_affine_in_intrinsic_ones(tiny):
  _, variables, _, (logits, _, _, _) = tiny
  fc = variables['params']['fc']
  a = fc['cheap_operation_0']['kernel'][0, 0, 0]
  b = fc['cheap_operation_0']['bias']
  np.testing.assert_allclose(logits[:, 5:], logits[:, :5] * a + b,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    ({'layers': (3, 4, 6)}, 'layers'),
    ({'ratio': 0}, 'ratio'),
    ({'dw_size': 2}, 'dw_size'),
    ({'num_classes': 1}, 'ghost_classifier=False'),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
  model = GhostResNet(**{'conv_impl': 'lax', **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_nchw_input_is_rejected():
  model = ghostnet_jax.create_model('ghost_resnet50_s2')
  with pytest.raises(ValueError, match='NCHW'):
    model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_ghostnet_v1_is_unchanged_by_the_ghost_module_fields():
  variables = jax.eval_shape(
      lambda x: ghostnet_jax.create_model('ghostnet_100', conv_impl='lax')
      .init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert ghostnet_jax.count_params(variables['params']) == 5_182_508
  g = variables['params']['blocks_6_3']['ghost1']
  assert set(g) == {'primary_conv_0', 'primary_conv_1', 'cheap_operation_0',
                    'cheap_operation_1'}
  assert g['primary_conv_0']['kernel'].shape == (1, 1, 80, 240)
  assert g['cheap_operation_0']['kernel'].shape == (3, 3, 1, 240)
