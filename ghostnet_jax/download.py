"""Verified, resumable downloads into the weight cache.

``fetch(url, dest)`` downloads ``url`` to ``dest`` through ``dest + '.part'``
with a progress bar, resumes a partial file with an HTTP ``Range`` request,
retries failed transfers, and checks the byte size and SHA-256 (full or a
published prefix) before the file takes its final name. The SHA-256 of every
completed download is kept in ``dest + '.sha256'``, so a cache entry that was
later damaged is noticed and fetched again, never used.

The cache root is ``$GHOSTNET_JAX_CACHE`` or ``~/.cache/ghostnet_jax``;
``GHOSTNET_JAX_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) forbids network access.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

CACHE_ENV = 'GHOSTNET_JAX_CACHE'
OFFLINE_ENV = 'GHOSTNET_JAX_OFFLINE'
CHUNK = 1 << 16


class DownloadError(OSError):
  """A download that failed or produced a file that is not the published one."""


class ChecksumError(DownloadError):
  """The downloaded bytes are not the published ones (size or SHA-256)."""


class OfflineError(DownloadError):
  """Network access is off and the file is not in the cache."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
  """``cache_dir``, else ``$GHOSTNET_JAX_CACHE``, else ``~/.cache/ghostnet_jax``."""
  if cache_dir is not None:
    return os.path.abspath(os.fspath(cache_dir))
  env = os.environ.get(CACHE_ENV)
  if env:
    return os.path.abspath(env)
  return os.path.join(os.path.expanduser('~'), '.cache', 'ghostnet_jax')


def is_offline() -> bool:
  return any(os.environ.get(v, '').strip().lower() in ('1', 'true', 'yes', 'on')
             for v in (OFFLINE_ENV, 'HF_HUB_OFFLINE'))


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def verify_file(path: str, *, sha256: str | None = None,
                sha256_prefix: str | None = None,
                size: int | None = None) -> str:
  """Checks ``path`` against the published size / SHA-256 (or its prefix).

  Returns:
    The file's SHA-256.

  Raises:
    ChecksumError: naming the file and what differs.
  """
  actual_size = os.path.getsize(path)
  if size is not None and actual_size != size:
    raise ChecksumError(f'{path} has {actual_size} bytes; the published file '
                        f'has {size} (truncated or a different file).')
  digest = sha256_of(path)
  if sha256 is not None and digest != sha256.lower():
    raise ChecksumError(f'{path}: SHA-256 {digest} does not match the '
                        f'published {sha256.lower()}.')
  if sha256_prefix is not None and not digest.startswith(sha256_prefix.lower()):
    raise ChecksumError(f'{path}: SHA-256 {digest} does not start with the '
                        f'published prefix {sha256_prefix.lower()}.')
  return digest


def cached_ok(dest: str, **expected) -> bool:
  """Whether ``dest`` is a complete, undamaged cache entry.

  A file with a published hash is checked against it; otherwise against the
  SHA-256 recorded when it was downloaded (``dest.sha256``). A file put there
  by hand with neither is accepted (and its hash recorded).
  """
  if not os.path.isfile(dest):
    return False
  try:
    digest = verify_file(dest, **expected)
  except ChecksumError as e:
    print(f'ghostnet_jax: cached file is damaged, fetching it again: {e}',
          file=sys.stderr)
    return False
  record = dest + '.sha256'
  if os.path.exists(record):
    with open(record) as f:
      recorded = f.read().strip()
    if recorded and recorded != digest:
      print(f'ghostnet_jax: cached file {dest} changed since it was '
            f'downloaded (SHA-256 {digest}, recorded {recorded}); fetching it '
            'again.', file=sys.stderr)
      return False
  else:
    _write_record(dest, digest)
  return True


def _write_record(dest: str, digest: str) -> None:
  with open(dest + '.sha256', 'w') as f:
    f.write(digest + '\n')


def _progress(total: int | None, initial: int, desc: str, enabled: bool):
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
    return None
  return tqdm(total=total, initial=initial, unit='B', unit_scale=True,
              unit_divisor=1024, desc=desc, disable=not enabled,
              file=sys.stderr, leave=False)


