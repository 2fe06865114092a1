#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian 12 machine (installs what it needs with apt).
# The README's test command and .ci/run both call this script. Sections:
#   Rust (fmt, clippy, unit + integration tests incl. PyTorch parity), the embedded CUDA kernels'
#   freshness, the ONNX export validated with ONNX Runtime (tools/test_onnx.sh), the TensorRT shim
#   compile check (tools/check_tensorrt_shim.sh: skipped without TensorRT headers), a short run of
#   each fuzz target (tools/fuzz.sh smoke; GPT2RT_FUZZ_SECONDS sets its length, default 20), C/C++
#   (tools/test_c.sh), C#/Unity (tools/test_csharp.sh), Windows DLL under Wine
#   (tools/test_windows.sh), and the GPU tests (skipped, and said so, where there is no GPU).
# GPT2RT_SKIP_WINDOWS=1 skips the Windows cross-build (about 9 minutes on 2 cores);
# GPT2RT_SKIP_ONNX=1 skips the ONNX export check (it installs onnx and onnxruntime into a venv).
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

echo "== embedded CUDA kernels match their sources"
if [ "$(cat kernels/*.cu | sha256sum | cut -d' ' -f1)" != "$(cat kernels/gpt2rt.fatbin.sha256)" ]; then
  echo "kernels/gpt2rt.fatbin is stale: run tools/build_kernels.sh and commit it" >&2
  exit 1
fi
echo "fresh ($(cat kernels/gpt2rt.fatbin.sha256))"

echo "== Rust tests (release: the parity tests run the real distilgpt2 shapes on the CPU)"
cargo test --release -- --test-threads 2

echo "== ONNX export (tools/export_onnx.py) against the CPU backend, with ONNX Runtime"
bash tools/test_onnx.sh

echo "== TensorRT shim compile check"
bash tools/check_tensorrt_shim.sh

echo "== fuzz smoke: each cargo-fuzz target for ${GPT2RT_FUZZ_SECONDS:-20} s (skipped without nightly; long runs: tools/fuzz.sh long)"
bash tools/fuzz.sh smoke "${GPT2RT_FUZZ_SECONDS:-20}"

echo "== C and C++"
bash tools/test_c.sh

echo "== C# and Unity"
bash tools/test_csharp.sh

if [ "${GPT2RT_SKIP_WINDOWS:-0}" = 1 ]; then
  echo "== Windows: skipped (GPT2RT_SKIP_WINDOWS=1)"
else
  echo "== Windows DLL under Wine"
  bash tools/test_windows.sh
fi

echo "== GPU tests"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  cargo test --release --test cuda -- --nocapture
else
  cargo test --release --test cuda -- --nocapture 2>&1 | grep -E "skipped|test result" | sort -u
  echo "GPU tests skipped: no NVIDIA GPU on this machine (tools/gpu_check.sh runs them on the GPU machine)"
fi
