#!/usr/bin/env bash
# Regenerates kernels/gpt2rt.fatbin (embedded in the library) from kernels/*.cu, and records the
# sources' hash in kernels/gpt2rt.fatbin.sha256 (a test fails when the sources change without a
# rebuild). Needs no GPU: nvcc comes from PyPI (pinned, see ../shared/PLATFORM.md).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  NVCC="$site/nvidia/cu13/bin/nvcc"
  if [ ! -x "$NVCC" ] || [ ! -e "$site/nvidia/cu13/include/nv/target" ]; then
    python3 -m pip install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
  fi
fi
"$NVCC" --version | tail -2
# SASS for Turing, Ampere (A100, consumer), Ada and Hopper, plus PTX for anything newer: compute_90
# (which keeps the programmatic-dependent-launch waits the host enables on 9.0+) and compute_75.
"$NVCC" -fatbin -O3 -std=c++17 \
  -gencode arch=compute_75,code=sm_75 \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_86,code=sm_86 \
  -gencode arch=compute_89,code=sm_89 \
  -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_90,code=compute_90 \
  -gencode arch=compute_75,code=compute_75 \
  -o kernels/gpt2rt.fatbin kernels/gpt2rt.cu
cat kernels/*.cu | sha256sum | cut -d' ' -f1 > kernels/gpt2rt.fatbin.sha256
ls -l kernels/gpt2rt.fatbin
