"""Downloads into the weight cache, against a local HTTP server on 127.0.0.1."""

import hashlib
import os

import pytest

from ghostnet_jax import download
from weights_server import WeightsServer

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server(monkeypatch):
  for var in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('no_proxy', '127.0.0.1')
  monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  srv = WeightsServer()
  srv.files['/w.bin'] = DATA
  yield srv
  srv.close()


def _fetch(server, dest, **kwargs):
  kwargs.setdefault('timeout', 5)
  kwargs.setdefault('backoff', 0.01)
  return download.fetch(server.url('/w.bin'), dest, **kwargs)


def test_download_with_progress_and_verified_hash(server, tmp_path, capsys):
  dest = tmp_path / 'c' / 'w.bin'
  assert _fetch(server, dest, sha256=SHA, size=len(DATA)) == str(dest)
  assert dest.read_bytes() == DATA
  assert (tmp_path / 'c' / 'w.bin.sha256').read_text().strip() == SHA
  assert not os.path.exists(str(dest) + '.part')
  err = capsys.readouterr().err
  assert 'w.bin' in err and '%' in err  # the progress bar
  # Cached: a second fetch makes no request.
  n = len(server.log)
  _fetch(server, dest, sha256=SHA)
  assert len(server.log) == n


def test_transient_errors_are_retried(server, tmp_path):
  server.faults['/w.bin'] = {'fail': 2}
  dest = tmp_path / 'w.bin'
  _fetch(server, dest, sha256=SHA, retries=3)
  assert dest.read_bytes() == DATA
  assert len(server.log) == 3


def test_truncated_transfer_is_resumed_with_range(server, tmp_path):
  server.faults['/w.bin'] = {'truncate': 1}
  dest = tmp_path / 'w.bin'
  _fetch(server, dest, sha256=SHA)
  assert dest.read_bytes() == DATA
  assert server.log[0][1] is None
  assert server.log[1][1] == f'bytes={len(DATA) // 2}-'  # resumed


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
  dest = tmp_path / 'w.bin'
  (tmp_path / 'w.bin.part').write_bytes(DATA[:1000])
  _fetch(server, dest, sha256=SHA)
  assert dest.read_bytes() == DATA
  assert server.log == [('/w.bin', 'bytes=1000-')]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
  server.faults['/w.bin'] = {'no_range': True}
  dest = tmp_path / 'w.bin'
  (tmp_path / 'w.bin.part').write_bytes(b'x' * 1000)  # garbage prefix
  _fetch(server, dest, sha256=SHA)
  assert dest.read_bytes() == DATA


def test_always_truncated_download_fails_and_caches_nothing(server, tmp_path):
  server.faults['/w.bin'] = {'truncate': 100, 'no_range': True}
  dest = tmp_path / 'w.bin'
  with pytest.raises(download.DownloadError, match='w.bin'):
    _fetch(server, dest, retries=2)
  assert not dest.exists()
  assert len(server.log) == 3


def test_sha256_mismatch_is_refused(server, tmp_path):
  dest = tmp_path / 'w.bin'
  with pytest.raises(download.ChecksumError,
                     match=r'Refusing.*w\.bin.*SHA-256'):
    _fetch(server, dest, sha256='0' * 64)
  assert not dest.exists() and not os.path.exists(str(dest) + '.part')


def test_sha256_prefix_and_size_are_checked(server, tmp_path):
  _fetch(server, tmp_path / 'a.bin', sha256_prefix=SHA[:8])
  with pytest.raises(download.ChecksumError, match='prefix'):
    _fetch(server, tmp_path / 'b.bin', sha256_prefix='ffffffff'
           if not SHA.startswith('ffffffff') else '00000000')
  with pytest.raises(download.ChecksumError, match='bytes'):
    _fetch(server, tmp_path / 'c.bin', size=len(DATA) + 1)


def test_damaged_cache_entry_is_fetched_again(server, tmp_path, capsys):
  dest = tmp_path / 'w.bin'
  _fetch(server, dest)  # no published hash: the recorded one guards it
  damaged = bytearray(DATA)
  damaged[1234] ^= 0xFF
  dest.write_bytes(bytes(damaged))
  n = len(server.log)
  _fetch(server, dest)
  assert dest.read_bytes() == DATA
  assert len(server.log) == n + 1
  assert 'changed since it was downloaded' in capsys.readouterr().err


def test_offline_without_cache_names_url_and_place(server, tmp_path,
                                                   monkeypatch):
  monkeypatch.setenv(download.OFFLINE_ENV, '1')
  dest = tmp_path / 'w.bin'
  with pytest.raises(download.OfflineError) as e:
    _fetch(server, dest)
  assert server.url('/w.bin') in str(e.value) and str(dest) in str(e.value)
  assert server.log == []
  dest.write_bytes(DATA)  # put there by hand: used offline
  assert _fetch(server, dest, sha256=SHA) == str(dest)


def test_missing_file_is_not_retried(server, tmp_path):
  with pytest.raises(download.DownloadError, match='404'):
    download.fetch(server.url('/nope.bin'), tmp_path / 'n.bin', timeout=5,
                   backoff=0.01)
  assert len(server.log) == 1


def test_cache_root_precedence(tmp_path, monkeypatch):
  monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / 'env'))
  assert download.cache_root() == str(tmp_path / 'env')
  assert download.cache_root(tmp_path / 'arg') == str(tmp_path / 'arg')
  monkeypatch.delenv(download.CACHE_ENV)
  assert download.cache_root().endswith(os.path.join('.cache', 'ghostnet_jax'))
