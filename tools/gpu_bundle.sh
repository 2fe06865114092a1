#!/usr/bin/env bash
# Builds the release binaries the GPU machine runs (it has no cargo) into carry/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
cargo test --release --no-run --test cuda --test parity 2>&1 | tail -3
mkdir -p carry
cp target/release/gpt2rt carry/gpt2rt
for t in cuda parity; do
  cp "$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)" "carry/$t"
done
strip carry/*
ls -la carry