def _transfer(url: str, part: str, timeout: float, progress: bool) -> int:
  """One attempt: appends to ``part`` (resuming) until the server is done.

  Returns:
    The total size the server announced (or the bytes received if unknown).
  """
  have = os.path.getsize(part) if os.path.exists(part) else 0
  request = urllib.request.Request(url, headers={'User-Agent': 'ghostnet-jax'})
  if have:
    request.add_header('Range', f'bytes={have}-')
  try:
    response = urllib.request.urlopen(request, timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # Range not satisfiable: we may have it all.
      return have
    raise
  with response:
    status = getattr(response, 'status', 200)
    length = response.headers.get('Content-Length')
    length = int(length) if length is not None else None
    if have and status == 206:
      mode, start = 'ab', have
    else:  # The server ignored the range: start over.
      mode, start = 'wb', 0
    total = None if length is None else start + length
    bar = _progress(total, start, os.path.basename(part[:-5]), progress)
    received = 0
    try:
      with open(part, mode) as f:
        while True:
          block = response.read(CHUNK)
          if not block:
            break
          f.write(block)
          received += len(block)
          if bar is not None:
            bar.update(len(block))
    finally:
      if bar is not None:
        bar.close()
  if length is not None and received < length:
    raise DownloadError(f'{url}: connection closed after {start + received} of '
                        f'{total} bytes.')
  return total if total is not None else start + received


def fetch(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
          sha256_prefix: str | None = None, size: int | None = None,
          retries: int = 3, timeout: float = 60.0, progress: bool = True,
          backoff: float = 1.0) -> str:
  """Downloads ``url`` to ``dest`` unless a verified copy is already there.

  Args:
    url: http(s) URL.
    dest: final path of the file (its folder is created).
    sha256, sha256_prefix, size: what the published file is known to be.
    retries: attempts after the first one; each resumes the partial file.
    timeout: socket timeout per attempt, seconds.
    progress: show a progress bar on stderr.
    backoff: seconds before the first retry (doubled each time).

  Returns:
    ``dest`` as a string.

  Raises:
    OfflineError: offline mode and no cached copy (says where to put it).
    ChecksumError: the downloaded bytes are not the published ones (the
      download is deleted, nothing else is touched).
    DownloadError: the transfer kept failing.
  """
  dest = os.path.abspath(os.fspath(dest))
  expected = dict(sha256=sha256, sha256_prefix=sha256_prefix, size=size)
  if cached_ok(dest, **expected):
    return dest
  hint = (f'Download it yourself from {url} and put it at {dest} (the cache '
          f'is ${CACHE_ENV} or ~/.cache/ghostnet_jax), or pass the local '
          'file as source=.')
  if is_offline():
    raise OfflineError(f'Offline ({OFFLINE_ENV}/HF_HUB_OFFLINE set) and {dest} '
                       f'is not in the cache. {hint}')
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  part = dest + '.part'
  last_error: Exception | None = None
  for attempt in range(retries + 1):
    if attempt:
      time.sleep(backoff * 2 ** (attempt - 1))
    try:
      total = _transfer(url, part, timeout, progress)
    except urllib.error.HTTPError as e:
      last_error = e
      if e.code in (401, 403, 404, 410):
        break  # Retrying will not help.
      continue
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
      last_error = e
      continue
    got = os.path.getsize(part)
    if got != total:
      last_error = DownloadError(f'{url}: got {got} of {total} bytes.')
      continue
    try:
      digest = verify_file(part, **expected)
    except ChecksumError as e:
      os.remove(part)
      raise ChecksumError(f'Refusing the download of {url}: {e} Nothing was '
                          'cached.') from None
    if os.path.exists(dest):
      os.remove(dest)
    os.replace(part, dest)
    _write_record(dest, digest)
    return dest
  raise DownloadError(f'Could not download {url} after {attempt + 1} '
                      f'attempts ({last_error}). {hint}')
