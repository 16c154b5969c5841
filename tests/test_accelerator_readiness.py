"""Accelerator readiness without an accelerator.

For every family, ``train.py``'s training step and eval step (built as
``train_lib.train_and_evaluate`` builds them; ``benchmarks/accelerator.py``'s
``train_py_steps``) are exported with ``jax.export`` for TPU and for CUDA over
a ``jax.sharding.AbstractMesh`` of 32 devices, ``mesh_shape=(8, 4)`` (data,
fsdp), with the default ``conv_impl``. The exported modules must hold no custom
call (the package's CPU kernels must not leak into an accelerator program), no
host callback and no float64; convolutions must reach the accelerator as
convolutions (grouped ones as ``feature_group_count``); every parameter,
BatchNorm statistic and optimizer-state array must carry the FSDP sharding the
trainer intends, in and out of the step; and the lowered FLOPs per image must
agree with the analytic count. Small images (64x64) and the smallest variant of
each family keep it cheap; nothing is compiled.
"""

import math
import os
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import accelerator  # noqa: E402  pylint: disable=g-import-not-at-top

slow = pytest.mark.slow
FAMILIES = [
    pytest.param('ghostnet'),
    pytest.param('ghostnetv2', marks=slow),
    pytest.param('ghostnetv3', marks=slow),
    pytest.param('g_ghost', marks=slow),
    pytest.param('ghost_resnet', marks=slow),
]
PLATFORMS = ('tpu', 'cuda')
_ROWS = {}


def _row(family: str) -> dict:
  if family not in _ROWS:
    _ROWS[family] = accelerator.readiness(family, platforms=PLATFORMS)
  return _ROWS[family]


def _intended_spec(shape, fsdp: int, min_size: int) -> tuple:
  """The trainer's FSDP rule, restated: split the largest dimension divisible
  by the 'fsdp' size (first on ties) over 'fsdp'; arrays with fewer than
  ``min_size`` elements, or with no such dimension, stay replicated."""
  if not shape or math.prod(shape) < min_size:
    return ()
  best = None
  for d, n in enumerate(shape):
    if n % fsdp == 0 and (best is None or n > shape[best]):
      best = d
  if best is None:
    return ()
  return (None,) * best + ('fsdp',)


def _norm(spec) -> tuple:
  """A PartitionSpec as a tuple without trailing Nones."""
  spec = tuple(spec) if spec is not None else ()
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


def _indexed(tree_def, n):
  return tree_def.unflatten(list(range(n)))


@pytest.mark.parametrize('family', FAMILIES)
def test_exports_hold_no_custom_call_callback_or_float64(family):
  row = _row(family)
  assert row['conv_impl'] == 'auto'  # the default, as train.py uses it
  assert set(row['steps']) == {(k, p) for k in ('train', 'eval')
                               for p in PLATFORMS}
  for (kind, platform), r in row['steps'].items():
    where = f'{row["model"]} {kind} step for {platform}'
    assert r['exported'].platforms == (platform,), where
    assert r['exported'].nr_devices == 32, where
    assert r['custom_calls'] == [], f'{where}: {r["custom_calls"]}'
    assert r['callbacks'] == [], f'{where}: {r["callbacks"]}'
    assert r['f64_mentions'] == 0, f'{where}: float64 in the module'
    assert all(a.dtype != jax.numpy.float64 for a in r['exported'].in_avals)
    # Every family has depthwise / grouped convolutions: on an accelerator
    # they must stay XLA convolutions, not the CPU rewrites.
    assert r['grouped_convolutions'] > 0, where


