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

# Page faults of the calls of a function with a 64 MB temporary: the fewest
# over five calls after a warm-up call.
_FAULTS = textwrap.dedent('''
    import resource, sys
    sys.path.insert(0, {repo!r})
    from ghostnet_jax import runtime
    if {tune}:
      assert runtime.tune_malloc()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x * 2.0).sum(0))
    x = jnp.ones((4096, 4096), jnp.float32)
    f(x).block_until_ready()
    faults = []
    for _ in range(5):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults))
''')


def _run(code: str) -> str:
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_tune_malloc_stops_page_faults_on_repeated_calls():
  default = int(_run(_FAULTS.format(repo=REPO, tune=False)))
  tuned = int(_run(_FAULTS.format(repo=REPO, tune=True)))
  # 64 MB of fresh pages is ~16,000 faults: by default every call faults them
  # in again; with the settings the heap keeps them (some calls may still
  # fault while the heap's free space settles).
  assert default > 4000, default
  assert tuned < 500, tuned


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
