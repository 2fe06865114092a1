#!/usr/bin/env bash
# Builds the release binaries the GPU machine runs (it has no cargo) into carry/bins.tar.xz
# (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
cargo test --release --no-run --test cuda --test parity 2>&1 | tail -3
mkdir -p carry && rm -f carry/bins.tar.xz
cp target/release/gpt2rt carry/gpt2rt
for t in cuda parity; do
  cp "$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)" "carry/$t"
done
strip carry/gpt2rt carry/cuda carry/parity
# The fake NVTX tool of tests/nvtx, for gpu_check.sh's check of the CUDA backend's ranges.
cc -std=c99 -O1 -shared -fPIC -o carry/fake_injection.so tests/nvtx/fake_injection.c
# The device tool carries at most 64 MiB with the tree: ship the binaries compressed;
# tools/gpu_check.sh unpacks them.
XZ_OPT="-T2 -2" tar -C carry -cJf carry/bins.tar.xz gpt2rt cuda parity && rm carry/gpt2rt carry/cuda carry/parity
ls -la carry
