"""Key layouts of other publishers onto our models, without compiling models.

The PaddleClas and mindcv mappings are proven on logits in
test_framework_weights.py; here: the MindSpore model zoo's names (taken from
``research/cv/ghostnet/src/ghostnet.py``: flat ``blocks.0..15``, ``ConvUnit``
cells ``conv``/``bn``, last 1x1 ``blocks.16``) cover ghostnet_100 exactly,
and the Paddle rewrites are the exact identities they claim.
"""

import numpy as np
import pytest

import ghostnet_jax
from ghostnet_jax import convert, weight_mappings
from ghostnet_jax.ghostnet import GHOSTNET_BLOCKS
from ghostnet_jax.layers import make_divisible


def _zoo_names_and_shapes():
  """The zoo network's parameter names and shapes at 1.0x, enumerated from
  its block table (ceil-to-4 widths, SE width ceil4(mid // 4))."""
  ceil4 = lambda v: -(-v // 4) * 4  # noqa: E731
  out = {'conv_stem.weight': (16, 3, 3, 3)}

  def convunit(prefix, cin, cout, k, groups=1):
    out[f'{prefix}.conv.weight'] = (cout, cin // groups, k, k)
    for leaf in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
      out[f'{prefix}.bn.{leaf}'] = (cout,)

  for leaf in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
    out[f'bn1.{leaf}'] = (16,)
  cin, i = 16, 0
  for stage in GHOSTNET_BLOCKS:
    for k, mid, c, se, s in stage:
      b = f'blocks.{i}'
      convunit(f'{b}.ghost1.primary_conv', cin, mid // 2, 1)
      convunit(f'{b}.ghost1.cheap_operation', mid // 2, mid // 2, 3, mid // 2)
      if s > 1:
        convunit(f'{b}.dw', mid, mid, k, mid)
      if se:
        rd = ceil4(mid // 4)
        out[f'{b}.se.conv_reduce.weight'] = (rd, mid, 1, 1)
        out[f'{b}.se.conv_reduce.bias'] = (rd,)
        out[f'{b}.se.conv_expand.weight'] = (mid, rd, 1, 1)
        out[f'{b}.se.conv_expand.bias'] = (mid,)
      convunit(f'{b}.ghost2.primary_conv', mid, c // 2, 1)
      convunit(f'{b}.ghost2.cheap_operation', c // 2, c // 2, 3, c // 2)
      if cin != c or s != 1:
        convunit(f'{b}.shortcut.0', cin, cin, k, cin)
        convunit(f'{b}.shortcut.1', cin, c, 1)
      cin, i = c, i + 1
  convunit(f'blocks.{i}', cin, 960, 1)
  out['conv_head.weight'] = (1280, 960, 1, 1)
  out['conv_head.bias'] = (1280,)
  out['classifier.weight'] = (1000, 1280)
  out['classifier.bias'] = (1000,)
  return out


def test_model_zoo_names_cover_ghostnet_100_exactly():
  rs = np.random.RandomState(0)
  zoo = {k: rs.randn(*s).astype(np.float32)
         for k, s in _zoo_names_and_shapes().items()}
  zoo['moments.conv_stem.weight'] = zoo['conv_stem.weight']
  zoo['learning_rate'] = np.float32(0.1)
  layout = convert.torch_layout('ghostnet_100')
  sd = weight_mappings.ms_zoo_to_official(zoo)
  assert sorted(sd) == sorted(layout)
  variables = convert.state_dict_to_variables(sd, 'ghostnet_100')
  np.testing.assert_array_equal(
      variables['params']['blocks_9_0']['bn1']['scale'],
      zoo['blocks.16.bn.gamma'])
  np.testing.assert_array_equal(
      variables['batch_stats']['blocks_6_3']['shortcut_3']['var'],
      zoo['blocks.9.shortcut.1.bn.moving_variance'])


def test_paddle_se_and_head_rewrites_are_exact():
  """The SE and head rewrites reproduce Paddle's maths on random values."""
  rs = np.random.RandomState(1)
  mid, r = 72, 18
  rd = make_divisible(mid * 0.25, 4)
  parts = {'squeeze.weight': rs.randn(mid, r), 'squeeze.bias': rs.randn(r),
           'excitation.weight': rs.randn(r, mid) * 0.3,
           'excitation.bias': rs.randn(mid) * 0.3 + 0.5}
  layout = {'p.se.conv_reduce.weight': ('params', (), (1, 1, mid, rd))}
  got = weight_mappings._paddle_se('p', parts, layout)  # pylint: disable=protected-access
  pooled = rs.randn(5, mid)
  paddle = np.clip(np.maximum(pooled @ parts['squeeze.weight']
                              + parts['squeeze.bias'], 0)
                   @ parts['excitation.weight'] + parts['excitation.bias'],
                   0, 1)
  hidden = np.maximum(pooled @ got['p.se.conv_reduce.weight'][:, :, 0, 0].T
                      + got['p.se.conv_reduce.bias'], 0)
  z = hidden @ got['p.se.conv_expand.weight'][:, :, 0, 0].T + \
      got['p.se.conv_expand.bias']
  ours = np.clip(z + 3, 0, 6) / 6  # jax.nn.hard_sigmoid
  assert 0 < (paddle == 1).mean() < 1 and 0 < (paddle == 0).mean() < 1
  np.testing.assert_allclose(ours, paddle, atol=1e-6)
  assert got['p.se.conv_reduce.weight'].shape == (rd, mid, 1, 1)

  head = {'conv.weight': rs.randn(8, 6, 1, 1),
          'batch_norm.weight': rs.rand(8) + 0.5,
          'batch_norm.bias': rs.randn(8),
          'batch_norm.running_mean': rs.randn(8),
          'batch_norm.running_var': rs.rand(8) + 0.5}
  folded = weight_mappings._fold_head(head)  # pylint: disable=protected-access
  x = rs.randn(4, 6)
  bn = ((x @ head['conv.weight'][:, :, 0, 0].T - head['batch_norm.running_mean'])
        / np.sqrt(head['batch_norm.running_var'] + 1e-5)
        * head['batch_norm.weight'] + head['batch_norm.bias'])
  np.testing.assert_allclose(
      x @ folded['conv_head.weight'][:, :, 0, 0].T + folded['conv_head.bias'],
      bn, rtol=1e-5, atol=1e-5)


def test_paddle_file_of_a_wider_model_is_refused():
  parts = {'squeeze.weight': np.zeros((72, 30)), 'squeeze.bias': np.zeros(30),
           'excitation.weight': np.zeros((30, 72)),
           'excitation.bias': np.zeros(72)}
  layout = {'p.se.conv_reduce.weight': ('params', (), (1, 1, 72, 20))}
  with pytest.raises(weight_mappings.MappingError, match='wider'):
    weight_mappings._paddle_se('p', parts, layout)  # pylint: disable=protected-access


def test_list_sources_is_exported():
  assert [s.tag for s in ghostnet_jax.list_sources('ghostnet_050')] == [
      'paddle', 'mindcv']


def test_readme_table_and_summary_list_the_sources(capsys):
  """The README's weights column is what the registry says (regenerate it
  with ``python -m ghostnet_jax.summary all --markdown``)."""
  import pathlib
  import re

  from ghostnet_jax import summary
  readme = (pathlib.Path(__file__).resolve().parents[1] / 'README.md'
            ).read_text()
  models = readme[readme.index('## Models'):]
  models = models[:models.index('\n## ', 1)]
  rows = dict(re.findall(r'^\| `(\w+)` \|.*\| ([^|]+) \|$', models, flags=re.M))
  assert set(rows) == set(ghostnet_jax.list_models())
  for name, cell in rows.items():
    assert cell.strip() == summary.weights_cell(name), name
  assert '**PaddleClas SSLD**' in rows['ghostnet_130']
  assert summary.main(['all', '--sources']) == 0
  out = capsys.readouterr().out
  assert 'GhostNet_x1_3_ssld_pretrained.pdparams' in out
  assert 'ghostnet_checkpoint.index' in out  # the TF checkpoint, loadable
