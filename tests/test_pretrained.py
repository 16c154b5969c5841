"""load_pretrained: timm's Hub files through a fake Hugging Face cache (offline),
local files and URLs, the converted copy, and bad sources.

timm models with random weights and BN statistics are the reference; their
state_dicts are saved as ``model.safetensors`` into a cache laid out as
huggingface_hub lays it out (``models--ORG--REPO/{refs,snapshots,blobs}``).
"""

import dataclasses
import hashlib
import os
import pathlib

import numpy as np
import pytest
import torch

import ghostnet_jax
from ghostnet_jax import convert, download, pretrained, sources
from ghostnet_jax.testing.torch_reference import (compiled_apply, nchw, randomize_torch_model,
                             relative_error)
from weights_server import WeightsServer

NAME = 'ghostnet_100'
PINNED = '700dcdf6314c1b68f170e6ba1ee85ee94e5b37b5'


def _timm_reference(timm, name, seed, size=64, batch=2):
  model = timm.create_model(name, pretrained=False).eval()
  if name.startswith('ghostnetv3'):
    # Independent random statistics make GhostNetV3 chaotic; condition it
    # as test_ghostnetv3.py does, at the test resolution.
    from test_ghostnetv3 import condition_torch_model
    condition_torch_model(model, size, seed)
  else:
    randomize_torch_model(model, seed)
  x = np.random.RandomState(seed).randn(batch, size, size, 3).astype(
      np.float32)
  with torch.no_grad():
    logits = model(nchw(x)).numpy()
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return sd, x, logits


def put_in_hf_cache(hub_cache, repo, files, commit):
  """Lays ``files`` out as huggingface_hub does: blobs named by SHA-256,
  ``snapshots/<commit>/<file>`` relative symlinks, ``refs/main``."""
  folder = os.path.join(hub_cache, 'models--' + repo.replace('/', '--'))
  os.makedirs(os.path.join(folder, 'blobs'), exist_ok=True)
  os.makedirs(os.path.join(folder, 'refs'), exist_ok=True)
  snap = os.path.join(folder, 'snapshots', commit)
  os.makedirs(snap, exist_ok=True)
  for fname, data in files.items():
    blob = hashlib.sha256(data).hexdigest()
    with open(os.path.join(folder, 'blobs', blob), 'wb') as f:
      f.write(data)
    os.symlink(os.path.join('..', '..', 'blobs', blob),
               os.path.join(snap, fname))
  with open(os.path.join(folder, 'refs', 'main'), 'w') as f:
    f.write(commit)
  return folder


def _safetensors_bytes(sd, tmp_path):
  from safetensors.numpy import save_file
  path = tmp_path / 'model.safetensors'
  save_file(sd, str(path))
  return path.read_bytes()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty HF cache, offline (env and huggingface_hub's constants)."""
  from huggingface_hub import constants
  hub = tmp_path / 'hf'
  hub.mkdir()
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', str(hub))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(hub))
  return str(hub)


@pytest.fixture(scope='module')
def reference(timm):
  return _timm_reference(timm, NAME, 3)


@pytest.fixture
def hub_file(reference, offline_hub, tmp_path):
  sd, _, _ = reference
  data = _safetensors_bytes(sd, tmp_path)
  put_in_hf_cache(offline_hub, 'timm/ghostnet_100.in1k',
                  {'model.safetensors': data, 'config.json': b'{}'}, PINNED)
  return data


def _check(variables, name, reference, **create_kwargs):
  _, x, logits = reference
  out = compiled_apply(name, **create_kwargs)(variables, x)
  err = relative_error(out, logits)
  assert err <= 1e-4, err
  return err


def test_hub_file_offline_matches_timm_and_is_kept_converted(
    hub_file, reference, tmp_path, monkeypatch):
  del hub_file
  cache = tmp_path / 'cache'
  variables = ghostnet_jax.load_pretrained(
      NAME, 'hf-hub:timm/ghostnet_100.in1k', cache_dir=cache)
  _check(variables, NAME, reference)
  converted = list((cache / 'converted' / NAME).iterdir())
  assert len(converted) == 1
  # The second load restores the orbax copy: no file, no reader needed.
  def unavailable(*args, **kwargs):
    raise AssertionError('the converted copy should have been used')
  monkeypatch.setattr(pretrained, '_local_file', unavailable)
  monkeypatch.setattr(pretrained, 'read_state_dict', unavailable)
  again = ghostnet_jax.load_pretrained(
      NAME, 'hf-hub:timm/ghostnet_100.in1k', cache_dir=cache)
  np.testing.assert_array_equal(
      np.asarray(again['params']['classifier']['kernel']),
      np.asarray(variables['params']['classifier']['kernel']))


def test_registered_hub_source_checks_the_published_sha256(hub_file,
                                                           tmp_path):
  del hub_file  # random weights: not the published file
  assert sources.default_source(NAME).tag == 'timm'
  with pytest.raises(download.ChecksumError, match='model.safetensors'):
    ghostnet_jax.load_pretrained(NAME, cache_dir=tmp_path / 'cache')


def test_damaged_hub_blob_is_refused(hub_file, offline_hub, tmp_path):
  """The Hub cache names blobs by SHA-256: a damaged one is noticed even
  where it still parses and no hash is registered."""
  del hub_file
  blobs = pathlib.Path(offline_hub) / 'models--timm--ghostnet_100.in1k' / 'blobs'
  blob = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
  data = bytearray(blob.read_bytes())
  data[-5] ^= 0xFF  # inside the last tensor's bytes
  blob.write_bytes(bytes(data))
  with pytest.raises(download.ChecksumError, match='damaged'):
    ghostnet_jax.load_pretrained(NAME, 'hf-hub:timm/ghostnet_100.in1k',
                                 cache_dir=tmp_path / 'cache')


def test_damaged_converted_copy_is_rebuilt(hub_file, reference, tmp_path,
                                           capsys):
  del hub_file
  cache = tmp_path / 'cache'
  src = 'hf-hub:timm/ghostnet_100.in1k'
  ghostnet_jax.load_pretrained(NAME, src, cache_dir=cache)
  (copy,) = (cache / 'converted' / NAME).iterdir()
  victims = [p for p in copy.rglob('*') if p.is_file()]
  assert victims
  for p in victims:  # damage every stored file
    p.write_bytes(b'\0' * 10)
  variables = ghostnet_jax.load_pretrained(NAME, src, cache_dir=cache)
  assert 'unusable' in capsys.readouterr().err
  _check(variables, NAME, reference)


def test_local_files_and_urls(reference, tmp_path, monkeypatch):
  for var in ('http_proxy', 'HTTP_PROXY'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  sd, _, _ = reference
  st = _safetensors_bytes(sd, tmp_path)
  pth = tmp_path / 'weights.pth'
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in sd.items()}},
             pth)
  server = WeightsServer()
  try:
    server.files['/x/model.safetensors'] = st
    url = server.url('/x/model.safetensors')
    cache = tmp_path / 'cache'
    from_url = ghostnet_jax.load_pretrained(NAME, url, cache_dir=cache)
    assert len(server.log) == 1
    from_pth = ghostnet_jax.load_pretrained(NAME, str(pth), cache_dir=cache)
  finally:
    server.close()
  for variables in (from_url, from_pth):
    _check(variables, NAME, reference)


