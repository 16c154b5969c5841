"""Shared pytest fixtures."""

import os

# Tests run on the CPU and must not grab all memory on an accelerator host.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def timm():
  """timm, importable beside the CPU torch (see torch_reference.py)."""
  from torch_reference import import_timm
  return import_timm()


@pytest.fixture
def rng():
  return np.random.RandomState(0)
