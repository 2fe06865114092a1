#!/usr/bin/env bash
# Per-kernel device times of a short CUDA decode under Nsight Compute (ncu), on the GPU machine:
#
#   bash tools/gpu_bundle.sh                       # here
#   device run (carry: ["carry"]):  bash tools/gpu_profile.sh [DTYPE:BATCH ...]
#
# For each DTYPE:BATCH (default f16:1 f16:16 f16:64 f32:16) it runs `gpt2rt bench` with prompt 12
# and 4 new tokens once under ncu and prints, per kernel, the launches and the mean duration
# (gpu__time_duration; ncu serialises kernels, so graph/PDL overlap is not in these numbers).
# PROMPT_LEN (default 12) sets the prompt; NCU_ARGS adds ncu options, e.g.
# NCU_ARGS="--clock-control none --cache-control none" for the GPU's own clocks and warm caches
# (by default ncu locks the base clock and flushes the caches before each kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpt2rt-gpu-out}
mkdir -p "$OUT"
[ -f carry/bins.tar.xz ] && [ ! -x carry/gpt2rt ] && tar -C carry -xJf carry/bins.tar.xz
cells=("$@")
[ ${#cells[@]} -gt 0 ] || cells=(f16:1 f16:16 f16:64 f32:16)
for cell in "${cells[@]}"; do
  dtype=${cell%%:*} batch=${cell##*:}
  log="$OUT/ncu_${dtype}_b${batch}.txt"
  # shellcheck disable=SC2086
  ncu --csv --metrics gpu__time_duration.sum -c 3000 ${NCU_ARGS:-} \
    carry/gpt2rt bench --backend cuda --dtype "$dtype" --batches "$batch" --new-tokens 4 --prompt-len "${PROMPT_LEN:-12}" \
    --reps 1 --no-kv-off >"$log.raw" 2>&1
  python3 - "$log.raw" "$dtype" "$batch" <<'PY' | tee "$log"
import csv, io, sys
text = open(sys.argv[1]).read()
lines = [l for l in text.splitlines() if l.startswith('"')]
agg = {}
for row in csv.DictReader(io.StringIO("\n".join(lines))):
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = row["Kernel Name"].split("(")[0]
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(row["Metric Unit"], 1.0)
    c, t = agg.get(name, (0, 0.0))
    agg[name] = (c + 1, t + float(row["Metric Value"].replace(",", "")) * scale)
total = sum(t for _, t in agg.values())
print(f"== {sys.argv[2]} batch {sys.argv[3]}: launches, mean us, share of {total:.0f} us (prefill + 4 steps, x bench warm-up reps)")
for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{n[:48]:48s} {c:6d} {t / c:9.2f} {100 * t / total:6.1f}%")
PY
  [ -s "$log" ] || tail -20 "$log.raw"
done
