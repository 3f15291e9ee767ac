#!/usr/bin/env bash
# Create .venv and install lvlm_region with its test extras.
# On a machine without an NVIDIA GPU this installs the CPU build of torch first, so nothing pulls the
# multi-GB CUDA build; on GPU nodes it keeps whatever torch the environment provides or installs the default.
# deepspeed compiles against torch at install time, so it is installed without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    pip install -q "torch==2.13.0"
  fi
fi
python -c "import deepspeed" 2>/dev/null || pip install -q --no-build-isolation "deepspeed>=0.19.3,<0.20"
pip install -q --no-build-isolation -e ".[dev]"
python -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
