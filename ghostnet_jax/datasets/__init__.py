"""Datasets shipped with ghostnet-jax (tfds builders; importing registers them)."""

from ghostnet_jax.datasets.digits import (DIGITS_NAME, GhostnetDigits,
                                          config_size_for,
                                          digits_split_indices, prepare_digits)

__all__ = ['DIGITS_NAME', 'GhostnetDigits', 'config_size_for', 'digits_split_indices', 'prepare_digits']
