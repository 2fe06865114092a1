#!/usr/bin/env bash
# ONNX export check (part of tools/test.sh): writes the tiny synthetic model, exports both ONNX forms
# with tools/export_onnx.py (the graph exporter: no torch here) and validates each with ONNX Runtime
# (CPU) against gpt2rt's CPU backend. Installs onnx/onnxruntime into a venv under target/ (about
# 200 MB, 30 s). GPT2RT_SKIP_ONNX=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${GPT2RT_SKIP_ONNX:-0}" = 1 ]; then
  echo "ONNX export check skipped (GPT2RT_SKIP_ONNX=1)"
  exit 0
fi
venv=target/onnx-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import onnx, onnxruntime, safetensors, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "onnx==1.23.2" "onnxruntime==1.32.0" "safetensors==0.8.0" "numpy==2.4.6"
fi
cargo build --release --bin gpt2rt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/release/gpt2rt synth --config tiny --out "$work/tiny"
"$venv/bin/python" tools/export_onnx.py --exporter graph --model "$work/tiny" --out "$work/onnx" \
  --validate --gpt2rt target/release/gpt2rt
