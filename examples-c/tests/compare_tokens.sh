#!/usr/bin/env bash
# Greedy tokens of an example equal the Rust CLI's for the same prompt.
#   compare_tokens.sh CLI N PROMPT -- EXAMPLE_COMMAND...
# (EXAMPLE_COMMAND may start with a runner such as wine or valgrind; --model tiny --print-tokens
# --max-new-tokens N PROMPT are appended to it.)
set -euo pipefail
cli=$1 n=$2 prompt=$3
shift 3
[ "$1" = "--" ] && shift
expected=$("$cli" generate --backend cpu --builtin tiny --print-tokens --max-new-tokens "$n" "$prompt" 2>/dev/null)
actual=$("$@" --model tiny --print-tokens --max-new-tokens "$n" "$prompt" | tr -d '\r')
echo "CLI:     $expected"
echo "example: $actual"
if [ -z "$expected" ] || [ "$expected" != "$actual" ]; then
  echo "MISMATCH" >&2
  exit 1
fi
echo "tokens equal"
