#!/usr/bin/env bash
# The C and C++ side, on a fresh Debian 12 machine (installs what it needs):
#   headers alone and twice (C99, C++17), version agreement, the C and C++ examples, their greedy
#   tokens against the Rust CLI, the install tree (find_package, pkg-config, plain gcc),
#   AddressSanitizer + UBSan (clang) and valgrind memcheck. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
section() { printf '\n==== %s\n' "$*"; }
start=$(date +%s)

section "tools"
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v valgrind >/dev/null || need+=(valgrind)
command -v gcc >/dev/null || need+=(gcc)
command -v g++ >/dev/null || need+=(g++)
command -v clang >/dev/null || need+=(clang)
command -v make >/dev/null || need+=(make)
# clang's sanitizer runtimes (Debian 12's clang is 14)
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.asan-x86_64.a >/dev/null 2>&1 || need+=(libclang-rt-14-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "cmake $(cmake --version | head -1 | awk '{print $3}'), $(gcc --version | head -1), $(clang --version | head -1), $(valgrind --version)"

section "cargo build --release (library and CLI)"
if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
cargo build --release
ls -l target/release/libgpt2rt.so target/release/gpt2rt

section "build (gcc): examples, header tests, version test"
cmake -S . -B build/c -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/c -j2

section "ctest (gcc): examples, tokens vs CLI, install tree consumers"
ctest --test-dir build/c --output-on-failure -LE valgrind

section "build (clang, -fsanitize=address,undefined)"
CC=clang CXX=clang++ cmake -S . -B build/c-asan -DCMAKE_BUILD_TYPE=Debug -DGPT2RT_SANITIZE=address,undefined >/dev/null
cmake --build build/c-asan -j2

section "ctest (AddressSanitizer + LeakSanitizer + UBSan)"
ctest --test-dir build/c-asan --output-on-failure

section "ctest (valgrind memcheck, tiny model)"
ctest --test-dir build/c --output-on-failure -L valgrind -j2
echo "valgrind summaries:"
grep -E "==[0-9]+== +(total heap usage|definitely lost|indirectly lost|possibly lost|still reachable|ERROR SUMMARY)" \
  build/c/Testing/Temporary/LastTest.log || true

section "all C/C++ checks passed in $(( $(date +%s) - start )) s"
