#!/usr/bin/env python3
"""Make the PyTorch parity fixtures for gpt2rt.

Run on a machine with torch + transformers (the GPU machine has them). For each synthetic model
directory written by `gpt2rt synth`, Hugging Face transformers' GPT2LMHeadModel (fp32, eager
attention, CPU, no TF32 anywhere) decodes greedily, one prompt at a time with its own KV cache
(the unpadded, mathematically exact reference for ragged batches), and the script records:

- the prompt token ids (encoded by the directory's tokenizer.json through `tokenizers`),
- the greedy tokens of every prompt of every case,
- a subset of the logits (every 13th entry plus the top 64) after prefill and at the last step.

Usage: make_parity_fixtures.py NAME=DIR [NAME=DIR ...] --out FIXTURE_DIR [--dtype D --device DEV]
where DIR was written by `gpt2rt synth --config NAME --seed 0 --dtype f32 --out DIR`;
writes FIXTURE_DIR/parity_NAME.json. With --dtype float16 or bfloat16 (and --device cuda: the
precision PyTorch users decode in) the weights are cast after loading and the file is
parity_NAME_f16.json / parity_NAME_bf16.json: the same-precision reference for gpt2rt's half modes.
"""

import argparse
import json
import os
import platform

import torch
import transformers
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog because",
    "In 1969, astronauts",
    "Once upon a time, in a land far, far away, there lived a king who",
    "def fibonacci(n):",
    "Ünïcödé and emoji 🤖 test:",
    "A",
    "The meaning of life is",
]

# (case name, number of prompts, new tokens); the ragged prompts are PROMPTS[:batch].
CASES = [
    ("batch1_long", 1, 240),
    ("batch3_ragged", 3, 64),
    ("batch8_ragged", 8, 32),
]

LOGIT_STRIDE = 13
LOGIT_TOP = 64


def logit_subset(logits):
    values = logits.tolist()
    idx = set(range(0, len(values), LOGIT_STRIDE))
    idx.update(torch.topk(logits, LOGIT_TOP).indices.tolist())
    idx = sorted(idx)
    return {"indices": idx, "values": [values[i] for i in idx]}


@torch.no_grad()
def greedy(model, ids, new_tokens):
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    prefill_logits = logits.clone()
    tokens = []
    for i in range(new_tokens):
        t = int(torch.argmax(logits))
        tokens.append(t)
        if i == new_tokens - 1:
            break
        out = model(input_ids=torch.tensor([[t]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    return tokens, prefill_logits, logits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="NAME=DIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    suffix = {"float32": "", "float16": "_f16", "bfloat16": "_bf16"}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    for spec in args.models:
        name, directory = spec.split("=", 1)
        model, info = GPT2LMHeadModel.from_pretrained(
            directory, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        missing = [k for k in info["missing_keys"] if not k.startswith("lm_head")]
        if missing or info["unexpected_keys"] or info["mismatched_keys"]:
            raise SystemExit(f"{directory}: transformers did not load every weight: {info}")
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        prompt_ids = [tok.encode(p).ids for p in PROMPTS]
        cases = []
        for case, batch, new_tokens in CASES:
            seqs = []
            for b in range(batch):
                tokens, prefill_logits, last_logits = greedy(model, prompt_ids[b], new_tokens)
                seq = {"prompt": PROMPTS[b], "prompt_ids": prompt_ids[b], "greedy": tokens}
                if case == "batch3_ragged":
                    seq["prefill_logits"] = logit_subset(prefill_logits)
                    seq["last_logits"] = logit_subset(last_logits)
                seqs.append(seq)
            cases.append({"name": case, "new_tokens": new_tokens, "sequences": seqs})
            print(f"{name}/{case}: {[s['greedy'][:8] for s in seqs]}", flush=True)
        fixture = {
            "model": name,
            # The directory is `gpt2rt synth --config NAME --seed 0 --dtype f32`.
            "synth": {"config": name, "seed": 0, "dtype": "f32"},
            "reference": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                "dtype": args.dtype,
                "attn_implementation": "eager",
            },
            "cases": cases,
        }
        path = os.path.join(args.out, f"parity_{name}{suffix}.json")
        with open(path, "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
        print(f"wrote {path} ({os.path.getsize(path)} bytes)", flush=True)


if __name__ == "__main__":
    main()
