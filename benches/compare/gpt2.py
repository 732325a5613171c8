#!/usr/bin/env python3
"""GPT-2 124M decode and prefill: kiln against PyTorch eager (transformers), side by side.

Both engines run the same randomly initialised checkpoint (written by `kiln gpt2 init` when the
folder does not exist), the same 128-token prompt, greedy decoding of 128 new tokens, on 1 and 2
threads, each configuration in its own process so that peak resident memory is its own:

* kiln f32 and bf16 weights: `kiln gpt2 generate --json` (prefill_ms, decode_tokens_per_s,
  load_ms, peak_rss_mb from the process's VmHWM); `kiln-bf16-bf16mm` is bf16 weights with
  `--matmul-precision bf16` (the prefill on AMX or AVX512-BF16 with bf16 activations, as PyTorch's
  bf16 model computes, where the CPU has them);
* PyTorch f32 and bf16: `GPT2LMHeadModel` (eager attention) with the same loop: one forward
  over the prompt (prefill, which also picks the first token), then 127 single-token steps with
  the KV cache; peak RSS is the process's ru_maxrss.

Decode tokens/s counts the steps after the prefill (127), for both. PyTorch bf16 decodes only
--torch-bf16-new tokens (default 16): on CPUs without native bf16 arithmetic (AVX2 only) its bf16
kernels run at well under 1 GFLOP/s, and a rate needs no more.

    python3 benches/compare/gpt2.py [--model DIR] [--kiln target/release/kiln]
        [--threads 1 2] [--repeats 2] [--json out.jsonl]

Build kiln first: `cargo build --release`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

TORCH_CHILD = r"""
import json, os, resource, sys, time
t_start = time.perf_counter()
import torch
from transformers import GPT2LMHeadModel
model_dir, dtype, threads, ids, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
t0 = time.perf_counter()
dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dt, attn_implementation="eager").eval()
load_ms = (time.perf_counter() - t0) * 1e3
x = torch.tensor([ids])
out_ids = []
with torch.inference_mode():
    # Warm-up on a short prompt (one-time kernel selection), as kiln has none to do.
    model(x[:, :8], use_cache=True)
    t0 = time.perf_counter()
    o = model(x, use_cache=True)
    nxt = int(o.logits[0, -1].float().argmax())
    prefill_ms = (time.perf_counter() - t0) * 1e3
    past = o.past_key_values
    out_ids.append(nxt)
    t1 = time.perf_counter()
    for _ in range(new - 1):
        o = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = o.past_key_values
        nxt = int(o.logits[0, -1].float().argmax())
        out_ids.append(nxt)
    decode_s = time.perf_counter() - t1