def test_bad_sources_get_clear_errors(reference, tmp_path, offline_hub):
  with pytest.raises(ValueError, match="Unknown source 'nope'.*timm"):
    pretrained.resolve_source(NAME, 'nope')
  # A registered source that does not load exactly is refused, with why.
  tf_src = sources.get_source(NAME, 'tf')
  unloadable = dataclasses.replace(tf_src, loadable=False,
                                   notes='no exact mapping')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sources, '_SOURCES', tuple(
        unloadable if s is tf_src else s for s in sources._SOURCES))  # pylint: disable=protected-access
    with pytest.raises(ValueError, match='not loadable.*no exact mapping'):
      pretrained.resolve_source(NAME, 'tf')
  with pytest.raises(ValueError, match='Unknown model'):
    ghostnet_jax.load_pretrained('ghostnet_999')
  with pytest.raises(FileNotFoundError):
    ghostnet_jax.load_pretrained(NAME, str(tmp_path / 'missing.pth'))
  # A file of another model.
  sd, _, _ = reference
  path = tmp_path / 'other.safetensors'
  path.write_bytes(_safetensors_bytes(sd, tmp_path))
  with pytest.raises(convert.CheckpointError) as e:
    ghostnet_jax.load_pretrained('ghostnet_130', str(path),
                                 cache_dir=tmp_path / 'c')
  assert str(path) in str(e.value) and 'ghostnet_100' in str(e.value)
  # Offline and not cached: the URL and where to put the file.
  with pytest.raises(download.OfflineError) as e:
    ghostnet_jax.load_pretrained('ghostnet_050', cache_dir=tmp_path / 'c')
  assert 'GhostNet_x0_5_pretrained.pdparams' in str(e.value)
  assert str(tmp_path / 'c' / 'downloads') in str(e.value)
  with pytest.raises(download.OfflineError, match='ghostnetv2_100.in1k'):
    ghostnet_jax.load_pretrained('ghostnetv2_100', 'timm',
                                 cache_dir=tmp_path / 'c')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ghostnetv2_100', 'ghostnetv3_100'])
def test_registered_hub_sources_v2_v3(name, timm, offline_hub, tmp_path):
  # GhostNetV3 at the resolution test_ghostnetv3.py checks it at.
  size, batch = (224, 1) if name.startswith('ghostnetv3') else (64, 2)
  sd, x, logits = _timm_reference(timm, name, 5, size, batch)
  put_in_hf_cache(offline_hub, f'timm/{name}.in1k',
                  {'model.safetensors': _safetensors_bytes(sd, tmp_path)},
                  'a' * 40)
  variables = ghostnet_jax.load_pretrained(name, 'timm',
                                           cache_dir=tmp_path / 'c')
  # GhostNetV3 sums up to 5 branches per layer: compare with the same
  # lowering as test_ghostnetv3.py.
  _check(variables, name, (sd, x, logits), conv_impl='lax')


def test_every_registered_source_names_a_known_model_and_format():
  for s in sources.list_sources():
    assert s.model in ghostnet_jax.list_models()
    assert s.format in sources.FORMATS
    assert s.top1 is not None and s.preprocess
    if s.loadable:
      assert s.layout in pretrained.weight_mappings.LAYOUTS
  assert sources.default_source('ghostnet_130').tag == 'paddle_ssld'
  assert sources.default_source('ghost_resnet50_s2') is None
