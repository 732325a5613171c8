#!/usr/bin/env python3
"""GPT-2 124M training step (forward, backward, AdamW): PyTorch eager f32, and kiln with --kiln.

One step is: zero the gradients, forward of the batch (`GPT2LMHeadModel`, tied embeddings, no
dropout), mean cross-entropy over all batch·seq targets, backward, `torch.optim.AdamW` (lr 3e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on tensors of 2 or more dimensions, as nanoGPT's
configure_optimizers). Shapes: batch 4 × 64 tokens and 1 × 1024; 1 and 2 threads; each
(engine, shape, threads) in its own process so that its peak RSS is its own.

Reported per configuration: the median step time over --steps timed steps (after --warmup),
tokens/s (batch·seq per step), the fraction of the machine's FMA peak reached by the
conventional `6·N·tokens` flops per step (N = parameters, the tied token table counted once;
attention's own flops are not counted), and peak RSS. The peak comes from
`kiln bench peak --json` (op `fma`, same thread count), measured once at the start.

With --kiln, kiln runs `kiln bench gpt2-train --size 124M --batch B --seq T --threads N --json`
(fields `median_ms`, `threads`, `peak_fraction`, `tokens_per_s`, `peak_rss_mib`), and the table
adds kiln's rows and the kiln/PyTorch tokens/s ratio. If that command does not exist in the
binary, the kiln rows are skipped with a note.

    python3 benches/compare/gpt2_train.py [--kiln] [--kiln-bin target/release/kiln]
        [--shapes 4x64 1x1024] [--threads 1 2] [--steps 3] [--warmup 1] [--json out.jsonl]

Build kiln first: `cargo build --release`. `--layers N` shrinks the model (a quick smoke test of
the script); the default is GPT-2 124M's 12. A 124M step holds about 2 GB (weights, gradients,
two AdamW moments) plus activations; at 1 × 1024 a single-thread step takes tens of seconds on
a small machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

TORCH_CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
batch, seq, threads, steps, warmup, layers, attn = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=layers, n_head=12,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                 attn_implementation=attn)
model = GPT2LMHeadModel(cfg).float().train()
params = list(model.parameters())
n_params = sum(p.numel() for p in params)
decay = [p for p in params if p.dim() >= 2]
no_decay = [p for p in params if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
g = torch.Generator().manual_seed(1)
tokens = torch.randint(0, 50257, (batch, seq + 1), generator=g)
x, y = tokens[:, :-1], tokens[:, 1:]
times, losses = [], []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    opt.step()
    dt = (time.perf_counter() - t0) * 1e3
    losses.append(loss.item())
    if i >= warmup:
        times.append(dt)
print(json.dumps({
    "times_ms": times,
    "losses": losses,
    "n_params": n_params,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def child_env(threads):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(threads)
    return env


def fma_peaks(kiln):
    """{threads: GFLOP/s} from `kiln bench peak --json`; {} when kiln is not built."""
    if not os.path.exists(kiln):
        return {}
    out = subprocess.run([kiln, "bench", "peak", "--json"], capture_output=True, text=True)
    peaks = {}
    for line in out.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("op") == "fma":
            peaks[rec["threads"]] = rec["gflops"]
    return peaks


def run_torch(batch, seq, threads, steps, warmup, layers, attn):
    cmd = [sys.executable, "-c", TORCH_CHILD, str(batch), str(seq), str(threads), str(steps), str(warmup),
           str(layers), attn]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if out.returncode != 0:
        sys.exit(f"torch failed: {out.stderr.strip()[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["median_ms"] = statistics.median(r["times_ms"])
    r["tokens_per_s"] = batch * seq / (r["median_ms"] / 1e3)
    return r


def run_kiln(kiln, batch, seq, threads, layers):
    """kiln's record, or None (with the reason) when the command is not available."""
    if not os.path.exists(kiln):
        return None, f"{kiln} not found (cargo build --release)"
    cmd = [kiln, "bench", "gpt2-train", "--size", "124M", "--batch", str(batch), "--seq", str(seq),
           "--threads", str(threads), "--json"]
    if layers != 12:
        return None, "kiln runs the 124M model only (--layers is for PyTorch smoke tests)"
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        return None, f"`kiln bench gpt2-train` unavailable or failed: {err[-1] if err else out.returncode}"
    for line in reversed(out.stdout.strip().splitlines()):
        try:
            return json.loads(line), None
        except ValueError:
            continue
    return None, "kiln printed no JSON"


