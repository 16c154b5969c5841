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
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
[ "${GHOSTNET_WEIGHTS_TESTS:-1}" = 0 ] || { echo "[setup] paddle/mindspore test references in .venv-weights (about 4 minutes the first time)"; [ -x .venv-weights/bin/python ] || "$PYTHON" -m venv .venv-weights; .venv-weights/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-weights-test.txt; }
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax, torch, ghostnet_jax.kernels as k; print(f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, CPU kernels built: {k.is_available()}")')"
