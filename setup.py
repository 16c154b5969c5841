"""Builds the package, compiling its CPU kernels with the machine's compiler.

The metadata lives in pyproject.toml; this file only adds the compile step:
``build_py`` also builds ``ghostnet_jax/kernels/_depthwise_cpu.so`` (see
``ghostnet_jax/kernels/build.py``). The kernels need the XLA FFI headers of the
jaxlib that will run them, so install without build isolation, into an
environment that already has jax::

  pip install -r requirements.txt
  pip install --no-build-isolation -e .     # or: python -m ghostnet_jax.kernels.build

Without jaxlib at build time (an isolated build) the package installs without
its kernels, and ``ghostnet_jax`` falls back to its pure-XLA lowering. Set
``GHOSTNET_JAX_REQUIRE_KERNELS=1`` to make that, or any compile error, fail the
install instead.
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernel_builder():
  """ghostnet_jax/kernels/build.py, loaded by path (imports no jax)."""
  path = os.path.join(HERE, 'ghostnet_jax', 'kernels', 'build.py')
  spec = importlib.util.spec_from_file_location('_ghostnet_kernel_build', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Configs the wheel carries as ghostnet_jax/configs/*.py (the installed
# train command's default); the others import their siblings as ``configs.*``
# and are used from a source checkout.
PACKAGED_CONFIGS = ('default.py',)


class BuildPyWithKernels(build_py):
  """``build_py`` that also compiles the depthwise kernels into the package
  and copies the default training config into it."""

  def run(self):
    super().run()
    if not getattr(self, 'editable_mode', False):
      configs = os.path.join(self.build_lib, 'ghostnet_jax', 'configs')
      os.makedirs(configs, exist_ok=True)
      for name in PACKAGED_CONFIGS:
        self.copy_file(os.path.join(HERE, 'configs', name),
                       os.path.join(configs, name))
    builder = _kernel_builder()
    if getattr(self, 'editable_mode', False):
      out_dir = os.path.join(HERE, 'ghostnet_jax', 'kernels')
    else:
      out_dir = os.path.join(self.build_lib, 'ghostnet_jax', 'kernels')
    required = os.environ.get('GHOSTNET_JAX_REQUIRE_KERNELS', '') not in ('', '0')
    try:
      builder.build(out_dir)
    except builder.BuildError as e:
      if required:
        raise
      print(f'WARNING: ghostnet_jax kernels not built ({e}); the package will '
            'use its pure-XLA lowering. Build them later with '
            '`python -m ghostnet_jax.kernels.build`.')


class NativeDistribution(Distribution):
  """The wheel may carry the compiled kernels: tag it for the platform."""

  def has_ext_modules(self):
    return True


setup(cmdclass={'build_py': BuildPyWithKernels}, distclass=NativeDistribution)
