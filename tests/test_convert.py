"""The PyTorch -> Flax converter: file layouts as published, and bad files.

Uses timm's ghostnet_050 (random weights) as the source of real state_dicts.
"""

import collections
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import ghostnet_jax
from ghostnet_jax import checkpoint, convert
from ghostnet_jax.testing.torch_reference import nchw, randomize_torch_model, relative_error

NAME = 'ghostnet_050'


@pytest.fixture(scope='module')
def torch_model(timm):
  model = timm.create_model(NAME, pretrained=False).eval()
  randomize_torch_model(model, 11)
  return model


@pytest.fixture(scope='module')
def state_dict(torch_model):
  return collections.OrderedDict(
      (k, v.clone()) for k, v in torch_model.state_dict().items())


@pytest.fixture(scope='module')
def reference(state_dict):
  return convert.load_torch_checkpoint(state_dict, NAME)


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _save(obj, path):
  torch.save(obj, path)
  return str(path)


def test_converted_model_matches_torch(torch_model, reference):
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  with torch.no_grad():
    ref = torch_model(nchw(x)).numpy()
  out = ghostnet_jax.create_model(NAME).apply(reference, x)
  assert relative_error(out, ref) <= 1e-4


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'state_dict': sd, 'epoch': 3},
    lambda sd: {'model': sd},
    lambda sd: {'state_dict': {f'module.{k}': v for k, v in sd.items()}},
    lambda sd: {'checkpoint': {'state_dict': sd}},
    lambda sd: {**sd, 'total_ops': torch.zeros(1), 'total_params':
                torch.zeros(1), 'blocks.0.0.ghost1.total_ops': torch.zeros(1)},
], ids=['flat', 'state_dict', 'model', 'ddp_prefix', 'nested', 'thop_keys'])
def test_published_layouts_load(wrap, state_dict, reference, tmp_path):
  path = _save(wrap(state_dict), tmp_path / 'ckpt.pth.tar')
  assert _leaves_equal(convert.load_torch_checkpoint(path, NAME), reference)


def test_ema_weights_are_preferred_and_selectable(state_dict, reference,
                                                  tmp_path):
  ema = {k: v * 2 if v.is_floating_point() else v
         for k, v in state_dict.items()}
  path = _save({'state_dict': state_dict, 'state_dict_ema': ema},
               tmp_path / 'both.pth')
  regular = convert.load_torch_checkpoint(path, NAME, ema=False)
  assert _leaves_equal(regular, reference)
  for choice in (None, True):
    got = convert.load_torch_checkpoint(path, NAME, ema=choice)
    np.testing.assert_array_equal(got['params']['bn1']['scale'],
                                  2 * np.asarray(reference['params']['bn1']
                                                 ['scale']))
  with pytest.raises(convert.CheckpointError, match='EMA'):
    convert.load_torch_checkpoint(state_dict, NAME, ema=True)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_upcast(dtype, state_dict, reference):
  half = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in state_dict.items()}
  got = convert.load_torch_checkpoint(half, NAME)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(reference)):
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_every_problem_is_listed_in_one_error(state_dict):
  broken = dict(state_dict)
  del broken['conv_stem.weight']
  del broken['blocks.3.0.se.conv_reduce.bias']
  broken['blocks.1.0.conv_dw.weight'] = torch.zeros(7, 1, 3, 3)
  broken['head.extra.weight'] = torch.zeros(3)
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_torch_checkpoint(broken, NAME)
  msg = str(e.value)
  assert '2 missing, 1 unexpected, 1 mis-shaped' in msg
  for key in ('conv_stem.weight', 'blocks.3.0.se.conv_reduce.bias',
              'blocks.1.0.conv_dw.weight', 'head.extra.weight', '(7, 1, 3, 3)'):
    assert key in msg


def test_non_strict_keeps_initial_values_for_missing_keys(state_dict,
                                                          reference):
  broken = dict(state_dict)
  del broken['classifier.weight']
  broken['head.extra.weight'] = torch.zeros(3)
  with pytest.warns(UserWarning, match='1 unexpected'):
    got = convert.load_torch_checkpoint(broken, NAME, strict=False)
  np.testing.assert_array_equal(got['params']['bn1']['scale'],
                                reference['params']['bn1']['scale'])
  assert got['params']['classifier']['kernel'].shape == (1280, 1000)


def test_checkpoint_of_another_width_is_refused_and_recognised(timm):
  other = timm.create_model('ghostnet_100', pretrained=False).state_dict()
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_torch_checkpoint(other, NAME)
  assert 'mis-shaped' in str(e.value)
  assert 'looks like a checkpoint of: ghostnet_100' in str(e.value)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                            torch.nn.Linear(8, 2))
  path = _save(net.state_dict(), tmp_path / 'other.pth')
  with pytest.raises(convert.CheckpointError, match='does not match'):
    convert.load_torch_checkpoint(path, NAME)


