"""PyTorch references shared by the parity tests and the benchmarks.

Not imported by the package itself; importing these modules needs the
``torch`` extra (and timm for :func:`torch_reference.import_timm`).

* :mod:`ghostnet_jax.testing.torch_reference`: timm beside the CPU build of
  torch, random weights on both sides, NCHW/NHWC conversion, errors.
* :mod:`ghostnet_jax.testing.g_ghost_reference`: an independent PyTorch
  G-Ghost RegNetX with the official module names.
"""
