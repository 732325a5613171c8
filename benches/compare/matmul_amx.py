#!/usr/bin/env python3
"""kiln's native bf16 GEMM (AMX tiles, or AVX512-BF16 `vdpbf16ps` on CPUs without AMX) against
PyTorch's bf16 matmul (oneDNN), side by side in one run.

Runs `cargo run --release --example amx_bench` (JSON lines, see examples/amx_bench.rs), then
torch.matmul on bf16 tensors of the same shapes at the same thread counts, and prints GFLOP/s,
kiln's fraction of the measured peak of the kernel it runs (one core's tdpbf16ps or vdpbf16ps
throughput × threads) and the ratio kiln / torch.

    python3 benches/compare/matmul_amx.py            # all shapes
    python3 benches/compare/matmul_amx.py --quick    # fewer repetitions
    python3 benches/compare/matmul_amx.py --emulated # no AMX here: software
                                                                    # tile model, small shapes

Notes: torch returns a bf16 C, kiln an f32 C (kiln writes twice the output bytes). kiln's
`matmul_amx` rounds an f32 A and packs B inside every call; `matmul_amx_prepacked` packs B
once beforehand (how model weights are used). Numbers taken while other work runs on the
machine are noisy: the ratio, measured back to back, is the figure to read.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_kiln(extra):
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "amx_bench", "--"] + extra
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def torch_ms(torch, m, n, k, threads, min_reps, min_secs):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(m, k, generator=g) * 2 - 1).to(torch.bfloat16)
    b = (torch.rand(k, n, generator=g) * 2 - 1).to(torch.bfloat16)
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up (oneDNN primitive creation)
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < min_secs and len(times) < 200):
            t = time.perf_counter()
            torch.matmul(a, b)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    quick = "--quick" in sys.argv
    emulated = "--emulated" in sys.argv
    extra = [x for x in sys.argv[1:] if x in ("--quick", "--emulated")]
    min_reps, min_secs = (3, 0.2) if quick else (7, 1.0)

    records = run_kiln(extra)
    peak = records[0]
    if "skip" in peak:
        print(f"kiln: {peak['skip']} (run with --emulated to exercise the harness)")
        return
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if emulated:
        print("kiln: SOFTWARE TILE MODEL (--emulated): kiln figures are not AMX performance")
    else:
        print(f"kiln: kernel {peak.get('kernel', 'Amx')}, measured peak {peak['gflops']:.0f} GFLOP/s per core")
    for r in records:
        if r["op"].startswith("amx_pack_b"):
            k, n = r["shape"]
            what = "fresh buffer" if r["op"].endswith("fresh") else "reused buffer"
            print(
                f"pack B {k}x{n} ({r['pack']}, {what}, {r['threads']} thr):"
                f" {r['median_ms']:.3f} ms, {r['gbps']:.1f} GB/s"
            )
    rows = {}
    for r in records[1:]:
        if r["op"].startswith("amx_pack_b"):
            continue
        key = (tuple(r["shape"]), r["threads"])
        rows.setdefault(key, {})[r["op"]] = r
    header = (
        f"{'m x n x k':>20} {'thr':>3} {'kiln':>9} {'prepacked':>9} {'torch':>9}"
        f" {'kiln/torch':>10} {'prep/torch':>10} {'peak%':>6} {'prep peak%':>10}"
    )
    print(header)
    for (shape, threads), ops in rows.items():
        m, n, k = shape
        flops = 2.0 * m * n * k
        tms = torch_ms(torch, m, n, k, threads, min_reps, min_secs)
        tg = flops / (tms * 1e-3) / 1e9
        kg = ops["matmul_amx"]["gflops"]
        pg = ops["matmul_amx_prepacked"]["gflops"]
        kf = ops["matmul_amx"]["peak_fraction"]
        pf = ops["matmul_amx_prepacked"]["peak_fraction"]
        pct = lambda f: "-" if f is None else f"{100 * f:.1f}"
        print(
            f"{m:>6} x{n:>6} x{k:>5} {threads:>3} {kg:>9.1f} {pg:>9.1f} {tg:>9.1f}"
            f" {kg / tg:>10.2f} {pg / tg:>10.2f} {pct(kf):>6} {pct(pf):>10}"
        )
        print(
            json.dumps(
                {
                    "op": "matmul_bf16_torch",
                    "shape": [m, n, k],
                    "dtype": "bf16",
                    "threads": threads,
                    "median_ms": tms,
                    "gflops": tg,
                    "kiln_ratio": kg / tg,
                    "kiln_prepacked_ratio": pg / tg,
                }
            ),
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
