"""``ghostnet_jax.runtime``: the malloc settings and the compilation cache.

Each check runs in a fresh Python process: the allocator settings and JAX's
cache configuration are process-wide.
"""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Page faults of the calls of a function with a 64 MB temporary, in the steady
# state: the median of calls 21-30. (Under CPU contention XLA may free a call's
# temporary after the next call allocated its own, so the heap grows for a few
# calls before the freed chunks are reused: seen for up to 7 calls in CI.)
_FAULTS = textwrap.dedent('''
    import resource, sys
    sys.path.insert(0, {repo!r})
    import ghostnet_jax
    from ghostnet_jax import runtime
    if {tune}:
      assert runtime.tune_malloc()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x * 2.0).sum(0))
    x = jnp.ones((4096, 4096), jnp.float32)
    f(x).block_until_ready()
    faults = []
    for _ in range(30):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults[20:])[5])
''')


_MALLOC_VARS = ('GHOSTNET_JAX_TUNE_MALLOC', 'MALLOC_ARENA_MAX',
                'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')


def _run(code: str, env: dict | None = None) -> str:
  """Runs ``code`` in a fresh process (no malloc variables unless given)."""
  full = {k: v for k, v in os.environ.items() if k not in _MALLOC_VARS}
  full.update(env or {})
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=300, check=False, env=full)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_tune_malloc_stops_page_faults_on_repeated_calls():
  off = {'GHOSTNET_JAX_TUNE_MALLOC': '0'}
  default = int(_run(_FAULTS.format(repo=REPO, tune=False), off))
  tuned = int(_run(_FAULTS.format(repo=REPO, tune=True), off))
  # The plain API: `import ghostnet_jax` applies the settings by itself.
  plain = int(_run(_FAULTS.format(repo=REPO, tune=False)))
  # 64 MB of fresh pages is ~16,000 faults: by default every call faults them
  # in again; with the settings the heap keeps them once its free space has
  # settled.
  assert default > 4000, default
  assert tuned < 500, tuned
  assert plain < 500, plain


_STATUS = textwrap.dedent('''
    import sys, warnings
    sys.path.insert(0, {repo!r})
    warnings.simplefilter('error', RuntimeWarning)
    if {jax_first}:
      import jax, jax.numpy as jnp
      jnp.zeros(2).block_until_ready()   # the backend and its threads start
    try:
      import ghostnet_jax
      print('no-warning', ghostnet_jax.runtime.import_status)
    except RuntimeWarning as w:
      print('warning', 'import ghostnet_jax before' in str(w))
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
@pytest.mark.parametrize('jax_first,env,want', [
    (False, {}, 'no-warning applied'),
    (True, {}, 'warning True'),
    (True, {'GHOSTNET_JAX_TUNE_MALLOC': '0'}, 'no-warning disabled'),
    (False, {'MALLOC_ARENA_MAX': '4'}, 'no-warning user'),
])
def test_import_tunes_malloc_or_says_why_not(jax_first, env, want):
  assert _run(_STATUS.format(repo=REPO, jax_first=jax_first), env) == want


_FLAGS = textwrap.dedent('''
    import os, sys, warnings
    sys.path.insert(0, {repo!r})
    warnings.simplefilter('error', RuntimeWarning)
    if {jax_first}:
      import jax, jax.numpy as jnp
      jnp.zeros(2).block_until_ready()   # XLA has read XLA_FLAGS
    try:
      import ghostnet_jax
      print('no-warning', ghostnet_jax.runtime.xla_flags_status,
            os.environ.get('XLA_FLAGS', ''))
    except RuntimeWarning as w:
      print('warning', 'XLA:CPU flags' in str(w))
''')


@pytest.mark.parametrize('jax_first,env,want', [
    (False, {}, 'no-warning off'),
    (False, {'GHOSTNET_JAX_XLA_FLAGS': '1'},
     'no-warning applied --xla_cpu_use_fusion_emitters=false'),
    (False, {'GHOSTNET_JAX_XLA_FLAGS': '1',
             'XLA_FLAGS': '--xla_cpu_use_fusion_emitters=true'},
     'no-warning user --xla_cpu_use_fusion_emitters=true'),
    (False, {'GHOSTNET_JAX_XLA_FLAGS': '1',
             'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
     'no-warning applied --xla_force_host_platform_device_count=2 '
     '--xla_cpu_use_fusion_emitters=false'),
    (True, {'GHOSTNET_JAX_TUNE_MALLOC': '0', 'GHOSTNET_JAX_XLA_FLAGS': '1'},
     'warning True'),
])
def test_import_sets_xla_flags_or_says_why_not(jax_first, env, want):
  env = {'XLA_FLAGS': '', 'GHOSTNET_JAX_XLA_FLAGS': '0', **env}
  assert _run(_FLAGS.format(repo=REPO, jax_first=jax_first), env) == want


def test_compilation_cache_is_written_and_reused(tmp_path):
  code = textwrap.dedent(f'''
      import os, sys
      sys.path.insert(0, {REPO!r})
      from ghostnet_jax import runtime
      path = runtime.enable_compilation_cache({str(tmp_path)!r},
                                              min_compile_time_s=0)
      import jax, jax.numpy as jnp
      print(float(jax.jit(lambda x: jnp.cos(x).sum())(jnp.arange(3.0))))
      print(len(os.listdir(path)))
  ''')
  first = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, timeout=300, check=False)
  assert first.returncode == 0, first.stderr
  assert int(first.stdout.split()[-1]) >= 1
  second = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300, check=False)
  assert second.stdout.split()[-2] == first.stdout.split()[-2]


def test_compilation_cache_default_dir_and_opt_out(tmp_path):
  code = textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {REPO!r})
      from ghostnet_jax import runtime
      import jax
      path = runtime.enable_compilation_cache()
      print(path, jax.config.jax_compilation_cache_dir)
  ''')
  on = _run(code, {'GHOSTNET_JAX_CACHE_DIR': str(tmp_path / 'xla')})
  assert on.split() == [str(tmp_path / 'xla')] * 2
  off = _run(code, {'GHOSTNET_JAX_CACHE_DIR': 'off'})
  assert off.split()[0] == 'None' and off.split()[1] != str(tmp_path / 'xla')
