#!/usr/bin/env bash
# Build .whl/: the wheels the lent GPU machine lacks for bench/gpu_check.py (it reaches no package registry; its image
# has torch, tokenizers, safetensors, accelerate, peft, msgpack, ninja, psutil, py-cpuinfo, einops, but no deepspeed,
# hjson or pydantic, and an older transformers / huggingface_hub: /work/.library/device/KINDS.md). Run here, where the
# registries are reachable, after scripts/setup.sh:
#   bash scripts/gpu_wheels.sh                   # for the GPU machine's Python (3.12)
#   PY_VERSION=3.11 bash scripts/gpu_wheels.sh   # for this machine's, to try the install path in a clean venv
# Versions are those of .venv (what the suite passed with). deepspeed is built as a pure-Python wheel (no ops
# compiled: the check uses torch's AdamW); the binary ones are fetched for PY_VERSION on manylinux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
VENV=.venv/bin/python
version() { "$VENV" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 "$VENV" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
pure=()
for name in transformers peft huggingface_hub httpx2 httpcore2 truststore click hjson pydantic annotated-types \
    typing-inspection; do
  pure+=("$name==$(version "$name")")
done
"$VENV" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pure[@]}"
binary=()
for name in pydantic_core regex hf-xet; do
  binary+=("$name==$(version "$name")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$VENV" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" -d .whl "${binary[@]}"
ls -1 .whl
du -sh .whl
