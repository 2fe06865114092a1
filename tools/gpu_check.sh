#!/usr/bin/env bash
# Everything that needs the GPU machine, in ONE device call (it has torch + transformers and no
# cargo: build here, carry the binaries):
#
#   bash tools/gpu_bundle.sh          # builds and copies gpt2rt + the test binaries into carry/
#   device run (carry: ["carry"]):  bash tools/gpu_check.sh
#
# 1. runs the CUDA tests (parity with the committed PyTorch fixtures, f32 token-exact; f16/bf16
#    agreement reported) and the CPU parity test;
# 2. with REMAKE_FIXTURES=1, first remakes the PyTorch fixtures from `gpt2rt synth` directories
#    (tools/make_parity_fixtures.py) and checks against those instead;
#    with HALF_FIXTURES=1, also the fp16/bf16 references (PyTorch on the GPU) for the half modes;
# 3. benchmarks the CUDA backend and Hugging Face eager on the same weights (tools/bench_cuda.sh;
#    bench.tgz, turned into bench/results/ here by tools/bench_report.py) unless SKIP_BENCH=1;
# 4. prints a short table last. Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpt2rt-gpu-out}
BIN=${GPT2RT_BIN:-carry/gpt2rt}
mkdir -p "$OUT"
[ -f carry/bins.tar.xz ] && tar -C carry -xJf carry/bins.tar.xz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
"$BIN" inspect --builtin tiny | tee "$OUT/inspect.txt"

if [ "${REMAKE_FIXTURES:-0}" = 1 ]; then
  work=$(mktemp -d)
  mkdir -p "$OUT/fixtures"
  for cfg in tiny distilgpt2; do "$BIN" synth --config "$cfg" --seed 0 --dtype f32 --out "$work/$cfg"; done
  python3 tools/make_parity_fixtures.py tiny="$work/tiny" distilgpt2="$work/distilgpt2" --out "$OUT/fixtures" \
    2>&1 | tee "$OUT/fixtures.log"
  export GPT2RT_FIXTURES="$OUT/fixtures"
fi

# HALF_FIXTURES=1: also make the same-precision references (PyTorch fp16/bf16 on the GPU) for the
# CUDA half modes, beside the fp32 fixtures in use; commit them from $OUT/fixtures.
if [ "${HALF_FIXTURES:-0}" = 1 ]; then
  work=$(mktemp -d)
  mkdir -p "$OUT/fixtures"
  [ -n "${GPT2RT_FIXTURES:-}" ] || cp tests/fixtures/parity_*.json "$OUT/fixtures/"
  "$BIN" synth --config distilgpt2 --seed 0 --dtype f32 --out "$work/distilgpt2"
  for dt in float16 bfloat16; do
    python3 tools/make_parity_fixtures.py distilgpt2="$work/distilgpt2" --out "$OUT/fixtures" --dtype $dt --device cuda \
      2>&1 | tee -a "$OUT/fixtures.log"
  done
  export GPT2RT_FIXTURES="$OUT/fixtures"
fi

cuda=FAILED; parity=FAILED; bench=skipped; onnx=skipped
carry/cuda --test-threads 1 --nocapture > "$OUT/cuda_tests.log" 2>&1 && cuda=passed
cat "$OUT/cuda_tests.log"
carry/parity --test-threads 1 > "$OUT/parity.log" 2>&1 && parity=passed
tail -3 "$OUT/parity.log"
# The torch exporter of tools/export_onnx.py (torch is only here), validated with ONNX Runtime
# against the CPU backend, for tiny and distilgpt2.
if [ "${SKIP_ONNX:-0}" != 1 ] && python3 -c 'import onnx, onnxruntime' 2>/dev/null; then
  onnx=FAILED
  work=$(mktemp -d)
  ok=1
  for cfg in tiny distilgpt2; do
    "$BIN" synth --config "$cfg" --seed 0 --dtype f32 --out "$work/$cfg" >/dev/null
    python3 tools/export_onnx.py --model "$work/$cfg" --out "$work/$cfg-onnx" --exporter torch --validate \
      --gpt2rt "$BIN" >> "$OUT/onnx.log" 2>&1 || ok=0
  done
  [ $ok = 1 ] && onnx=passed
  tail -12 "$OUT/onnx.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  bench=FAILED
  bash tools/bench_cuda.sh "$OUT/bench" > "$OUT/bench.log" 2>&1 && bench=passed
  tar czf "$OUT/bench.tgz" -C "$OUT/bench" . && rm -rf "$OUT/bench"
fi

# NVTX ranges from the CUDA backend, received by the fake injection library of tests/nvtx (built by
# tools/gpu_bundle.sh; Nsight Systems is not installed on the GPU machine).
nvtx=skipped
if [ -f carry/fake_injection.so ]; then
  nvtx=FAILED
  NVTX_INJECTION64_PATH=$PWD/carry/fake_injection.so FAKE_NVTX_LOG="$OUT/nvtx.log" \
    "$BIN" generate --backend cuda --nvtx --max-new-tokens 4 "NVTX check" > "$OUT/nvtx_generate.txt" 2>&1
  # One generate range holding a prefill and 3 steps, token uploads and token-id copies inside.
  if [ "$(grep -c '^push 0 gpt2rt generate' "$OUT/nvtx.log" 2>/dev/null)" = 1 ] &&
    [ "$(grep -c '^push 1 gpt2rt step' "$OUT/nvtx.log")" = 3 ] &&
    grep -q '^push 2 H2D tokens' "$OUT/nvtx.log" && grep -q '^push 2 D2H token ids' "$OUT/nvtx.log"; then
    nvtx=passed
  fi
  sed 's/^push [0-9]* //;/^pop/d' "$OUT/nvtx.log" 2>/dev/null | sort | uniq -c | sed 's/^/  nvtx range /'
fi

echo
echo "| check | result |"
echo "|---|---|"
echo "| GPU | $(head -1 "$OUT/gpu.txt") |"
echo "| CUDA tests (f32 parity vs transformers, f16/bf16 agreement) | $cuda |"
echo "| CPU parity vs transformers fp32 | $parity |"
echo "| ONNX export (torch) validated with ONNX Runtime vs the CPU backend | $onnx |"
echo "| NVTX ranges from the CUDA backend (fake injection library) | $nvtx |"
echo "| benchmark | $bench |"
grep -h "agree on" "$OUT/cuda_tests.log" || true
grep -h "^hf" "$OUT/bench.log" || tail -5 "$OUT/bench.log"
[ "$cuda" = passed ] && [ "$parity" = passed ] && [ "$bench" != FAILED ] && [ "$onnx" != FAILED ] && [ "$nvtx" != FAILED ]
