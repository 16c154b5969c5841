"""PaddleClas and mindcv weight files, built by the real frameworks, load exactly.

The reference networks run in a subprocess (``weights_reference_worker.py``)
under the Python of the test-only environment ``.venv-weights`` (paddlepaddle,
mindspore, paddleclas, mindcv; see ``requirements-weights-test.txt``), or
``$GHOSTNET_WEIGHTS_PYTHON``. Without it these tests are skipped; the readers
themselves are covered by test_weight_readers.py on files built from the
documented formats.
"""

import dataclasses
import hashlib
import functools
import os
import subprocess

import numpy as np
import pytest

import ghostnet_jax
from ghostnet_jax import download, sources
import extras
from ghostnet_jax.testing.torch_reference import compiled_apply, relative_error
from weights_server import WeightsServer

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'weights_reference_worker.py')


@functools.lru_cache(maxsize=None)
def _python(module: str) -> str | None:
  """A Python that can import ``module`` (the frameworks need their own venv:
  mindspore 2.10 is built against NumPy 1.x)."""
  candidates = [os.environ.get('GHOSTNET_WEIGHTS_PYTHON'),
                os.path.join(os.path.dirname(HERE), '.venv-weights', 'bin',
                             'python')]
  for exe in candidates:
    if exe and os.path.exists(exe):
      probe = subprocess.run(
          [exe, '-c', f'import importlib.util as u; '
           f'assert u.find_spec({module!r})'], capture_output=True, timeout=60)
      if probe.returncode == 0:
        return exe
  return None


def _build(kind: str, arg: str, module: str, out) -> dict:
  exe = _python(module)
  if exe is None:
    extras.missing(f'{module} is not installed (.venv-weights or '
                   '$GHOSTNET_WEIGHTS_PYTHON; bash setup.sh --test); see '
                   'requirements-weights-test.txt')
  env = dict(os.environ, PYTHONPATH='', GLOG_v='3', GLOG_minloglevel='3')
  done = subprocess.run([exe, WORKER, kind, arg, str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  io = np.load(os.path.join(out, 'io.npz'))
  return {'x': io['x'], 'logits': io['logits']}


@pytest.mark.parametrize('name, scale', [
    ('ghostnet_050', '0.5'),
    pytest.param('ghostnet_130', '1.3', marks=pytest.mark.slow),
])
def test_paddleclas_pdparams_match_paddle(name, scale, tmp_path):
  ref = _build('paddle', scale, 'paddle', tmp_path)
  path = tmp_path / 'model.pdparams'
  variables = ghostnet_jax.load_pretrained(name, str(path),
                                           cache_dir=tmp_path / 'cache')
  out = compiled_apply(name)(variables, ref['x'])
  err = relative_error(out, ref['logits'])
  assert err <= 1e-4, err


def test_registered_paddle_source_downloads_verifies_and_converts(
    tmp_path, monkeypatch):
  """The default source of ghostnet_050 (PaddleClas), served from a local
  server with the file paddle.save wrote: download, verify, convert, keep."""
  ref = _build('paddle', '0.5', 'paddle', tmp_path)
  data = (tmp_path / 'model.pdparams').read_bytes()
  for var in ('http_proxy', 'HTTP_PROXY'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  server = WeightsServer()
  try:
    src = sources.default_source('ghostnet_050')
    assert src.tag == 'paddle'
    path = '/dygraph/' + src.file_name
    server.files[path] = data
    server.faults[path] = {'truncate': 1}  # one broken transfer, resumed

    local = dataclasses.replace(src, url=server.url(path),
                                sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(sources, '_SOURCES', tuple(
        local if s is src else s for s in sources._SOURCES))  # pylint: disable=protected-access
    cache = tmp_path / 'cache'
    variables = ghostnet_jax.load_pretrained('ghostnet_050', cache_dir=cache)
    assert [r for _, r in server.log] == [None, f'bytes={len(data) // 2}-']
    again = ghostnet_jax.load_pretrained('ghostnet_050', cache_dir=cache)
    assert len(server.log) == 2  # the converted copy, no new request
  finally:
    server.close()
  assert (cache / 'converted' / 'ghostnet_050' / 'paddle').is_dir()
  assert (cache / 'downloads' / 'ghostnet_050' / src.file_name).is_file()
  for v in (variables, again):
    out = compiled_apply('ghostnet_050')(v, ref['x'])
    assert relative_error(out, ref['logits']) <= 1e-4


def test_mindcv_ckpt_matches_mindspore(tmp_path):
  name = 'ghostnet_050'
  ref = _build('mindcv', name, 'mindspore', tmp_path)
  path = tmp_path / 'model.ckpt'
  from ghostnet_jax import weight_readers
  raw = weight_readers.read_mindspore_ckpt(path)
  assert any(k.startswith('moments.') for k in raw)  # optimizer state present
  variables = ghostnet_jax.load_pretrained(name, str(path),
                                           cache_dir=tmp_path / 'cache')
  out = compiled_apply(name)(variables, ref['x'])
  err = relative_error(out, ref['logits'])
  assert err <= 1e-4, err
