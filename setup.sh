#!/usr/bin/env bash
# Sets up ghostnet-jax on a fresh machine: a virtual environment in .venv with
# the pinned stack (CPU torch for the converter and the parity tests), the
# package itself (editable), and the optional compiled CPU kernels.
# Idempotent: re-running it only installs what is missing.
#
#   bash setup.sh          the library, the trainer and the converter
#   bash setup.sh --test   also what the tests need: the export extra
#                          (requirements-export.txt, ~70 s) and the PaddlePaddle /
#                          MindSpore references in .venv-weights (~4 min)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "usage: bash setup.sh [--test]" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing pinned requirements (about 2 minutes the first time)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-timm.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
if [ "$TEST" = 1 ]; then
  echo "[setup] test extras: export formats (tensorflow-cpu, LiteRT, ONNX; about 70 s the first time)"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-export.txt
  # jax2onnx pins an older orbax-checkpoint: installed without its dependencies.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps jax2onnx==0.17.1
  echo "[setup] test references: PaddlePaddle / MindSpore in .venv-weights (NumPy 1.x; about 4 minutes the first time)"
  [ -x .venv-weights/bin/python ] || "$PYTHON" -m venv .venv-weights
  .venv-weights/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-weights-test.txt
fi
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax, torch, ghostnet_jax.kernels as k; print(f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, CPU kernels built: {k.is_available()}")')"
