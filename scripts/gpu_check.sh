#!/usr/bin/env bash
# The prepared GPU check in one command, for a lent GPU machine (no package registry there): the wheels carried in
# .whl/ (scripts/gpu_wheels.sh builds them here) go into /tmp/site ahead of the image's own packages, this checkout
# is imported in place (nothing installed), and bench/gpu_check.py writes gpu_check.json / gpu_check.md to $OUT
# (the device tool's result folder; ./gpu_check_out when unset). docs/benchmarks.md: how to run it with `device`.
#   bash scripts/gpu_check.sh            # the check (a few minutes on one H100 / H200)
#   bash scripts/gpu_check.sh --smoke    # the same code paths at toy size on whatever device is there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
out=${OUT:-gpu_check_out}
mkdir -p "$out"
"$PY" -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, '| deepspeed', \
deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| cuda', \
torch.cuda.is_available())" 2>&1 | tee "$out/versions.txt"
"$PY" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
