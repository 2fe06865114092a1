#!/usr/bin/env bash
# The cargo-fuzz targets in fuzz/ (see SECURITY.md for what each one checks and the figures).
#
#   bash tools/fuzz.sh list                     the targets
#   bash tools/fuzz.sh build                    build them (nightly, AddressSanitizer, debug assertions)
#   bash tools/fuzz.sh smoke [SECONDS]          each target for SECONDS (default 20) from its seeds;
#                                               part of tools/test.sh
#   bash tools/fuzz.sh long TARGET [SECONDS]    one target until 10,000,000 executions or SECONDS
#                                               (default 3600), whichever comes first
#
# Each run prints one summary line: target, executions, seconds, exec/s, crashes. A crash stops the
# run and leaves its input in fuzz/artifacts/TARGET/; reproduce it with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# New corpus entries go to fuzz/corpus/TARGET/ (not committed; fuzz/seeds/ holds the committed seeds).
# Needs the nightly toolchain; installs cargo-fuzz (cargo install cargo-fuzz --locked) if missing.
# Without nightly it says so and exits 0, so the test command still runs on stable-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=(config_json safetensors tokenizer ffi_calls)

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
mode=${1:-}
[ -n "$mode" ] || usage

if [ "$mode" = list ]; then
  printf '%s\n' "${targets[@]}"
  exit 0
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: skipped: no nightly toolchain here (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

build() {
  (cd fuzz && cargo +nightly fuzz build "$@")
}

# run TARGET SECONDS RUNS: one libFuzzer run; prints the summary line, returns non-zero on a crash.
run() {
  local target=$1 seconds=$2 runs=$3
  local corpus="$root/fuzz/corpus/$target" seeds="$root/fuzz/seeds/$target" log
  mkdir -p "$corpus" "$root/fuzz/artifacts/$target" "$root/fuzz/logs"
  log="$root/fuzz/logs/$target-$(date +%Y%m%d-%H%M%S).log"
  local extra=()
  [ -f "$root/fuzz/dicts/$target.dict" ] && extra+=("-dict=$root/fuzz/dicts/$target.dict")
  local dirs=("$corpus")
  [ -d "$seeds" ] && dirs+=("$seeds")
  local start=$SECONDS status=0
  (cd fuzz && cargo +nightly fuzz run "$target" "${dirs[@]}" -- \
      -max_total_time="$seconds" -runs="$runs" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 "${extra[@]}") >"$log" 2>&1 || status=$?
  local elapsed=$((SECONDS - start))
  local execs rate crashes
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(grep -cE '^==[0-9]+== ?ERROR|panicked at|deadly signal|Test unit written to' "$log" || true)
  printf 'fuzz %-12s executions %-10s seconds %-6s exec/s %-7s crashes %s   (log: %s)\n' \
    "$target" "${execs:-?}" "$elapsed" "${rate:-?}" "$([ "$status" = 0 ] && echo 0 || echo "${crashes:-1}")" \
    "${log#"$root"/}"
  if [ "$status" != 0 ]; then
    grep -E 'panicked at|ERROR: |SUMMARY|Test unit written to|^artifact_prefix' "$log" | head -20 >&2 || true
    tail -40 "$log" >&2
    return 1
  fi
}

case "$mode" in
  build)
    build
    ;;
  smoke)
    seconds=${2:-20}
    build
    failed=0
    for t in "${targets[@]}"; do
      run "$t" "$seconds" -1 || failed=1
    done
    exit $failed
    ;;
  long)
    target=${2:?usage: tools/fuzz.sh long TARGET [SECONDS]}
    seconds=${3:-3600}
    build
    run "$target" "$seconds" 10000000
    ;;
  *)
    usage
    ;;
esac
