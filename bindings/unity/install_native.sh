#!/usr/bin/env bash
# Copies the native library into the package's plugin folder, where the checked-in .meta files
# set Unity's import settings (libgpt2rt.so: Linux x64 editor + player; gpt2rt.dll: Windows x64).
# Usage: bindings/unity/install_native.sh [LIBRARY...]
#   default: target/release/libgpt2rt.so and, if built, target/x86_64-pc-windows-gnu/release/gpt2rt.dll
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest="$here/Runtime/Plugins/x86_64"
libs=("$@")
if [ ${#libs[@]} -eq 0 ]; then
  for candidate in "$repo/target/release/libgpt2rt.so" "$repo/target/x86_64-pc-windows-gnu/release/gpt2rt.dll"; do
    [ -f "$candidate" ] && libs+=("$candidate")
  done
fi
[ ${#libs[@]} -gt 0 ] || { echo "no library given or built (cargo build --release)" >&2; exit 1; }
for lib in "${libs[@]}"; do
  case "$(basename "$lib")" in
    libgpt2rt.so | gpt2rt.dll) cp "$lib" "$dest/" && echo "installed $(basename "$lib") -> $dest" ;;
    *) echo "$lib: expected libgpt2rt.so or gpt2rt.dll" >&2; exit 1 ;;
  esac
done
