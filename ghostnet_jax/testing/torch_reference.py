"""Helpers for tests that compare against PyTorch (timm) as the reference.

``import_timm()`` makes ``import timm`` work beside the CPU build of torch.
timm imports torchvision at module level for a few names
(``torchvision.ops.misc.FrozenBatchNorm2d`` in its norm layers,
``torchvision.transforms`` in ``timm.data``). PyPI's torchvision wheel does not
load beside torch 2.13 CPU, and the GhostNet models never call it, so when the
real torchvision fails to import we serve placeholder modules: attribute
access on them yields inert placeholders, except ``FrozenBatchNorm2d`` which is
a real (small) module. The hook is installed only in the test process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import numpy as np


class _Placeholder:
  """Stands in for any torchvision object timm touches at import time."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __call__(self, *args, **kwargs):
    return _Placeholder()

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _Placeholder()

  def __mro_entries__(self, bases):
    return (object,)


class _PlaceholderModule(types.ModuleType):

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _Placeholder()


def _frozen_batch_norm():
  import torch  # pylint: disable=g-import-not-at-top

  class FrozenBatchNorm2d(torch.nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters."""

    def __init__(self, num_features, eps=1e-5):
      super().__init__()
      self.eps = eps
      self.register_buffer('weight', torch.ones(num_features))
      self.register_buffer('bias', torch.zeros(num_features))
      self.register_buffer('running_mean', torch.zeros(num_features))
      self.register_buffer('running_var', torch.ones(num_features))

    def forward(self, x):
      scale = self.weight * (self.running_var + self.eps).rsqrt()
      shift = self.bias - self.running_mean * scale
      return x * scale[None, :, None, None] + shift[None, :, None, None]

  return FrozenBatchNorm2d


class _TorchvisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, fullname, path, target=None):
    del path, target
    if fullname == 'torchvision' or fullname.startswith('torchvision.'):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _PlaceholderModule(spec.name)
    module.__path__ = []
    if spec.name == 'torchvision':
      module.__version__ = '0.0.0+placeholder'
    if spec.name == 'torchvision.ops.misc':
      module.FrozenBatchNorm2d = _frozen_batch_norm()
    return module

  def exec_module(self, module):
    del module


def import_timm():
  """Imports timm, serving placeholder torchvision modules if needed."""
  try:
    importlib.import_module('torchvision')
  except Exception:  # pylint: disable=broad-except
    for name in [m for m in sys.modules if m.split('.')[0] == 'torchvision']:
      del sys.modules[name]
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
      sys.meta_path.insert(0, _TorchvisionFinder())
  return importlib.import_module('timm')


def randomize_torch_model(model, seed: int = 0) -> None:
  """Every weight and every BatchNorm statistic random (in place).

  Weights are N(0, 1/fan_in) so activations stay O(1) through deep nets;
  BN scales in [0.5, 1.5], shifts N(0, 0.1), running means N(0, 0.1),
  running variances in [0.5, 1.5]. Random statistics make the parity test
  see the normalisation, which the default (0, 1) statistics would hide.
  """
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if not p.is_floating_point():
        continue
      leaf = name.rsplit('.', 1)[-1]
      if leaf == 'running_mean':
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
      elif leaf == 'running_var':
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif leaf == 'weight' and p.ndim == 1:
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif leaf == 'bias':
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
      elif p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def relative_error(a, b) -> float:
  """max |a - b| / max |b|."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def nchw(x):
  """NHWC numpy -> NCHW torch tensor."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
  """NCHW torch tensor (or 2-D) -> NHWC numpy."""
  a = t.detach().cpu().numpy()
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def random_flax_variables(module, *inputs, seed: int = 0, **kwargs) -> dict:
  """Variables of ``module`` filled with random numbers from numpy.

  Skips the module's initialisers: compiling a jitted ``init`` costs tens of
  seconds of CPU here, abstract evaluation costs nothing. Kernels
  N(0, 1/fan_in), BN scales and running variances U(0.5, 1.5), everything
  else N(0, 0.1) (the same spread as :func:`randomize_torch_model`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(
      lambda *a: module.init(jax.random.key(0), *a, **kwargs), *inputs)
  rs = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      value = rs.uniform(0.5, 1.5, leaf.shape)
    elif name == 'kernel':
      value = rs.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = rs.randn(*leaf.shape) * 0.1
    return jnp.asarray(value, leaf.dtype)

  return dict(jax.tree_util.tree_map_with_path(fill, dict(shapes)))


@functools.lru_cache(maxsize=None)
def compiled_apply(name: str, train: bool = False, **create_kwargs):
  """``create_model(name, **create_kwargs).apply`` compiled once per shape.

  ``train=True`` runs BatchNorm on batch statistics (dropout off) and returns
  ``(logits, {'batch_stats': ...})``. XLA's backend optimisation level 0
  roughly halves the compile time of these one-off runs; results are the
  same to rounding.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import ghostnet_jax  # pylint: disable=g-import-not-at-top
  if train:
    create_kwargs = dict(create_kwargs, dropout=0.0)
  model = ghostnet_jax.create_model(name, **create_kwargs)
  if train:
    fn = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                          mutable=['batch_stats']))
  else:
    fn = jax.jit(lambda v, x: model.apply(v, x))
  compiled = {}

  def run(variables, x):
    key = (x.shape, jax.tree_util.tree_structure(variables))
    if key not in compiled:
      compiled[key] = fn.lower(variables, x).compile(
          compiler_options={'xla_backend_optimization_level': 0})
    return compiled[key](variables, x)

  return run
