#!/usr/bin/env bash
# Quick start, step 1: make .venv, install torch + the build tools, build hires_lmm, run the benchmark.
#   bash setup.sh              # CUDA torch 2.15.0 from the registry (builds CUDA for TORCH_CUDA_ARCH_LIST)
#   TORCH_SPEC=torch==2.13.0 bash setup.sh   # a CPU torch: CPU-only build
#   HIRES_LMM_NO_BENCH=1 bash setup.sh       # build only
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.15.0}

[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "$TORCH_SPEC" numpy pybind11 cmake ninja safetensors pillow pytest transformers nvidia-cutlass==4.2.0.0
# A CUDA torch needs an nvcc of the same major version; pip's toolkit is found by setup.py by itself.
if python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" && [ "${HIRES_LMM_CUDA:-1}" != 0 ]; then
  cuda=$(python -c "import torch; print(torch.version.cuda)")
  if [ -z "${CUDA_HOME:-}" ]; then
    pip install -q "cuda-toolkit[nvcc,cccl]==${CUDA_TOOLKIT_VERSION:-$cuda.*}"
  fi
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install --no-build-isolation .
python -c "import hires_lmm, json; print(json.dumps(hires_lmm.build_info(), indent=1))"
if [ "${HIRES_LMM_NO_BENCH:-0}" != 1 ]; then
  python -m hires_lmm.bench
fi
