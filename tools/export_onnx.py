#!/usr/bin/env python3
"""Export a Hugging Face GPT-2 directory to ONNX in the two forms gpt2rt's TensorRT backend runs,
and (with --validate) check each with ONNX Runtime (CPU) against gpt2rt's CPU backend.

  model_no_past.onnx  input_ids, attention_mask [B, S] -> logits [B, S, V]
                      (the original study's model: every step recomputes the sequence)
  model_kv.onnx       input_ids, attention_mask [B, P+S], position_ids [B, S],
                      past_key_values.{i}.key|value [B, H, P, D]
                      -> logits [B, S, V], present.{i}.key|value [B, H, P+S, D]

Batch, sequence and past are dynamic; opset 17, so every LayerNorm is one LayerNormalization node
(named, so `gpt2rt trt-command --fp16` can keep each in fp32 by name).

Two exporters, same inputs, outputs and names:
  torch  torch.onnx.export of transformers' GPT2LMHeadModel (eager attention), the study's path
         (needs torch and transformers; used where they are installed, e.g. the GPU machine);
  graph  the same network written node by node with onnx.helper from model.safetensors (needs
         only numpy, onnx and safetensors; what CI uses).
--exporter auto (the default) picks torch when it can be imported, else graph.

--validate runs `gpt2rt generate --backend cpu --json` on a ragged batch of prompts and decodes the
same prompts greedily with ONNX Runtime exactly as the TensorRT backend feeds an engine (no-past:
right padding, recompute every step; KV: left padding with position_ids, past fed back each step).
It fails unless the greedy tokens are equal and the prefill and last-step logits agree within
--tolerance (max |ort - cpu| / max |cpu| per row). It also checks that `gpt2rt trt-command` reads
each file. Usage:

  python tools/export_onnx.py --model DIR --out OUTDIR --validate [--gpt2rt target/release/gpt2rt]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

OPSET = 17
PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog because", "A"]


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return {
        "n_layer": cfg["n_layer"],
        "n_embd": cfg["n_embd"],
        "n_head": cfg["n_head"],
        "vocab_size": cfg["vocab_size"],
        "eps": cfg.get("layer_norm_epsilon", 1e-5),
    }


# ---------------------------------------------------------------------------------------------
# The graph exporter: onnx.helper, no torch.
# ---------------------------------------------------------------------------------------------


class GraphBuilder:
    def __init__(self):
        import onnx  # noqa: F401

        self.nodes = []
        self.inits = []
        self.count = 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint, array):
        from onnx import numpy_helper

        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def op(self, op_type, inputs, hint=None, node_name=None, outputs=1, **attrs):
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name or outs[0], **attrs))
        return outs[0] if outputs == 1 else outs


def load_weights(model_dir):
    from safetensors.numpy import load_file

    raw = load_file(os.path.join(model_dir, "model.safetensors"))
    out = {}
    for k, v in raw.items():
        key = k[len("transformer.") :] if k.startswith("transformer.") else k
        out[key] = v.astype(np.float32)
    return out


def export_graph(model_dir, path, kv):
    import onnx
    from onnx import TensorProto, helper

    cfg = load_config(model_dir)
    w = load_weights(model_dir)
    L, C, H, V = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"]
    D = C // H
    g = GraphBuilder()
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch", "total_sequence" if kv else "sequence"]
        ),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])]
    if kv:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
        for i in range(L):
            for part in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_key_values.{i}.{part}", TensorProto.FLOAT, ["batch", H, "past_sequence", D]
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(
                        f"present.{i}.{part}", TensorProto.FLOAT, ["batch", H, "total_sequence", D]
                    )
                )

    i64 = lambda v: g.const("c", np.array(v, dtype=np.int64))  # noqa: E731
    f32 = lambda v: g.const("c", np.array(v, dtype=np.float32))  # noqa: E731
    zero, one = i64(0), i64(1)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)  # S
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)  # P + S
    past_len = g.op("Sub", [total_len, seq_len])  # P
    if kv:
        positions = "position_ids"
    else:  # the study's model numbers positions 0..S-1 itself (right padding)
        positions = g.op("Unsqueeze", [g.op("Range", [zero, seq_len, one]), i64([0])])
    wte = g.const("wte", w["wte.weight"])
    h = g.op(
        "Add",
        [g.op("Gather", [wte, "input_ids"]), g.op("Gather", [g.const("wpe", w["wpe.weight"]), positions])],
        hint="embed",
    )
    # allowed[b, 1, s, t] = key t is at or before query s (absolute P + s) and not a pad.
    key_pos = g.op("Unsqueeze", [g.op("Range", [zero, total_len, one]), i64([0])])  # [1, T]
    query_pos = g.op("Unsqueeze", [g.op("Add", [g.op("Range", [zero, seq_len, one]), past_len]), i64([1])])  # [S, 1]
    causal = g.op("Unsqueeze", [g.op("LessOrEqual", [key_pos, query_pos]), i64([0, 1])])  # [1, 1, S, T]
    not_pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), i64([1, 2])])  # [B,1,1,T]
    allowed = g.op("And", [causal, not_pad], hint="allowed")
    masked = f32(np.finfo(np.float32).min)
    scale = f32(1.0 / np.sqrt(D))
    heads_shape = i64([0, 0, H, D])
    merge_shape = i64([0, 0, C])
    split = i64([C, C, C])

    def layer_norm(x, prefix, name):
        return g.op(
            "LayerNormalization",
            [x, g.const(name + "_g", w[prefix + ".weight"]), g.const(name + "_b", w[prefix + ".bias"])],
            node_name=name,
            axis=-1,
            epsilon=cfg["eps"],
        )

    def linear(x, prefix):
        return g.op("Add", [g.op("MatMul", [x, g.const("w", w[prefix + ".weight"])]), g.const("b", w[prefix + ".bias"])])

    def heads(x):  # [B, S, C] -> [B, H, S, D]
        return g.op("Transpose", [g.op("Reshape", [x, heads_shape])], perm=[0, 2, 1, 3])

    for i in range(L):
        p = f"h.{i}"
        x = layer_norm(h, f"{p}.ln_1", f"{p}.ln_1")
        q, k, v = g.op("Split", [linear(x, f"{p}.attn.c_attn"), split], outputs=3, axis=2)
        q, k, v = heads(q), heads(k), heads(v)
        if kv:
            k = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2)
            v = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2)
            g.nodes.append(helper.make_node("Identity", [k], [f"present.{i}.key"], name=f"present_{i}_key"))
            g.nodes.append(helper.make_node("Identity", [v], [f"present.{i}.value"], name=f"present_{i}_value"))
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        probs = g.op("Softmax", [g.op("Where", [allowed, scores, masked])], axis=-1)
        attn = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape])
        h = g.op("Add", [h, linear(attn, f"{p}.attn.c_proj")], hint="residual")
        x = linear(layer_norm(h, f"{p}.ln_2", f"{p}.ln_2"), f"{p}.mlp.c_fc")
        # gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [g.op("Pow", [x, f32(3.0)]), f32(0.044715)])]), f32(np.sqrt(2.0 / np.pi))])
        x = g.op("Mul", [g.op("Mul", [x, f32(0.5)]), g.op("Add", [g.op("Tanh", [inner]), f32(1.0)])])
        h = g.op("Add", [h, linear(x, f"{p}.mlp.c_proj")], hint="residual")
    h = layer_norm(h, "ln_f", "ln_f")
    head = g.const("lm_head", w["lm_head.weight"]) if "lm_head.weight" in w else wte  # [V, C]; tied when absent
    g.nodes.append(helper.make_node("MatMul", [h, g.op("Transpose", [head], perm=[1, 0])], ["logits"], name="lm_head"))
    graph = helper.make_graph(g.nodes, "gpt2rt_kv" if kv else "gpt2rt_no_past", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gpt2rt export_onnx.py")
    onnx.checker.check_model(model)
    onnx.save(model, path)


# ---------------------------------------------------------------------------------------------
# The torch exporter: torch.onnx.export of transformers' model.
# ---------------------------------------------------------------------------------------------


def export_torch(model_dir, path, kv):
    import torch
    from transformers import DynamicCache, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    cfg = model.config
    L, H, D = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    class NoPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class WithPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)])
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    B, S, P = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    if not kv:
        module = NoPast(model)
        example = (ids, torch.ones(B, S, dtype=torch.int64))
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        }
    else:
        module = WithPast(model)
        past = [torch.randn(B, H, P, D) for _ in range(2 * L)]
        names = [f"past_key_values.{i}.{p}" for i in range(L) for p in ("key", "value")]
        present = [f"present.{i}.{p}" for i in range(L) for p in ("key", "value")]
        example = (ids, torch.ones(B, P + S, dtype=torch.int64), torch.arange(P, P + S).repeat(B, 1), *past)
        input_names, output_names = ["input_ids", "attention_mask", "position_ids", *names], ["logits", *present]
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        }
        axes.update({n: {0: "batch", 2: "past_sequence"} for n in names})
        axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    common = {"input_names": input_names, "output_names": output_names, "dynamic_axes": axes, "opset_version": OPSET}
    errors = []
    # The TorchScript exporter first (what the study used); where this torch no longer has it or it
    # fails, the dynamo exporter (needs onnxscript), which converts dynamic_axes itself.
    for dynamo in (False, True):
        try:
            with torch.no_grad():
                torch.onnx.export(module, example, path, dynamo=dynamo, **common)
            break
        except Exception as e:  # noqa: BLE001 - report and try the other exporter
            errors.append(f"torch.onnx.export(dynamo={dynamo}): {type(e).__name__}: {e}")
    else:
        raise RuntimeError("; ".join(errors))
    for e in errors:
        print(f"note: {e.splitlines()[0][:300]} (used the other exporter)")
    name_layer_norms(path)


def name_layer_norms(path):
    """Gives unnamed LayerNormalization nodes a stable name (trt-command pins them by name)."""
    import onnx

    model = onnx.load(path)
    changed = False
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and not node.name:
            node.name = f"LayerNorm_{i}"
            changed = True
    if not any(n.op_type == "LayerNormalization" for n in model.graph.node):
        print(f"warning: {path} has no LayerNormalization node (decomposed LayerNorm): trt-command --fp16 will refuse it")
    if changed:
        onnx.save(model, path)


# ---------------------------------------------------------------------------------------------
# Validation: ONNX Runtime (CPU) against gpt2rt's CPU backend.
# ---------------------------------------------------------------------------------------------


def find_gpt2rt(explicit):
    if explicit:
        return explicit
    here = os.path.dirname(os.path.abspath(__file__))
    built = os.path.join(here, "..", "target", "release", "gpt2rt")
    if os.path.exists(built):
        return built
    found = shutil.which("gpt2rt")
    if found:
        return found
    sys.exit("gpt2rt binary not found: build it (cargo build --release) or pass --gpt2rt PATH")


def cpu_reference(gpt2rt, model_dir, new_tokens, workdir):
    out = os.path.join(workdir, "cpu.json")
    cmd = [gpt2rt, "generate", "--model", model_dir, "--backend", "cpu", "--max-new-tokens", str(new_tokens), "--json", out, *PROMPTS]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def relative_error(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def decode_no_past(session, prompts, new_tokens):
    """Right padding, the whole sequence every step (what the backend does without past)."""
    seqs = [list(p) for p in prompts]
    generated = [[] for _ in prompts]
    first = last = None
    for step in range(new_tokens):
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            mask[b, : len(s)] = 1
        logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        rows = np.stack([logits[b, len(s) - 1] for b, s in enumerate(seqs)])
        first = rows if first is None else first
        last = rows
        nxt = rows.argmax(axis=-1)
        for b, t in enumerate(nxt):
            seqs[b].append(int(t))
            generated[b].append(int(t))
    return generated, first, last


def decode_kv(session, prompts, new_tokens, n_layer, n_head, head_dim):
    """Left padding with position_ids, past fed back every step (what the backend does)."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = np.zeros((batch, width), dtype=np.int64)
    mask = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, pads[b] :] = p
        mask[b, pads[b] :] = 1
        pos[b, pads[b] :] = np.arange(len(p))
    past = {
        f"past_key_values.{i}.{part}": np.zeros((batch, n_head, 0, head_dim), dtype=np.float32)
        for i in range(n_layer)
        for part in ("key", "value")
    }
    out_names = ["logits"] + [f"present.{i}.{p}" for i in range(n_layer) for p in ("key", "value")]
    lens = [len(p) for p in prompts]
    generated = [[] for _ in prompts]
    first = last = None
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
    for step in range(new_tokens):
        outs = session.run(out_names, feed)
        rows = outs[0][:, -1, :]
        first = rows if first is None else first
        last = rows
        nxt = rows.argmax(axis=-1)
        for b, t in enumerate(nxt):
            generated[b].append(int(t))
        total = outs[1].shape[2] + 1
        mask = np.array([[0] * pads[b] + [1] * (total - pads[b]) for b in range(batch)], dtype=np.int64)
        feed = {
            "input_ids": nxt.reshape(batch, 1).astype(np.int64),
            "attention_mask": mask,
            "position_ids": np.array([[n] for n in lens], dtype=np.int64),
        }
        feed.update({name.replace("present.", "past_key_values."): o for name, o in zip(out_names[1:], outs[1:])})
        lens = [n + 1 for n in lens]
    return generated, first, last