@pytest.mark.parametrize('family', FAMILIES)
def test_lowered_flops_match_the_analytic_count(family):
  row = _row(family)
  for (kind, platform), r in row['steps'].items():
    ratio = r['flops_per_image'] / r['analytic_flops_per_image']
    # BatchNorm, activations, pooling, the loss and the optimizer add work
    # that is not convolution MACs (up to +40% at 64x64); XLA counts a
    # convolution whose window overlaps the padding by its valid taps only
    # (Ghost-ResNet-50 at 64x64: 0.89). A missing or duplicated pass (the
    # weight gradient, say) would be < 0.8 or > 1.6.
    assert 0.8 <= ratio <= 1.6, (row['model'], kind, platform, ratio)
    assert r['bytes_per_image'] > 0


@pytest.mark.parametrize('family', FAMILIES)
def test_state_carries_the_intended_fsdp_sharding(family):
  row = _row(family)
  mesh, steps = row['_mesh'], row['_steps']
  fsdp = mesh.shape['fsdp']
  min_size = accelerator.readiness_config(family).fsdp_min_size
  for platform in PLATFORMS:
    exported = row['steps'][('train', platform)]['exported']
    ins = exported.in_shardings_jax(mesh)
    outs = exported.out_shardings_jax(mesh)
    (args, _) = _indexed(exported.in_tree, len(ins))
    state_in, batch_in = args[0], args[-1]
    state_out = _indexed(exported.out_tree, len(outs))[0]
    checked = sharded_elems = total_elems = 0
    for part in ('params', 'batch_stats', 'opt_state', 'ema'):
      leaves_in = jax.tree_util.tree_leaves_with_path(getattr(state_in, part))
      leaves_out = jax.tree_util.tree_leaves(getattr(state_out, part))
      assert len(leaves_in) == len(leaves_out)
      for (path, i), o in zip(leaves_in, leaves_out):
        shape = exported.in_avals[i].shape
        want = _intended_spec(shape, fsdp, min_size)
        name = f'{part}{jax.tree_util.keystr(path)} {shape}'
        assert _norm(ins[i].spec) == want, f'{name}: in {ins[i].spec}'
        assert _norm(outs[o].spec) == want, f'{name}: out {outs[o].spec}'
        assert exported.in_avals[i].dtype != jax.numpy.bfloat16, name
        checked += 1
        total_elems += math.prod(shape)
        sharded_elems += math.prod(shape) if want else 0
    # Every array but the step counter was checked; SGD / RMSProp keep at
    # least one array per parameter.
    state = steps['abstract_state']
    assert checked == len(jax.tree_util.tree_leaves(state)) - 1
    assert len(jax.tree_util.tree_leaves(state.opt_state)) >= len(
        jax.tree_util.tree_leaves(state.params))
    # FSDP must actually shard the bulk of the state, not replicate it.
    assert sharded_elems / total_elems > 0.8, sharded_elems / total_elems
    assert _norm(ins[batch_in['image']].spec) == (('data', 'fsdp'),)
    assert _norm(ins[batch_in['label']].spec) == (('data', 'fsdp'),)
    # The eval step reads the variables in the same layout.
    exported = row['steps'][('eval', platform)]['exported']
    ev = exported.in_shardings_jax(mesh)
    (eargs, _) = _indexed(exported.in_tree, len(ev))
    for i in jax.tree_util.tree_leaves(eargs[0]):
      want = _intended_spec(exported.in_avals[i].shape, fsdp, min_size)
      assert _norm(ev[i].spec) == want, exported.in_avals[i].shape


def test_the_check_sees_cpu_kernels_in_a_cpu_lowering():
  """The same eval step lowered for the CPU does carry the compiled kernels
  (custom calls), so the accelerator checks above can fail."""
  from ghostnet_jax import kernels  # pylint: disable=g-import-not-at-top
  if not kernels.is_available():
    pytest.skip('CPU kernels not built (python -m ghostnet_jax.kernels.build)')
  steps = _row('ghostnet')['_steps']
  text = steps['eval_step'].trace(*steps['eval_args']).lower(
      lowering_platforms=('cpu',)).as_text()
  found = accelerator.module_problems(text)['custom_calls']
  assert any('depthwise' in c for c in found), found