def test_non_finite_weights_are_refused(state_dict):
  bad = dict(state_dict)
  key = 'blocks.2.0.ghost1.primary_conv.1.running_var'
  bad[key] = torch.full_like(bad[key], float('nan'))
  with pytest.raises(convert.CheckpointError, match='NaN or Inf'):
    convert.load_torch_checkpoint(bad, NAME)
  got = convert.load_torch_checkpoint(bad, NAME, allow_nonfinite=True)
  assert np.isnan(got['batch_stats']['blocks_2_0']['ghost1']
                  ['primary_conv_1']['var']).all()


def test_corrupt_files_get_clear_errors(state_dict, tmp_path):
  good = _save(state_dict, tmp_path / 'good.pth')
  data = open(good, 'rb').read()
  cases = {
      'truncated.pth': (data[: len(data) // 2], 'truncated or corrupt'),
      'random.pth': (np.random.RandomState(0).bytes(4096),
                     'not a PyTorch checkpoint'),
      'empty.pth': (b'', 'empty'),
      'text.pth': (b'<html>404 Not Found</html>', 'not a PyTorch checkpoint'),
  }
  for name, (content, match) in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(convert.CheckpointError, match=match):
      convert.load_torch_checkpoint(str(path), NAME)
  with pytest.raises(FileNotFoundError, match='not found'):
    convert.load_torch_checkpoint(str(tmp_path / 'missing.pth'), NAME)


def test_a_pickled_module_is_not_a_state_dict(torch_model, tmp_path):
  path = _save(torch_model, tmp_path / 'whole_model.pth')
  with pytest.raises(convert.CheckpointError, match='allow_pickle'):
    convert.load_torch_checkpoint(path, NAME)
  with pytest.raises(convert.CheckpointError, match='not a state_dict'):
    convert.load_torch_checkpoint(path, NAME, allow_pickle=True)


def test_unknown_model_fails_before_reading(tmp_path):
  with pytest.raises(ValueError, match='Unknown model'):
    convert.load_torch_checkpoint(str(tmp_path / 'nothing.pth'), 'ghostnet_7')


def test_to_torch_state_dict_checks_the_layout(reference):
  with pytest.raises(convert.CheckpointError, match='does not match'):
    convert.to_torch_state_dict(reference, 'ghostnet_100')


def test_cli_writes_a_restorable_orbax_checkpoint(state_dict, reference,
                                                  tmp_path):
  src = _save({'state_dict': state_dict}, tmp_path / 'in.pth.tar')
  out = tmp_path / 'converted'
  cmd = [sys.executable, '-m', 'ghostnet_jax.convert', '--model', NAME,
         '--torch-checkpoint', src, '--output', str(out)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       check=False)
  assert run.returncode == 0, run.stderr
  assert '2,587,292 parameters' in run.stdout
  variables, metadata = checkpoint.restore_converted(out)
  assert metadata['model'] == NAME
  assert _leaves_equal(variables, reference)

  # A second conversion into the same directory is refused, and the first
  # checkpoint is left as it was.
  before = sorted(p.name for p in out.rglob('*'))
  again = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         check=False)
  assert again.returncode == 2 and 'not empty' in again.stderr
  assert sorted(p.name for p in out.rglob('*')) == before


def test_cli_reports_a_bad_file_without_traceback(tmp_path):
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a checkpoint')
  run = subprocess.run(
      [sys.executable, '-m', 'ghostnet_jax.convert', '--model', NAME,
       '--torch-checkpoint', str(bad), '--output', str(tmp_path / 'out')],
      capture_output=True, text=True, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run.returncode == 2
  assert 'Traceback' not in run.stderr
  assert 'not a PyTorch checkpoint' in run.stderr
  assert not (tmp_path / 'out').exists()


def test_flipped_bytes_are_never_loaded_silently(state_dict, reference,
                                                 tmp_path):
  """A bit flip anywhere in the file is refused (zip checksums, pickle
  structure) or, where it cannot matter, loads the exact same weights."""
  good = _save(state_dict, tmp_path / 'good.pth')
  data = bytearray(open(good, 'rb').read())
  rs = np.random.RandomState(0)
  outcomes = {'refused': 0, 'identical': 0}
  for trial, pos in enumerate(rs.randint(0, len(data), size=40)):
    flipped = bytearray(data)
    flipped[pos] ^= 1 << rs.randint(8)
    path = tmp_path / f'flip{trial}.pth'
    path.write_bytes(bytes(flipped))
    try:
      got = convert.load_torch_checkpoint(str(path), NAME)
    except convert.CheckpointError:
      outcomes['refused'] += 1
    else:
      assert _leaves_equal(got, reference), f'byte {pos} changed the weights'
      outcomes['identical'] += 1
  assert outcomes['refused'] >= 30, outcomes
