#!/usr/bin/env bash
# Everything that needs the GPU machine, in ONE device call (it has torch + transformers and no
# cargo: build here, carry the binaries):
#
#   cargo build --release && cargo test --release --test parity --no-run
#   mkdir -p carry && cp target/release/gpt2rt carry/ && \
#     cp "$(ls -t target/release/deps/parity-* | grep -v '\.d$' | head -1)" carry/parity
#   device run (carry: ["carry"]):  bash tools/gpu_check.sh
#
# 1. writes the synthetic tiny and distilgpt2 directories with the carried `gpt2rt synth`;
# 2. makes the PyTorch parity fixtures from them (tools/make_parity_fixtures.py);
# 3. runs the carried CPU parity test against those fresh fixtures;
# 4. prints a short table last. Results land in $OUT (fixtures/ to commit under tests/fixtures/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpt2rt-gpu-out}
BIN=${GPT2RT_BIN:-carry/gpt2rt}
PARITY=${GPT2RT_PARITY:-carry/parity}
work=$(mktemp -d)
mkdir -p "$OUT/fixtures"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"

"$BIN" inspect --builtin tiny | tee "$OUT/inspect.txt"
for cfg in tiny distilgpt2; do
  "$BIN" synth --config "$cfg" --seed 0 --dtype f32 --out "$work/$cfg"
done
python3 tools/make_parity_fixtures.py tiny="$work/tiny" distilgpt2="$work/distilgpt2" --out "$OUT/fixtures" \
  2>&1 | tee "$OUT/fixtures.log"

parity=FAILED
if GPT2RT_FIXTURES="$OUT/fixtures" "$PARITY" --test-threads 1 2>&1 | tee "$OUT/parity.log"; then parity=passed; fi

echo
echo "| check | result |"
echo "|---|---|"
echo "| GPU | $(head -1 "$OUT/gpu.txt") |"
echo "| fixtures | $(ls "$OUT/fixtures" | tr '\n' ' ') |"
echo "| CPU parity vs transformers fp32 | $parity |"
