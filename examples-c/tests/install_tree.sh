#!/usr/bin/env bash
# The install tree works for its three kinds of consumers.
#   install_tree.sh install BUILD_DIR PREFIX        cmake --install into a fresh PREFIX
#   install_tree.sh cmake CONSUMER_DIR PREFIX       find_package(Gpt2Rt) from a separate project
#   install_tree.sh pkgconfig CONSUMER_DIR PREFIX   cc $(pkg-config --cflags --libs gpt2rt)
#   install_tree.sh gcc CONSUMER_DIR PREFIX         cc -I PREFIX/include ... -lgpt2rt
set -euo pipefail
mode=$1 dir=$2 prefix=$3
warnings=(-Wall -Wextra -Werror -pedantic)
case "$mode" in
  install)
    rm -rf "$prefix"
    cmake --install "$dir" --prefix "$prefix"
    ;;
  cmake)
    rm -rf "$prefix/consumer-build"
    cmake -S "$dir" -B "$prefix/consumer-build" -DCMAKE_PREFIX_PATH="$prefix"
    cmake --build "$prefix/consumer-build"
    "$prefix/consumer-build/consumer_c"
    "$prefix/consumer-build/consumer_cpp"
    ;;
  pkgconfig)
    export PKG_CONFIG_PATH=$(dirname "$(find "$prefix" -name gpt2rt.pc -print -quit)")
    echo "pkg-config --cflags --libs gpt2rt: $(pkg-config --cflags --libs gpt2rt)"
    libdir=$(pkg-config --variable=libdir gpt2rt)
    # shellcheck disable=SC2046
    cc -std=c99 "${warnings[@]}" "$dir/main.c" $(pkg-config --cflags --libs gpt2rt) -Wl,-rpath,"$libdir" \
      -o "$prefix/consumer_pkgconfig"
    # shellcheck disable=SC2046
    c++ -std=c++17 "${warnings[@]}" "$dir/main.cpp" $(pkg-config --cflags --libs gpt2rt) -Wl,-rpath,"$libdir" \
      -o "$prefix/consumer_pkgconfig_cpp"
    "$prefix/consumer_pkgconfig"
    "$prefix/consumer_pkgconfig_cpp"
    ;;
  gcc)
    libdir=$(dirname "$(find "$prefix" -name 'libgpt2rt.so' -print -quit)")
    gcc -std=c99 "${warnings[@]}" -I"$prefix/include" "$dir/main.c" -L"$libdir" -lgpt2rt -o "$prefix/consumer_gcc"
    LD_LIBRARY_PATH=$libdir "$prefix/consumer_gcc"
    ;;
  *)
    echo "unknown mode $mode" >&2
    exit 2
    ;;
esac
