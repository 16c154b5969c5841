"""Shared pytest fixtures."""

import os

# Tests run on the CPU and must not grab all memory on an accelerator host.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def timm():
  """timm, importable beside the CPU torch (see ghostnet_jax.testing.torch_reference)."""
  from ghostnet_jax.testing.torch_reference import import_timm
  return import_timm()


@pytest.fixture(scope='session')
def compilation_cache(tmp_path_factory):
  """A persistent JAX compilation cache shared by a session's workers."""
  import train_test_utils
  return train_test_utils.compilation_cache(tmp_path_factory)


@pytest.fixture
def fake_pipeline(monkeypatch):
  """The trainer reads tests/fake_input.py instead of tfds."""
  import fake_input
  from ghostnet_jax import train_lib
  monkeypatch.setattr(train_lib, 'input_pipeline', fake_input)
  return fake_input


@pytest.fixture
def rng():
  return np.random.RandomState(0)


@pytest.fixture(autouse=True, scope='session')
def _torch_single_thread():
  """One torch thread: the references need no speed, and on 2 busy cores
  OpenMP spin-waiting costs more CPU than the work itself."""
  try:
    import torch
  except ImportError:
    yield
    return
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)
