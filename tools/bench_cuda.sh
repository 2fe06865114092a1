#!/usr/bin/env bash
# CUDA benchmark on the GPU machine (called by tools/gpu_check.sh), gpt2rt and Hugging Face eager
# on the same synthetic distilgpt2 weights in the same call. Writes JSON into $1; then, here,
# `python3 tools/bench_report.py DIR bench/results` makes the markdown table and the PNG plot.
set -euo pipefail
out=${1:-/tmp/gpt2rt-bench}
BIN=${GPT2RT_BIN:-carry/gpt2rt}
mkdir -p "$out"
model=$(mktemp -d)/distilgpt2
"$BIN" synth --config distilgpt2 --seed 0 --dtype f32 --out "$model" >/dev/null
for dtype in f32 f16 bf16; do
  "$BIN" bench --model "$model" --backend cuda --dtype "$dtype" --reps 10 --json "$out/gpt2rt_grid_$dtype.json" >/dev/null
  "$BIN" bench --model "$model" --backend cuda --dtype "$dtype" --batches 1,8,16,64 --new-tokens 1,128 --prompt-len 128 \
    --reps 5 --no-kv-off --json "$out/gpt2rt_batch_$dtype.json" >/dev/null
  for p in 16 64 256 512 896; do
    "$BIN" bench --model "$model" --backend cuda --dtype "$dtype" --batches 1 --new-tokens 128 --prompt-len $p \
      --reps 5 --no-kv-off --json "$out/gpt2rt_ctx${p}_$dtype.json" >/dev/null
  done
done
for dtype in f32 f16; do
  python3 tools/bench_hf.py --model "$model" --dtype "$dtype" --reps 5 --out "$out/hf_$dtype.json"
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/card.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$out/card.txt"
