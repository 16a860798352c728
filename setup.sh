#!/usr/bin/env bash
# Quick start, step 1: make .venv, install torch + the build tools, build hires_lmm, run the benchmark.
#   bash setup.sh              # CUDA torch 2.15.0 from the registry (builds CUDA for TORCH_CUDA_ARCH_LIST,
#                              # default 8.0+PTX;9.0a)
#   TORCH_SPEC=torch==2.13.0 bash setup.sh   # a CPU torch: CPU-only build
#   HIRES_LMM_NO_BENCH=1 bash setup.sh       # build only
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.15.0}

[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# build: cmake ninja pybind11 (+ nvidia-cutlass headers for CUDA); run time: numpy safetensors pillow
# tokenizers sentencepiece tqdm; tests: pytest hypothesis transformers protobuf (transformers reads a
# SentencePiece tokenizer.model through it); the benchmark's --plot: matplotlib.
pip install -q "$TORCH_SPEC" numpy pybind11 "cmake>=3.26" ninja safetensors pillow tokenizers sentencepiece tqdm \
  pytest hypothesis transformers protobuf matplotlib nvidia-cutlass==4.2.0.0
# A CUDA torch needs an nvcc of the same major version; pip's toolkit is found by setup.py by itself.
if python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" && [ "${HIRES_LMM_CUDA:-1}" != 0 ]; then
  cuda=$(python -c "import torch; print(torch.version.cuda)")
  if [ -z "${CUDA_HOME:-}" ]; then
    pip install -q "cuda-toolkit[nvcc,cccl,cuobjdump,nvdisasm]==${CUDA_TOOLKIT_VERSION:-$cuda.*}"
  fi
fi
# The build prints "hires_lmm build [n/m] ..." progress lines; pip shows a build's output only with -v,
# so the full log goes to build/pip-install.log and only the progress lines to the screen.
mkdir -p build
start=$(date +%s)
set +e
HIRES_LMM_PROGRESS=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install -v --no-build-isolation . 2>&1 | tee build/pip-install.log \
  | grep --line-buffered -E "^ *hires_lmm"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
  tail -60 build/pip-install.log
  echo "setup.sh: build failed (full log: build/pip-install.log)" >&2
  exit 1
fi
echo "setup.sh: build took $(( $(date +%s) - start )) s"
(cd /tmp && hires-lmm info)
if [ "${HIRES_LMM_NO_BENCH:-0}" != 1 ]; then
  (cd /tmp && hires-lmm bench)
fi