print(json.dumps({
    "ids": out_ids,
    "load_ms": load_ms,
    "prefill_ms": prefill_ms,
    "decode_tokens_per_s": (new - 1) / decode_s,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def prompt_ids(model_dir, n):
    """A prompt of exactly n tokens (plain English words) and its ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(os.path.join(model_dir, "vocab.json"), os.path.join(model_dir, "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ("the capital of France is Paris and the river that runs through it is the Seine which "
             "flows into the sea near Le Havre after passing Rouen").split()
    text, i = "", 0
    while True:
        cand = (text + " " + words[i % len(words)]) if text else words[0]
        if len(tok.encode(cand).ids) > n:
            break
        text, i = cand, i + 1
    ids = tok.encode(text).ids
    assert len(ids) == n, (len(ids), n)
    return text, ids


def child_env(threads):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(threads)
    return env


def run_kiln(kiln, model_dir, text, dtype, threads, new, precision="f32"):
    cmd = [kiln, "gpt2", "generate", "--model", model_dir, "--prompt", text, "--max-new-tokens", str(new),
           "--greedy", "--dtype", dtype, "--threads", str(threads), "--json", "--matmul-precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if out.returncode != 0:
        sys.exit(f"kiln failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def run_torch(model_dir, ids, dtype, threads, new):
    cmd = [sys.executable, "-c", TORCH_CHILD, model_dir, dtype, str(threads), json.dumps(ids), str(new)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if out.returncode != 0:
        sys.exit(f"torch failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(runs):
    """The best of repeated runs (least disturbed by other load): max tok/s, min times."""
    r = dict(runs[0])
    r["decode_tokens_per_s"] = max(x["decode_tokens_per_s"] for x in runs)
    r["prefill_ms"] = min(x["prefill_ms"] for x in runs)
    r["load_ms"] = min(x["load_ms"] for x in runs)
    r["peak_rss_mb"] = max(x["peak_rss_mb"] or 0 for x in runs)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/kiln-gpt2-124M")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-bf16-new", type=int, default=16,
                    help="new tokens for PyTorch bf16, which is very slow on CPUs without native bf16 "
                         "(decode tokens/s is a rate, so fewer tokens measure it too)")
    ap.add_argument("--torch-bf16-repeats", type=int, default=1)
    ap.add_argument("--engines", nargs="+", default=["torch-f32", "torch-bf16", "kiln-f32", "kiln-bf16", "kiln-bf16-bf16mm"])
    ap.add_argument("--json", help="also write one JSON object per configuration to this file")
    args = ap.parse_args()

    if not os.path.exists(os.path.join(args.model, "config.json")):
        print(f"writing a random GPT-2 124M to {args.model}", file=sys.stderr)
        subprocess.run([args.kiln, "gpt2", "init", "--out", args.model, "--size", "124M"], check=True)
    text, ids = prompt_ids(args.model, args.prompt_len)
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    c, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    # Bytes of weights one decode step streams (block matrices + the tied output projection).
    params_streamed = L * 12 * c * c + V * c

    # The machine's memory bandwidth in this run (triad, best pass), per thread count: the
    # decode roofline is bandwidth / bytes per token.
    triad = {}
    out = subprocess.run([args.kiln, "bench", "peak", "--json", "--reps", "5"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("op") == "triad":
            triad[rec["threads"]] = rec["gbps"]
    print(f"triad bandwidth GB/s by threads: {triad}", file=sys.stderr)

    rows = []
    for threads in args.threads:
        res = {}
        for eng in args.engines:
            runs = []
            slow = eng == "torch-bf16"
            for _ in range(args.torch_bf16_repeats if slow else args.repeats):
                kind, dtype, *rest = eng.split("-")
                precision = "bf16" if rest == ["bf16mm"] else "f32"
                r = (run_kiln(args.kiln, args.model, text, dtype, threads, args.new, precision) if kind == "kiln"
                     else run_torch(args.model, ids, dtype, threads, args.torch_bf16_new if slow else args.new))
                runs.append(r)
            res[eng] = best(runs)
            r = res[eng]
            bytes_tok = params_streamed * (4 if eng.endswith("f32") else 2)
            r["gb_per_s"] = bytes_tok * r["decode_tokens_per_s"] / 1e9
            bw = max(triad.values()) if triad else None
            r["roofline_fraction"] = r["gb_per_s"] / bw if bw else None
            # Against what this many threads can read: one core cannot pull the whole triad.
            bw_t = triad.get(threads)
            r["roofline_fraction_threads"] = r["gb_per_s"] / bw_t if bw_t else None
            print(f"threads={threads} {eng:<16} decode {r['decode_tokens_per_s']:7.1f} tok/s "
                  f"({r['gb_per_s']:5.1f} GB/s)  prefill {r['prefill_ms']:7.1f} ms  load {r['load_ms']:6.0f} ms  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB", file=sys.stderr, flush=True)
        if "kiln-f32" in res and "torch-f32" in res:
            same = res["kiln-f32"]["ids"] == res["torch-f32"]["ids"]
            print(f"threads={threads} greedy ids kiln-f32 == torch-f32: {same}", file=sys.stderr)
        for eng, r in res.items():
            row = {"engine": eng, "threads": threads, **{k: v for k, v in r.items() if k not in ("ids", "text", "prompt_ids")}}
            for peer in ("torch-f32", "torch-bf16"):
                if peer in res and eng.startswith("kiln"):
                    p = res[peer]
                    row[f"decode_x_{peer}"] = r["decode_tokens_per_s"] / p["decode_tokens_per_s"]
                    row[f"prefill_x_{peer}"] = p["prefill_ms"] / r["prefill_ms"]
            rows.append(row)

    print("\n| engine | threads | decode tok/s | GB/s | of triad | of triad (these threads) | prefill 128 ms | load ms | peak RSS MB | decode × torch f32 | decode × torch bf16 | prefill × torch f32 | prefill × torch bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda row, k: f"{row[k]:.2f}" if k in row else ""
    for row in rows:
        print(f"| {row['engine']} | {row['threads']} | {row['decode_tokens_per_s']:.1f} | {row['gb_per_s']:.1f} | "
              f"{(row['roofline_fraction'] or 0) * 100:.0f}% | {(row['roofline_fraction_threads'] or 0) * 100:.0f}% | "
              f"{row['prefill_ms']:.1f} | {row['load_ms']:.0f} | {row['peak_rss_mb']:.0f} | {f(row, 'decode_x_torch-f32')} | "
              f"{f(row, 'decode_x_torch-bf16')} | {f(row, 'prefill_x_torch-f32')} | {f(row, 'prefill_x_torch-bf16')} |")
    if args.json:
        with open(args.json, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
