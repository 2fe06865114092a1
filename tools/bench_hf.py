#!/usr/bin/env python3
"""Hugging Face transformers eager baseline, timed the way `gpt2rt bench` times itself.

Same weights (a directory written by `gpt2rt synth`), same prompts (token i of the flattened batch
is (i * 7919 + 13) % vocab, prompt length P), greedy decoding of exactly N new tokens with the KV
cache (`generate(min_new_tokens=N, max_new_tokens=N)`), E2E from the host-side prompt to the
generated ids on the host, torch.cuda.synchronize() around each run, median of the timed runs.

Usage: bench_hf.py --model DIR --out FILE.json [--dtype f32|f16|bf16] [--reps 5]
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import GPT2LMHeadModel

GRID_BATCHES = [1, 8, 16]
GRID_NEW = [8, 12, 16, 32]


def prompt(batch, length, vocab):
    flat = [(i * 7919 + 13) % vocab for i in range(batch * length)]
    return torch.tensor(flat, dtype=torch.long).view(batch, length)


def time_generate(model, batch, length, new_tokens, reps):
    vocab = model.config.vocab_size
    ids_host = prompt(batch, length, vocab)
    times = []
    for rep in range(reps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ids = ids_host.to("cuda")
        mask = torch.ones_like(ids)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=50256,
        )
        out = out.cpu()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        assert out.shape == (batch, length + new_tokens), out.shape
        if rep > 0:
            times.append(ms)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = GPT2LMHeadModel.from_pretrained(args.model, torch_dtype=dtype, attn_implementation="eager").cuda().eval()
    results = []
    with torch.no_grad():
        for batch in GRID_BATCHES:
            for new in GRID_NEW:
                ms = time_generate(model, batch, 12, new, args.reps)
                results.append({"batch": batch, "new_tokens": new, "prompt_len": 12, "e2e_median_ms": ms})
                print(f"hf {args.dtype} B={batch} new={new}: {ms:.2f} ms", flush=True)
        for batch in [1, 64]:
            ms = time_generate(model, batch, 128, 128, max(2, args.reps // 2))
            results.append({"batch": batch, "new_tokens": 128, "prompt_len": 128, "e2e_median_ms": ms})
            print(f"hf {args.dtype} B={batch} ctx128: {ms:.2f} ms ({ms / 128:.3f} ms/token)", flush=True)
    doc = {
        "framework": "transformers eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0),
        "dtype": args.dtype,
        "reps": args.reps,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
