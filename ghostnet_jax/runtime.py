"""Process-wide settings that make the models faster to run and to start.

``import ghostnet_jax`` applies :func:`tune_malloc` itself (see
:func:`tune_malloc_at_import`): a user of the plain API
(``jax.jit(create_model(name).apply)``) gets the fast allocator settings
without knowing about them. Set ``GHOSTNET_JAX_TUNE_MALLOC=0`` to leave glibc
malloc alone. If JAX's backend is already running when the package is first
imported, the settings only partly apply and a ``RuntimeWarning`` says so:
import ``ghostnet_jax`` before the first JAX computation. With
``GHOSTNET_JAX_XLA_FLAGS=1`` it also adds :data:`CPU_XLA_FLAGS` to
``XLA_FLAGS`` (:func:`xla_flags_at_import`: faster training steps on the
CPU). ``train.py`` and ``eval.py`` also turn on the persistent compilation
cache.

Programs may call them explicitly, once at the top, before the first JAX
computation::

  from ghostnet_jax import runtime
  runtime.tune_malloc()                 # before JAX starts its threads
  runtime.enable_compilation_cache()    # reuse compiled steps across runs

:func:`tune_malloc` keeps XLA:CPU's per-call buffers in glibc's heap. Every
call of a compiled function allocates its temporary buffer (about 160 MB for a
GhostNet-1.0x forward at batch 32) from an XLA worker thread. glibc serves a
request that large from ``mmap`` (a worker thread's arena cannot hold it, and
it is above the mmap threshold), and returns it with ``munmap`` after the
call, so the next call faults every page in again: ~40,000 page faults and a
fifth of the CPU time of an inference call. One arena, a high mmap threshold
and a high trim threshold keep the memory mapped between calls. The cost is
that freed memory is not returned to the system while the process lives (its
peak resident size stays reserved). Equivalent environment variables, for
programs that cannot call this early enough::

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=2147483647 \\
  MALLOC_TRIM_THRESHOLD_=2147483647 python train.py

:func:`enable_compilation_cache` turns on JAX's persistent compilation cache:
a second run of the same step on the same machine and versions loads the
executable instead of compiling it (a GhostNet training step takes 15-20 s of
CPU to compile).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys
import warnings

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

CACHE_ENV = 'GHOSTNET_JAX_CACHE_DIR'
TUNE_ENV = 'GHOSTNET_JAX_TUNE_MALLOC'
# glibc reads these at start-up; a user who set one chose the allocator.
_MALLOC_ENV = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_',
               'MALLOC_TRIM_THRESHOLD_')
_OFF = ('0', 'false', 'no', 'off', '')
# What tune_malloc_at_import did: None before it ran, then one of
# 'applied', 'late' (applied after JAX's backend started: partly effective),
# 'disabled' (GHOSTNET_JAX_TUNE_MALLOC=0), 'user' (MALLOC_* variables set),
# 'unavailable' (not glibc).
import_status: str | None = None


def _libc():
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  return libc


def tune_malloc(arenas: int = 1, mmap_threshold: int = _INT_MAX,
                trim_threshold: int = _INT_MAX) -> bool:
  """Keeps large, short-lived buffers in glibc's heap (module docstring).

  Must run before JAX creates its thread pools (before the first JAX
  computation) to affect XLA's worker threads. A no-op off glibc.

  Args:
    arenas: ``M_ARENA_MAX``; 1 makes every thread allocate from the main
      arena, which (unlike a thread arena) can grow beyond 64 MB.
    mmap_threshold: ``M_MMAP_THRESHOLD`` in bytes (at most 2**31 - 1):
      requests below it come from the heap, not from ``mmap``.
    trim_threshold: ``M_TRIM_THRESHOLD`` in bytes: free memory at the top of
      the heap up to this size is kept, not returned to the system.

  Returns:
    True when glibc accepted all three settings.
  """
  libc = _libc()
  if libc is None:
    return False
  ok = libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1
  ok &= libc.mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold), _INT_MAX)) == 1
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, min(int(trim_threshold), _INT_MAX)) == 1
  return bool(ok)


def jax_backend_started() -> bool:
  """True when JAX has created a backend (and with it XLA's thread pools)."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(xla_bridge, '_backends', None))


def tune_malloc_at_import() -> str:
  """:func:`tune_malloc` for ``import ghostnet_jax``; returns what it did.

  Skipped when ``GHOSTNET_JAX_TUNE_MALLOC`` is ``0``/``false``/``off`` or
  when any of ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_`` is set (the user chose). When JAX's backend
  already runs, XLA's worker threads keep the arenas they have: the
  thresholds still apply, the single arena does not, and a
  ``RuntimeWarning`` names the fix. The result is also kept in
  :data:`import_status`.
  """
  global import_status
  if os.environ.get(TUNE_ENV, '1').strip().lower() in _OFF:
    status = 'disabled'
  elif any(k in os.environ for k in _MALLOC_ENV):
    status = 'user'
  else:
    late = jax_backend_started()
    if not tune_malloc():
      status = 'unavailable'
    elif late:
      status = 'late'
      warnings.warn(
          'ghostnet_jax was imported after JAX started its backend, so its '
          'malloc tuning only partly applies (XLA:CPU calls may run up to '
          '~20% slower): import ghostnet_jax before the first JAX '
          'computation, or start Python with MALLOC_ARENA_MAX=1 '
          'MALLOC_MMAP_THRESHOLD_=2147483647 '
          'MALLOC_TRIM_THRESHOLD_=2147483647; set '
          f'{TUNE_ENV}=0 to silence this.', RuntimeWarning, stacklevel=3)
    else:
      status = 'applied'
  import_status = status
  return status


# XLA:CPU flags applied at import on request (xla_flags_at_import), measured
# on jaxlib 0.10 (BENCHMARKS.md): XLA's older loop-fusion emitters run a
# GhostNet training step 9-50% faster than the new ones (ghostnet_100 batch
# 32: 33.7 -> 42.9 img/s; inference unchanged) but compile V3 and G-Ghost
# steps ~40% slower and round differently (1 vs 8 devices after two training
# steps: 3.5e-6 apart instead of 1.2e-7), so they are opt-in for now.
XLA_FLAGS_ENV = 'GHOSTNET_JAX_XLA_FLAGS'
CPU_XLA_FLAGS = ('--xla_cpu_use_fusion_emitters=false',)
_FLAGS_JAXLIB = '0.10.'  # the jaxlib releases these flags were measured on

# What xla_flags_at_import did (None before it ran): 'applied', 'late',
# 'off' (not requested), 'user' (XLA_FLAGS already sets them), 'untested'
# (another jaxlib, whose XLA may not know the flags: an unknown flag aborts
# XLA).
xla_flags_status: str | None = None


def _jaxlib_is(prefix: str) -> bool:
  """True when the installed jaxlib's version starts with ``prefix``."""
  try:
    return importlib.metadata.version('jaxlib').startswith(prefix)
  except importlib.metadata.PackageNotFoundError:
    return False


def xla_flags_at_import() -> str:
  """Adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` when
  ``GHOSTNET_JAX_XLA_FLAGS=1``.

  XLA reads ``XLA_FLAGS`` when JAX starts its first backend, so this must
  run before the first JAX computation; when it is too late a
  ``RuntimeWarning`` says so. Skipped unless requested, when ``XLA_FLAGS``
  already names a flag (the user chose), and on jaxlib releases other than
  the measured one. Returns what it did (also kept in
  :data:`xla_flags_status`).
  """
  global xla_flags_status
  current = os.environ.get('XLA_FLAGS', '')
  names = [f.split('=')[0] for f in CPU_XLA_FLAGS]
  if os.environ.get(XLA_FLAGS_ENV, '0').strip().lower() in _OFF:
    status = 'off'
  elif any(n in current for n in names):
    status = 'user'
  elif not _jaxlib_is(_FLAGS_JAXLIB):
    status = 'untested'
  else:
    os.environ['XLA_FLAGS'] = ' '.join([current, *CPU_XLA_FLAGS]).strip()
    status = 'applied'
    if jax_backend_started():
      status = 'late'
      warnings.warn(
          'ghostnet_jax was imported after JAX started its backend, so its '
          f'XLA:CPU flags ({" ".join(CPU_XLA_FLAGS)}) do not apply (training '
          'steps run up to ~30% slower): import ghostnet_jax before the '
          'first JAX computation, or start Python with XLA_FLAGS='
          f'"{" ".join(CPU_XLA_FLAGS)}".', RuntimeWarning, stacklevel=3)
  xla_flags_status = status
  return status


def default_cache_dir() -> str:
  """``$GHOSTNET_JAX_CACHE_DIR``, else ``~/.cache/ghostnet_jax/xla``."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser('~'), '.cache', 'ghostnet_jax', 'xla')


def enable_compilation_cache(path: str | None = None,
                             min_compile_time_s: float = 1.0) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory.

  ``train.py`` and ``eval.py`` call this by default. Setting
  ``GHOSTNET_JAX_CACHE_DIR=off`` (or ``0``) turns it off: nothing is
  changed and None is returned. A cache directory the user already gave JAX
  (``jax_compilation_cache_dir``, e.g. ``JAX_COMPILATION_CACHE_DIR``) is
  kept when ``path`` is None.

  Args:
    path: cache directory (created if needed); default
      :func:`default_cache_dir`.
    min_compile_time_s: only executables that took at least this long to
      compile are stored.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if path is None and os.environ.get(CACHE_ENV, 'x').strip().lower() in _OFF:
    return None
  if path is None and jax.config.jax_compilation_cache_dir:
    path = jax.config.jax_compilation_cache_dir
  path = os.path.abspath(path or default_cache_dir())
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(min_compile_time_s))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
