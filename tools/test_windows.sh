#!/usr/bin/env bash
# Cross-builds gpt2rt.dll for x86_64-pc-windows-gnu with Debian's rustc-web + mingw, builds the C
# example against it with mingw, runs it under Wine (CPU backend, tiny model) and checks its greedy
# tokens equal the Linux CLI's. Installs the Debian packages it needs; safe to run again.
# Outputs: target/windows/ (cargo), target/windows/test/ (dll, exe, shim), target/windows/wineprefix.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
triple=x86_64-pc-windows-gnu
target_dir=$root/target/windows
out=$target_dir/test
section() { printf '\n==== %s\n' "$*"; }
start=$(date +%s)

section "packages"
pkgs=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 wine64)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
wine=/usr/lib/wine/wine64
[ -x "$wine" ] || wine=$(command -v wine64 || command -v wine)
/usr/bin/rustc --version
/usr/bin/cargo --version
x86_64-w64-mingw32-gcc --version | head -1
"$wine" --version

section "gpt2rt.dll (Debian rustc-web, -Zbuild-std, --target $triple)"
# /usr/bin/cargo with Debian's rustc and std sources; never rustup's toolchain (RUSTUP_TOOLCHAIN,
# a rustup-set RUSTC or CARGO from a parent cargo would bring it back).
build_start=$(date +%s)
env -u RUSTUP_TOOLCHAIN -u RUSTUP_HOME -u CARGO -u RUSTC_WRAPPER -u RUSTFLAGS \
  RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  __CARGO_TESTS_ONLY_SRC_ROOT=/usr/lib/rustlib/src/rust/library \
  /usr/bin/cargo build --release --lib --locked --target "$triple" -Zbuild-std=std,panic_abort \
  --target-dir "$target_dir"
echo "cargo build took $(( $(date +%s) - build_start )) s"
dll_dir=$target_dir/$triple/release
ls -l "$dll_dir/gpt2rt.dll" "$dll_dir/libgpt2rt.dll.a"
echo "gpt2rt.dll imports: $(x86_64-w64-mingw32-objdump -p "$dll_dir/gpt2rt.dll" | awk '/DLL Name/ {print $3}' | tr '\n' ' ')"

section "the C example and the ProcessPrng shim (mingw)"
mkdir -p "$out"
cp "$dll_dir/gpt2rt.dll" "$out/"
x86_64-w64-mingw32-gcc -O2 -shared -Wall -Wextra -Werror -o "$out/bcryptprimitives.dll" \
  tools/windows/processprng.c -ladvapi32
x86_64-w64-mingw32-gcc -std=c99 -O2 -Wall -Wextra -Werror -pedantic -Iinclude -o "$out/gpt2rt_example_c.exe" \
  examples-c/generate.c -L"$dll_dir" -lgpt2rt -lshell32
ls -l "$out"

section "the Linux CLI (reference tokens)"
if [ ! -x target/release/gpt2rt ]; then
  cargo build --release --bin gpt2rt
fi

section "run under Wine: tokens equal the Linux CLI's"
export WINEPREFIX=$target_dir/wineprefix WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
[ -d "$WINEPREFIX" ] || "$wine" wineboot --init >/dev/null 2>&1 || true
bash examples-c/tests/compare_tokens.sh target/release/gpt2rt 16 "Hello, my name is" -- \
  "$wine" "$out/gpt2rt_example_c.exe" --threads 2
bash examples-c/tests/compare_tokens.sh target/release/gpt2rt 40 \
  "The quick brown fox jumps over the lazy dog. Olé, naïve café!" -- "$wine" "$out/gpt2rt_example_c.exe" --threads 2

section "Windows checks passed in $(( $(date +%s) - start )) s"
