"""Tests that need an optional extra: skip where it is missing, fail in CI.

``.ci/run`` sets ``GHOSTNET_JAX_REQUIRE_EXTRAS=1`` (and ``setup.sh --test``
installs every extra), so a test that would silently skip there fails instead.
"""

import os

import pytest


def missing(message: str):
  """Skips the calling test with ``message``, or fails it under CI."""
  if os.environ.get('GHOSTNET_JAX_REQUIRE_EXTRAS') == '1':
    pytest.fail(message + ' (required in CI: GHOSTNET_JAX_REQUIRE_EXTRAS=1)')
  pytest.skip(message)