def validate(path, kv, model_dir, ref, tolerance, gpt2rt):
    import onnxruntime as ort

    cfg = load_config(model_dir)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    prompts, want, new_tokens = ref["prompts"], ref["tokens"], len(ref["tokens"][0])
    if kv:
        got, first, last = decode_kv(session, prompts, new_tokens, cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"])
    else:
        got, first, last = decode_no_past(session, prompts, new_tokens)
    err_first = relative_error(first, ref["prefill_logits"])
    err_last = relative_error(last, ref["last_logits"])
    same = got == want
    form = "kv" if kv else "no-past"
    print(
        f"{os.path.basename(path)} ({form}): {sum(len(t) for t in got)} greedy tokens over {len(prompts)} ragged sequences "
        f"{'equal' if same else 'DIFFER'}; prefill logits rel err {err_first:.2e}, last-step {err_last:.2e} (tolerance {tolerance:g})"
    )
    if not same:
        for b, (g_, w_) in enumerate(zip(got, want)):
            if g_ != w_:
                print(f"  sequence {b}: onnxruntime {g_}\n  sequence {b}: gpt2rt cpu  {w_}")
    ok = same and err_first <= tolerance and err_last <= tolerance
    cmd = subprocess.run(
        [gpt2rt, "trt-command", "--onnx", path, "--max-batch", "4", "--max-seq", "64", "--fp16"],
        capture_output=True,
        text=True,
    )
    if cmd.returncode != 0 or "trtexec --onnx=" not in cmd.stdout:
        print(f"  gpt2rt trt-command could not plan {path}:\n{cmd.stdout}{cmd.stderr}")
        ok = False
    else:
        print(f"  gpt2rt trt-command reads it ({cmd.stdout.count('--profile=') or 1} profile(s), LayerNorm layers pinned to fp32)")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face GPT-2 directory (config.json, model.safetensors)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--exporter", choices=["auto", "torch", "graph"], default="auto")
    ap.add_argument("--forms", default="no-past,kv", help="comma-separated: no-past, kv")
    ap.add_argument("--validate", action="store_true", help="check with ONNX Runtime against gpt2rt's CPU backend")
    ap.add_argument("--gpt2rt", help="the gpt2rt binary (default: target/release/gpt2rt, else PATH)")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    exporter = args.exporter
    if exporter == "auto":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401

            exporter = "torch"
        except ImportError:
            exporter = "graph"
    os.makedirs(args.out, exist_ok=True)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    for f in forms:
        if f not in ("no-past", "kv"):
            sys.exit(f"unknown form {f!r} (expected no-past, kv)")
    paths = {}
    for form in forms:
        path = os.path.join(args.out, "model_kv.onnx" if form == "kv" else "model_no_past.onnx")
        used = exporter
        if exporter == "torch":
            try:
                export_torch(args.model, path, form == "kv")
            except Exception as e:  # noqa: BLE001
                if args.exporter == "torch":
                    raise
                print(f"WARNING: the torch exporter failed ({type(e).__name__}: {str(e)[:500]}); using the graph exporter")
                used = "graph"
        if used == "graph":
            export_graph(args.model, path, form == "kv")
        print(f"exported {path} ({used} exporter, {os.path.getsize(path) / 1e6:.1f} MB)")
        paths[form] = path
    for name in ("config.json", "tokenizer.json"):
        src = os.path.join(args.model, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.out, name))
    if not args.validate:
        return 0
    gpt2rt = find_gpt2rt(args.gpt2rt)
    with tempfile.TemporaryDirectory() as work:
        ref = cpu_reference(gpt2rt, args.model, args.new_tokens, work)
    ok = all([validate(paths[f], f == "kv", args.model, ref, args.tolerance, gpt2rt) for f in forms])
    print("validation passed" if ok else "validation FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
