"""Compiles the depthwise convolution kernels into the package.

Usage::

  python -m ghostnet_jax.kernels.build            # in place, next to this file
  python -m ghostnet_jax.kernels.build --out DIR  # somewhere else

Builds ``depthwise.cc`` against the XLA FFI headers shipped with the installed
``jaxlib`` (``jax.ffi.include_dir()``), with the machine's C++ compiler
(``$CXX``, else ``g++``, else ``c++``), into ``_depthwise_cpu.so``. By default
the code is tuned for this machine (``-march=native``): build on the machine
that runs it, or pass ``--march x86-64-v3`` (or similar) for a portable build.
Prints the command it runs; exits non-zero with the compiler's output when
compilation fails.

This module imports neither jax nor the rest of the package, so ``setup.py``
can load it by path at install time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys

SOURCE = 'depthwise.cc'
LIBRARY = '_depthwise_cpu.so'
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildError(RuntimeError):
  """Compilation failed; the message holds the command and compiler output."""


def include_dir() -> str:
  """The XLA FFI headers of the installed jaxlib (no jax import needed)."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    raise BuildError('jaxlib is not installed: the kernels need its XLA FFI '
                     'headers (jaxlib/include). Install jax first.')
  for location in spec.submodule_search_locations:
    path = os.path.join(location, 'include')
    if os.path.exists(os.path.join(path, 'xla', 'ffi', 'api', 'ffi.h')):
      return path
  raise BuildError('jaxlib has no include/xla/ffi/api/ffi.h; jaxlib too old?')


def find_compiler() -> str:
  for cxx in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if cxx and shutil.which(cxx):
      return cxx
  raise BuildError('No C++ compiler found (set $CXX, or install g++).')


def compile_command(out_path: str, cxx: str | None = None,
                    march: str | None = 'native') -> list[str]:
  """The compiler command line that builds ``out_path``."""
  cmd = [cxx or find_compiler(), '-O3', '-std=c++17', '-fPIC', '-shared',
         '-pthread', '-ffp-contract=fast', '-Wall', '-Wextra']
  if march:
    cmd.append(f'-march={march}')
  cmd += ['-isystem', include_dir(), os.path.join(HERE, SOURCE), '-o', out_path]
  return cmd


def build(out_dir: str | None = None, cxx: str | None = None,
          march: str | None = 'native', verbose: bool = True) -> str:
  """Compiles the kernels; returns the path of the shared library.

  The library is written to a temporary name and renamed into place, so a
  process that has the old one loaded is not disturbed.

  Raises:
    BuildError: with the command and the compiler's output, on failure.
  """
  out_dir = os.path.abspath(out_dir or HERE)
  os.makedirs(out_dir, exist_ok=True)
  out_path = os.path.join(out_dir, LIBRARY)
  tmp_path = os.path.join(out_dir, f'{LIBRARY[:-3]}.tmp{os.getpid()}.so')
  cmd = compile_command(tmp_path, cxx=cxx, march=march)
  if verbose:
    print('ghostnet_jax.kernels.build:', ' '.join(cmd), flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise BuildError(
        f'Compiling the depthwise kernels failed (exit {proc.returncode}).\n'
        f'Command: {" ".join(cmd)}\n{proc.stdout}{proc.stderr}')
  if verbose and (proc.stdout or proc.stderr):
    print(proc.stdout + proc.stderr, file=sys.stderr, flush=True)
  os.replace(tmp_path, out_path)
  if verbose:
    print(f'ghostnet_jax.kernels.build: wrote {out_path}', flush=True)
  return out_path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ghostnet_jax.kernels.build', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=None,
                      help='output directory (default: next to the source)')
  parser.add_argument('--cxx', default=None,
                      help='C++ compiler (default: $CXX, g++, c++, clang++)')
  parser.add_argument('--march', default='native',
                      help="-march value; '' for the compiler's default")
  parser.add_argument('-q', '--quiet', action='store_true')
  args = parser.parse_args(argv)
  try:
    build(args.out, cxx=args.cxx, march=args.march or None,
          verbose=not args.quiet)
  except BuildError as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
