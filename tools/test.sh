#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian 12 machine (installs what it needs).
# The README's test command and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v python3 >/dev/null || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

echo "== tests (release: the parity tests run the real distilgpt2 shapes on the CPU)"
cargo test --release -- --test-threads 2

echo "== GPU tests"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  echo "a GPU is present: run tools/gpu_check.sh for the GPU parity check"
else
  echo "GPU tests skipped: no NVIDIA GPU on this machine (they run on the GPU machine via tools/gpu_check.sh)"
fi
