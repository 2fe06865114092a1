#!/usr/bin/env python3
"""Turns the JSON that tools/bench_cuda.sh wrote on the GPU machine into bench/results/:
a combined JSON, a markdown table (gpt2rt vs Hugging Face eager, same call, same weights) and a
PNG plot of per-token latency vs batch and vs context with the memory-bandwidth floor drawn, named
after the card (cuda_h100.*, cuda_h200.*: each card's latest tables stay side by side).

Usage: bench_report.py RAW_DIR OUT_DIR
"""

import glob
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The floor of a batch-1 step: distilgpt2's weights streamed once (~325 MB in f32, ~162 MB in
# f16/bf16) at the card's bandwidth: ~2.95 TB/s on the H100 (ARCHITECTURE.md's 55 and 110 us), and
# ~4.3 TB/s on the H200 (a device-to-device copy, reads and writes counted, measured on the lent
# H200 machines). Other cards: no floor.
WEIGHT_MB = {"f32": 325.0, "f16": 162.0, "bf16": 162.0}
BANDWIDTH_TBS = {"h100": 2.95, "h200": 4.3}


def card_slug(card):
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", card)
    return m.group(1).lower() if m else "gpu"


def load(path):
    with open(path) as f:
        return json.load(f)


def main():
    raw, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    card = open(os.path.join(raw, "card.txt")).read().split("\n")
    combined = {"card": card[0].strip(), "date": card[1].strip(), "gpt2rt": {}, "hf": {}}
    slug = card_slug(combined["card"])
    bw = BANDWIDTH_TBS.get(slug)
    floor_us = {d: mb / bw for d, mb in WEIGHT_MB.items()} if bw else {}
    for path in sorted(glob.glob(os.path.join(raw, "gpt2rt_*.json"))):
        combined["gpt2rt"][os.path.basename(path)[len("gpt2rt_") : -5]] = load(path)
    for path in sorted(glob.glob(os.path.join(raw, "hf_*.json"))):
        combined["hf"][os.path.basename(path)[3:-5]] = load(path)
    with open(os.path.join(out, f"cuda_{slug}.json"), "w") as f:
        json.dump(combined, f, indent=1)

    def cell(rows, batch, new, prompt, kv=True, key="e2e_median_ms"):
        for r in rows:
            if r["batch"] == batch and r["new_tokens"] == new and r["prompt_len"] == prompt and r.get("kv_cache", True) == kv:
                return r.get(key)
        return None

    def fmt(v, scale=1.0, digits=2):
        return f"{v * scale:.{digits}f}" if v is not None else "-"

    lines = [
        f"# CUDA backend benchmark: {combined['card']}, {combined['date']}",
        "",
        "Synthetic distilgpt2 weights (same directory for both), greedy, E2E median: from the host prompt to the",
        "generated ids on the host. Hugging Face = transformers `generate` in eager mode with its KV cache, in the",
        "same device call. Reproduce: `bash tools/gpu_bundle.sh`, then on the GPU machine `bash tools/gpu_check.sh`",
        "(it runs tools/bench_cuda.sh), then `python3 tools/bench_report.py RAW_DIR bench/results`.",
        "Kernels: the device time of gpt2rt's forward passes alone (CUDA events around each prefill and",
        "step graph, in as many runs again: E2E is measured with those events off), beside E2E like the",
        "study's sanity table; the difference is launches, copies and host work. Kernels a step: the",
        "steps alone, (kernels of the prompt + 128 tokens - kernels of the prompt + 1 token) / 127, a",
        "mean over contexts 129-255 (the targets are stated per step).",
        "",
        "## The study's grid (prompt 12 tokens)",
        "",
        "| dtype | batch | new tokens | gpt2rt KV on (ms) | kernels (ms) | gpt2rt KV off (ms) | HF eager (ms) | speed-up vs HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in ["f32", "f16"]:
        ours = combined["gpt2rt"].get(f"grid_{dtype}", {}).get("results", [])
        hf = combined["hf"].get(dtype, {}).get("results", [])
        for batch in [1, 8, 16]:
            for new in [8, 12, 16, 32]:
                on, off, ref = cell(ours, batch, new, 12), cell(ours, batch, new, 12, False), cell(hf, batch, new, 12)
                if on is None:
                    continue
                kern = cell(ours, batch, new, 12, key="device_median_ms")
                speed = f"{ref / on:.1f}x" if ref else "-"
                lines.append(f"| {dtype} | {batch} | {new} | {on:.2f} | {fmt(kern)} | {fmt(off)} | {fmt(ref)} | {speed} |")
    lines += ["", "## Per-token latency, prompt 128, 128 new tokens (E2E / 128, prefill included)", "",
              "| dtype | batch | gpt2rt (us/token) | kernels (us/token) | kernels a step (us) | HF eager (us/token) | speed-up vs HF | floor (us/step, B=1) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in ["f32", "f16", "bf16"]:
        ours = combined["gpt2rt"].get(f"batch_{dtype}", {}).get("results", [])
        hf = combined["hf"].get(dtype, {}).get("results", [])
        for batch in [1, 8, 16, 64]:
            on, ref = cell(ours, batch, 128, 128), cell(hf, batch, 128, 128)
            if on is None:
                continue
            kern = cell(ours, batch, 128, 128, key="device_median_ms")
            first = cell(ours, batch, 1, 128, key="device_median_ms")
            step = (kern - first) / 127 if kern is not None and first is not None else None
            speed = f"{ref / on:.1f}x" if ref else "-"
            lines.append(
                f"| {dtype} | {batch} | {on * 1e3 / 128:.0f} | {fmt(kern, 1e3 / 128, 0)} | {fmt(step, 1e3, 0)} | {fmt(ref, 1e3 / 128, 0)} | {speed} | {fmt(floor_us.get(dtype), 1.0, 0)} |"
            )
    with open(os.path.join(out, f"cuda_{slug}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype, style in [("f32", "o-"), ("f16", "s-"), ("bf16", "^-")]:
        rows = combined["gpt2rt"].get(f"batch_{dtype}", {}).get("results", [])
        pts = sorted((r["batch"], r["e2e_median_ms"] * 1e3 / r["new_tokens"]) for r in rows if r["new_tokens"] == 128)
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"gpt2rt {dtype}")
        ctx = []
        for path in glob.glob(os.path.join(raw, f"gpt2rt_ctx*_{dtype}.json")):
            for r in load(path)["results"]:
                ctx.append((r["prompt_len"] + r["new_tokens"] // 2, r["e2e_median_ms"] * 1e3 / r["new_tokens"]))
        ctx.sort()
        if ctx:
            ax2.plot([p[0] for p in ctx], [p[1] for p in ctx], style, label=f"gpt2rt {dtype}")
    for dtype in ["f32", "f16"]:
        hf = [r for r in combined["hf"].get(dtype, {}).get("results", []) if r["prompt_len"] == 128]
        pts = sorted((r["batch"], r["e2e_median_ms"] * 1e3 / r["new_tokens"]) for r in hf)
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], "x--", label=f"HF eager {dtype}")
    for ax in (ax1, ax2):
        if floor_us:
            ax.axhline(floor_us["f32"], color="gray", ls=":", label="floor f32 (B=1)")
            ax.axhline(floor_us["f16"], color="black", ls=":", label="floor f16/bf16 (B=1)")
        ax.set_yscale("log")
        ax.set_ylabel("us per token (E2E)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch (prompt 128, 128 new tokens)")
    ax2.set_xlabel("mean context length (batch 1, 128 new tokens)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"gpt2rt CUDA backend, synthetic distilgpt2, {combined['card']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"cuda_{slug}.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
