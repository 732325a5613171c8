"""kiln attention vs PyTorch scaled_dot_product_attention, side by side, same shapes.

Runs `kiln bench attention --json` and torch (CPU, float32) for causal prefill at
T = 128, 512, 1024, 2048 (batch 1, 12 heads, head_dim 64) and a decode step over a 1024-token
cache, at 1 and 2 threads, interleaving the two so that both see the same machine load.
Reports wall-clock medians and CPU time per call (steadier on a shared machine), and the
kiln/torch speed ratios (> 1 means kiln is faster).

    python3 benches/compare/attention.py [--kiln target/release/kiln] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F


def torch_time(fn, min_s):
    for _ in range(2):
        fn()
    times = []
    c0 = time.process_time()
    start = time.perf_counter()
    calls = 0
    while len(times) < 5 or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        calls += 1
    cpu = (time.process_time() - c0) / calls
    return statistics.median(times) * 1e3, cpu * 1e3


def torch_prefill(t, heads, d, threads, min_s):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, heads, t, d, generator=g) * 2 - 1 for _ in range(3))
    return torch_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), min_s)


def torch_decode(t, heads, d, threads, min_s):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    # A preallocated cache [1, heads, capacity, d]; attend over its first t positions.
    kc = torch.rand(1, heads, t, d, generator=g)
    vc = torch.rand(1, heads, t, d, generator=g)
    q = torch.rand(1, heads, 1, d, generator=g)
    return torch_time(lambda: F.scaled_dot_product_attention(q, kc, vc), min_s)


def kiln(binary, args, threads, min_ms):
    out = subprocess.run(
        [binary, "bench", "attention", "--json", "--threads", str(threads), "--min-ms", str(min_ms)]
        + args,
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=os.path.join("target", "release", "kiln"))
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--seqs", default="128,512,1024,2048")
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    min_s = 0.5 if a.quick else 2.0
    heads, d = 12, 64
    print(f"load average before: {os.getloadavg()}")
    print(f"{'case':<28}{'thr':>4}{'kiln ms':>10}{'torch ms':>10}{'wall x':>8}"
          f"{'kiln cpu':>10}{'torch cpu':>10}{'cpu x':>8}{'kiln GF/s':>11}")
    for threads in [int(x) for x in a.threads.split(",")]:
        for t in [int(x) for x in a.seqs.split(",")]:
            k = kiln(a.kiln, ["--seq", str(t), "--heads", str(heads), "--head-dim", str(d),
                              "--causal"], threads, int(min_s * 1000))
            tw, tc = torch_prefill(t, heads, d, threads, min_s)
            kc = k.get("cpu_ms", float("nan"))
            print(f"{'prefill causal T=' + str(t):<28}{threads:>4}{k['median_ms']:>10.3f}{tw:>10.3f}"
                  f"{tw / k['median_ms']:>8.2f}{kc:>10.3f}{tc:>10.3f}{tc / kc:>8.2f}"
                  f"{k['gflops']:>11.1f}")
        k = kiln(a.kiln, ["--seq", "1024", "--heads", str(heads), "--head-dim", str(d), "--decode"],
                 threads, int(min_s * 1000))
        tw, tc = torch_decode(1024, heads, d, threads, min_s)
        kc = k.get("cpu_ms", float("nan"))
        print(f"{'decode cache=1024':<28}{threads:>4}{k['median_ms']:>10.4f}{tw:>10.4f}"
              f"{tw / k['median_ms']:>8.2f}{kc:>10.4f}{tc:>10.4f}{tc / kc:>8.2f}"
              f"{k['gbps']:>8.1f} GB/s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
