#!/usr/bin/env python3
"""Writes the seed corpus of the safetensors and config_json fuzz targets into fuzz/seeds/.

Deterministic (a fixed LCG, no dependencies): running it again gives the same bytes. Each
safetensors seed is one byte choosing the fuzz target's config, then a complete safetensors file
for that config: f32, f16 and bf16; with and without the `transformer.` prefix; with an explicit
lm_head; with the attention-mask buffers HF checkpoints carry.
    python3 fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
# Same order as CONFIGS in fuzz_targets/safetensors.rs: (n_layer, n_embd, n_head, n_positions, vocab).
CONFIGS = [(1, 8, 2, 8, 16), (2, 4, 1, 4, 8), (3, 4, 2, 2, 4)]


class Lcg:
    def __init__(self, seed):
        self.state = seed

    def value(self):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return ((self.state >> 40) / float(1 << 24) - 0.5) * 0.1


def tensors(config, prefix, lm_head, buffers):
    n_layer, c, _, n_pos, vocab = config
    out = [("wte.weight", [vocab, c]), ("wpe.weight", [n_pos, c])]
    for i in range(n_layer):
        h = f"h.{i}."
        out += [
            (h + "ln_1.weight", [c]), (h + "ln_1.bias", [c]),
            (h + "attn.c_attn.weight", [c, 3 * c]), (h + "attn.c_attn.bias", [3 * c]),
            (h + "attn.c_proj.weight", [c, c]), (h + "attn.c_proj.bias", [c]),
            (h + "ln_2.weight", [c]), (h + "ln_2.bias", [c]),
            (h + "mlp.c_fc.weight", [c, 4 * c]), (h + "mlp.c_fc.bias", [4 * c]),
            (h + "mlp.c_proj.weight", [4 * c, c]), (h + "mlp.c_proj.bias", [c]),
        ]
        if buffers:
            out.append((h + "attn.bias", [1, 1, n_pos, n_pos]))
    out += [("ln_f.weight", [c]), ("ln_f.bias", [c])]
    named = [(prefix + name, shape) for name, shape in out]
    if lm_head:
        named.append(("lm_head.weight", [vocab, c]))
    return named


def encode(values, dtype):
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    # BF16: the high half of the f32 bits.
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)


def safetensors(named, dtype, rng):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in named:
        n = 1
        for d in shape:
            n *= d
        blob = encode([rng.value() for _ in range(n)], dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def config_json(config):
    n_layer, c, heads, n_pos, vocab = config
    return json.dumps({"model_type": "gpt2", "activation_function": "gelu_new", "n_layer": n_layer,
                       "n_embd": c, "n_head": heads, "n_positions": n_pos, "n_ctx": n_pos,
                       "n_inner": None, "vocab_size": vocab, "layer_norm_epsilon": 1e-05}, indent=2)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    for index, config in enumerate(CONFIGS):
        variants = [
            (dtype, prefix, False, False)
            for dtype in ("F32", "F16", "BF16") for prefix in ("transformer.", "")
        ] + [("F32", "transformer.", True, False), ("F16", "", True, True)]
        for dtype, prefix, lm_head, buffers in variants:
            rng = Lcg(index * 1000 + len(prefix) + (7 if lm_head else 0))
            name = f"c{index}_{dtype.lower()}{'_prefix' if prefix else ''}{'_lmhead' if lm_head else ''}"
            name += "_buffers" if buffers else ""
            data = bytes([index]) + safetensors(tensors(config, prefix, lm_head, buffers), dtype, rng)
            write(os.path.join(HERE, "seeds", "safetensors", name), data)
        write(os.path.join(HERE, "seeds", "config_json", f"c{index}.json"), config_json(config).encode())
    # The built-in presets' shapes, as HF writes them.
    for name, (n_layer, c, heads, n_pos) in {"distilgpt2": (6, 768, 12, 1024), "gpt2": (12, 768, 12, 1024)}.items():
        write(os.path.join(HERE, "seeds", "config_json", f"{name}.json"),
              config_json((n_layer, c, heads, n_pos, 50257)).encode())
    write(os.path.join(HERE, "seeds", "config_json", "hf_names.json"),
          b'{"num_hidden_layers":2,"hidden_size":64,"num_attention_heads":4,'
          b'"max_position_embeddings":512,"vocab_size":50257}')


if __name__ == "__main__":
    main()
