#!/usr/bin/env python3
"""kiln vs PyTorch CPU (oneDNN) on every DCGAN layer: forward and forward+backward, 1 and 2 threads.

For each layer and thread count, runs `kiln bench conv2d|conv-transpose2d ... --json` and then
times torch.nn.functional.conv2d / conv_transpose2d on the same shapes in this process, back to
back so both see the same machine load. Forward+backward computes the input and weight
gradients in both (no bias, as in DCGAN). Prints a markdown table; `speedup` = torch / kiln
(≥ 1 means kiln is at least as fast).

Usage: cargo build --release && python3 benches/compare/conv.py [--threads 1,2]
       [--batch 64] [--min-time 1.0] [--layers G1,D2] [--kiln target/release/kiln]
"""
import argparse
import json
import os
import subprocess
import time

import torch
import torch.nn.functional as F

LAYERS = [  # name, transposed, in, out, size, kernel, stride, padding
    ("G1", True, 100, 512, 1, 4, 1, 0),
    ("G2", True, 512, 256, 4, 4, 2, 1),
    ("G3", True, 256, 128, 8, 4, 2, 1),
    ("G4", True, 128, 64, 16, 4, 2, 1),
    ("G5", True, 64, 3, 32, 4, 2, 1),
    ("D1", False, 3, 64, 64, 4, 2, 1),
    ("D2", False, 64, 128, 32, 4, 2, 1),
    ("D3", False, 128, 256, 16, 4, 2, 1),
    ("D4", False, 256, 512, 8, 4, 2, 1),
    ("D5", False, 512, 1, 4, 4, 1, 0),
]


def median_ms(fn, min_time, min_reps=3, warmup=1):
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def torch_ms(layer, batch, backward, min_time):
    _, transposed, cin, cout, size, k, s, p = layer
    x = torch.randn(batch, cin, size, size)
    w = torch.randn(*((cin, cout, k, k) if transposed else (cout, cin, k, k)))
    op = (lambda x, w: F.conv_transpose2d(x, w, None, s, p)) if transposed else \
        (lambda x, w: F.conv2d(x, w, None, s, p))
    if not backward:
        with torch.no_grad():
            return median_ms(lambda: op(x, w), min_time)
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn_like(op(x, w))

    def step():
        x.grad = None
        w.grad = None
        op(x, w).backward(dy)
    return median_ms(step, min_time)


def kiln_record(kiln, layer, batch, threads, backward, min_time):
    _, transposed, cin, cout, size, k, s, p = layer
    cmd = [kiln, "bench", "conv-transpose2d" if transposed else "conv2d", "--batch", str(batch),
           "--in", str(cin), "--out", str(cout), "--size", str(size), "--kernel", str(k),
           "--stride", str(s), "--padding", str(p), "--threads", str(threads),
           "--min-time", str(min_time), "--json"]
    if backward:
        cmd.append("--backward")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=os.path.join(os.path.dirname(__file__), "../../target/release/kiln"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--layers", default=",".join(l[0] for l in LAYERS))
    args = ap.parse_args()
    wanted = args.layers.split(",")
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[:3]
    print(f"torch {torch.__version__}, batch {args.batch}, load average at start {' '.join(load0)}")
    print()
    print("| layer | pass | threads | kiln ms | torch ms | speedup | kiln GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in LAYERS:
        if layer[0] not in wanted:
            continue
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for backward in (False, True):
                rec = kiln_record(args.kiln, layer, args.batch, threads, backward, args.min_time)
                tms = torch_ms(layer, args.batch, backward, args.min_time)
                print(f"| {layer[0]} | {'fwd+bwd' if backward else 'fwd'} | {threads} | "
                      f"{rec['median_ms']:.3f} | {tms:.3f} | {tms / rec['median_ms']:.2f} | "
                      f"{rec['gflops']:.1f} | {100 * rec['peak_fraction']:.1f} |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\nload average at end {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