def parse_shape(s):
    b, t = s.lower().split("x")
    return int(b), int(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", action="store_true", help="also run `kiln bench gpt2-train` and print ratios")
    ap.add_argument("--kiln-bin", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--shapes", nargs="+", default=["4x64", "1x1024"], help="BATCHxSEQ")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--layers", type=int, default=12, help="PyTorch model depth (12 = GPT-2 124M)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers' attention implementation for PyTorch")
    ap.add_argument("--json", help="also write one JSON object per configuration to this file")
    args = ap.parse_args()

    peaks = fma_peaks(args.kiln_bin)
    if peaks:
        print(f"FMA peak GFLOP/s by threads (kiln bench peak): {peaks}", file=sys.stderr)
    else:
        print("no kiln binary: peak fractions are left out", file=sys.stderr)

    rows = []
    for shape in args.shapes:
        batch, seq = parse_shape(shape)
        tokens = batch * seq
        for threads in args.threads:
            t = run_torch(batch, seq, threads, args.steps, args.warmup, args.layers, args.attn)
            flops = 6.0 * t["n_params"] * tokens
            peak = peaks.get(threads)
            t_frac = flops / (t["median_ms"] / 1e3) / 1e9 / peak if peak else None
            row = {"shape": [batch, seq], "threads": threads, "n_params": t["n_params"],
                   "torch_median_ms": t["median_ms"], "torch_tokens_per_s": t["tokens_per_s"],
                   "torch_peak_fraction": t_frac, "torch_peak_rss_mib": t["peak_rss_mib"],
                   "torch_losses": t["losses"]}
            print(f"{batch}x{seq} threads={threads} torch: {t['median_ms']:9.1f} ms  {t['tokens_per_s']:8.1f} tok/s  "
                  f"{(t_frac or 0) * 100:5.1f}% of peak  RSS {t['peak_rss_mib']:6.0f} MiB", file=sys.stderr, flush=True)
            if args.kiln:
                k, why = run_kiln(args.kiln_bin, batch, seq, threads, args.layers)
                if k is None:
                    print(f"{batch}x{seq} threads={threads} kiln: skipped ({why})", file=sys.stderr)
                else:
                    row.update({"kiln_median_ms": k["median_ms"], "kiln_tokens_per_s": k["tokens_per_s"],
                                "kiln_peak_fraction": k["peak_fraction"], "kiln_peak_rss_mib": k.get("peak_rss_mib"),
                                "kiln_x_torch": k["tokens_per_s"] / t["tokens_per_s"]})
                    print(f"{batch}x{seq} threads={threads} kiln:  {k['median_ms']:9.1f} ms  "
                          f"{k['tokens_per_s']:8.1f} tok/s  {k['peak_fraction'] * 100:5.1f}% of peak  "
                          f"RSS {k.get('peak_rss_mib') or 0:6.0f} MiB  ({row['kiln_x_torch']:.2f}x torch)",
                          file=sys.stderr, flush=True)
            rows.append(row)

    print(f"\nGPT-2 training step, {args.layers} layers ({rows[0]['n_params'] / 1e6:.1f} M parameters), "
          f"f32; flops = 6·N·tokens\n")
    print("| batch × seq | threads | torch ms | torch tok/s | torch % peak | torch RSS MiB | kiln ms | kiln tok/s | "
          "kiln % peak | kiln RSS MiB | kiln × torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    pct = lambda v: f"{v * 100:.1f}%" if v is not None else ""
    num = lambda r, k, f: format(r[k], f) if r.get(k) is not None else ""
    for r in rows:
        print(f"| {r['shape'][0]} × {r['shape'][1]} | {r['threads']} | {r['torch_median_ms']:.1f} | "
              f"{r['torch_tokens_per_s']:.1f} | {pct(r['torch_peak_fraction'])} | {r['torch_peak_rss_mib']:.0f} | "
              f"{num(r, 'kiln_median_ms', '.1f')} | {num(r, 'kiln_tokens_per_s', '.1f')} | "
              f"{pct(r.get('kiln_peak_fraction'))} | {num(r, 'kiln_peak_rss_mib', '.0f')} | "
              f"{num(r, 'kiln_x_torch', '.2f')} |")
    if args.json:
        with open(args.json, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
