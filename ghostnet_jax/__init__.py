"""GhostNet family in JAX/Flax: models, registry, PyTorch checkpoint converter."""
# ruff: noqa: E402 (the allocator is tuned before the rest is imported)

# First, before anything starts JAX's threads: glibc malloc settings that keep
# XLA:CPU's per-call buffers mapped (opt out with GHOSTNET_JAX_TUNE_MALLOC=0),
# and, with GHOSTNET_JAX_XLA_FLAGS=1, XLA:CPU flags for faster training steps
# (ghostnet_jax.runtime).
from ghostnet_jax import runtime as _runtime

_runtime.tune_malloc_at_import()
_runtime.xla_flags_at_import()

# Importing the model files registers their named variants.
from ghostnet_jax import g_ghost  # noqa: F401
from ghostnet_jax import ghost_resnet  # noqa: F401
from ghostnet_jax import ghostnet  # noqa: F401
from ghostnet_jax import ghostnetv2  # noqa: F401
from ghostnet_jax import ghostnetv3  # noqa: F401
from ghostnet_jax.class_names import imagenet_classes, imagenet_synsets
from ghostnet_jax.features import feature_info, transfer_variables
from ghostnet_jax.g_ghost import GGhostStage
from ghostnet_jax.ghost_layers import GhostConv
from ghostnet_jax.ghostnetv3 import reparameterize
from ghostnet_jax.layers import make_divisible
from ghostnet_jax.macs import count_macs
from ghostnet_jax.pretrained import load_pretrained
from ghostnet_jax.registry import (create_model, get_eval_config, list_models,
                                   register_model)
from ghostnet_jax.sources import list_sources
from ghostnet_jax.utils import count_params, extract_features, init_variables

__version__ = '0.1.0'

__all__ = [
    'GGhostStage', 'GhostConv', 'count_macs', 'count_params', 'create_model',
    'extract_features', 'feature_info', 'get_eval_config', 'imagenet_classes',
    'imagenet_synsets', 'init_variables', 'list_models', 'list_sources',
    'load_pretrained', 'make_divisible', 'register_model', 'reparameterize',
    'transfer_variables',
]
