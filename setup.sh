#!/usr/bin/env bash
# Sets up ghostnet-jax on a fresh machine: a virtual environment in .venv with
# the pinned stack (CPU torch for the converter and the parity tests), the
# package itself (editable), and the optional compiled CPU kernels.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing pinned requirements (about 2 minutes the first time)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-timm.txt
.venv/bin/pip install -q --disable-pip-version-check -r requirements-export.txt && .venv/bin/pip install -q --disable-pip-version-check --no-deps jax2onnx==0.17.1  # export extra (~70 s)
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax, torch, ghostnet_jax.kernels as k; print(f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, CPU kernels built: {k.is_available()}")')"
