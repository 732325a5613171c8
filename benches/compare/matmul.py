#!/usr/bin/env python3
"""kiln matmul side by side with numpy (OpenBLAS) and PyTorch, on the same shapes, one after the
other in the same run, at 1 and 2 threads.

    python3 benches/compare/matmul.py            # all shapes
    python3 benches/compare/matmul.py --quick    # skip 4096^3
    python3 benches/compare/matmul.py --threads 1 --shapes square

kiln runs through `kiln bench matmul --json` (built with `cargo build --release`). Shapes are
interleaved: kiln, numpy and PyTorch run back to back on one shape before the next, so the three
see the same machine load (each peer is a fresh process per shape). numpy runs in
its own process with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from the environment (so
OpenBLAS picks its kernel by itself; threadpoolctl, when installed, reports which one) and its
thread count set through threadpoolctl or OPENBLAS_NUM_THREADS. PyTorch uses
torch.set_num_threads. Each figure is the median of repeated calls after a warm-up.

For M = 1 shapes the rate is GB/s of B read per call (bandwidth-bound); otherwise GFLOP/s.
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SQUARE = [256, 512, 1024, 2048, 4096]
GPT2_KN = [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]


def shapes(which, quick):
    out = []  # (m, n, k, dtype, layout)
    if which in ("all", "square"):
        for s in SQUARE:
            if quick and s > 2048:
                continue
            out.append((s, s, s, "f32", "row"))
    if which in ("all", "gpt2"):
        for k, n in GPT2_KN:
            out.append((128, n, k, "f32", "row"))
        out.append((128, 50257, 768, "f32", "col"))  # logits: x . wte^T
        for k, n in GPT2_KN:
            out.append((1, n, k, "f32", "row"))
            out.append((1, n, k, "bf16", "row"))
        out.append((1, 50257, 768, "f32", "col"))
        out.append((1, 50257, 768, "bf16", "col"))
    return out


def run_kiln(kiln, shape, threads, reps):
    m, n, k, dtype, layout = shape
    cmd = [kiln, "bench", "matmul", "--m", str(m), "--n", str(n), "--k", str(k), "--dtype", dtype,
           "--layout", layout, "--threads", str(threads), "--reps", str(reps), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# One peer process per (library, thread count): it reads shapes as JSON on argv and prints one
# JSON line per shape.
PEER = textwrap.dedent(r"""
    import json, sys, time
    lib, threads, shapes, min_reps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    def median_ms(f):
        f(); f()
        ts = []
        t0 = time.perf_counter()
        while len(ts) < min_reps or time.perf_counter() - t0 < 0.5:
            s = time.perf_counter(); f(); ts.append((time.perf_counter() - s) * 1e3)
            if len(ts) >= 10000: break
        ts.sort(); return ts[len(ts) // 2]
    info = ""
    if lib == "numpy":
        import numpy as np
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
            limits = threadpool_limits(threads)
            info = ";".join(f"{d.get('internal_api')}:{d.get('architecture')}:{d.get('num_threads')}" for d in threadpool_info())
        except ImportError:
            info = "threadpoolctl missing; OPENBLAS_NUM_THREADS"
        rng = np.random.default_rng(0)
        for m, n, k, dtype, layout in shapes:
            if dtype != "f32":
                print(json.dumps(None)); continue
            a = rng.random((m, k), dtype=np.float32)
            b = rng.random((k, n), dtype=np.float32) if layout == "row" else rng.random((n, k), dtype=np.float32).T
            c = np.empty((m, n), dtype=np.float32)
            ms = median_ms(lambda: np.matmul(a, b, out=c))
            print(json.dumps({"median_ms": ms, "info": info}), flush=True)
    else:
        import torch
        torch.set_num_threads(threads)
        info = f"torch {torch.__version__} threads={torch.get_num_threads()}"
        g = torch.Generator().manual_seed(0)
        for m, n, k, dtype, layout in shapes:
            dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
            # bf16 weights: torch multiplies bf16 x bf16 (A cast to bf16 too).
            a = torch.rand((m, k), generator=g).to(dt)
            b = torch.rand((k, n), generator=g).to(dt) if layout == "row" else torch.rand((n, k), generator=g).to(dt).t()
            with torch.inference_mode():
                ms = median_ms(lambda: torch.matmul(a, b))
            print(json.dumps({"median_ms": ms, "info": info}), flush=True)
""")


def run_peer(lib, threads, shape_list, reps):
    env = dict(os.environ)
    if lib == "numpy":
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", PEER, lib, str(threads), json.dumps(shape_list), str(reps)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return [json.loads(l) for l in out.strip().splitlines()]


def rate(shape, ms, elem_bytes):
    m, n, k, _, _ = shape
    if m == 1:
        return k * n * elem_bytes / (ms * 1e-3) / 1e9
    return 2.0 * m * n * k / (ms * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default="all", choices=["all", "square", "gpt2"])
    ap.add_argument("--quick", action="store_true", help="skip 4096^3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each shape, keep the best")
    ap.add_argument("--json", action="store_true", help="also print every row as JSON")
    args = ap.parse_args()
    if not os.path.exists(args.kiln):
        sys.exit(f"error: {args.kiln} not found: run `cargo build --release` first")
    sl = shapes(args.shapes, args.quick)
    rows = []
    for t in [int(x) for x in args.threads.split(",")]:
        # Interleaved shape by shape (kiln, numpy, PyTorch back to back), so that all three see
        # the same machine load; with --rounds > 1 the best round of each is kept.
        for s in sl:
            best = {}
            for _ in range(args.rounds):
                kr = run_kiln(args.kiln, s, t, args.reps)
                nr = run_peer("numpy", t, [s], args.reps)[0]
                tr = run_peer("torch", t, [s], args.reps)[0]
                for name, res in (("kiln", kr), ("numpy", nr), ("torch", tr)):
                    if res and (name not in best or res["median_ms"] < best[name]["median_ms"]):
                        best[name] = res
            kr, nr, tr = best.get("kiln"), best.get("numpy"), best.get("torch")
            eb = 2 if s[3] == "bf16" else 4
            r = {
                "shape": list(s[:3]), "dtype": s[3], "layout": s[4], "threads": t,
                "unit": "GB/s" if s[0] == 1 else "GFLOP/s",
                "kiln": rate(s, kr["median_ms"], eb),
                "kiln_peak_fraction": kr["peak_fraction"],
                "numpy": rate(s, nr["median_ms"], eb) if nr else None,
                "torch": rate(s, tr["median_ms"], eb) if tr else None,
                "numpy_info": nr["info"] if nr else None,
            }
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"{'shape m,n,k':<18} {'B':<5} {'lay':<4} {'thr':>3} {'unit':<8} {'kiln':>8} {'%peak':>6} "
          f"{'numpy':>8} {'torch':>8} {'k/np':>6} {'k/torch':>7}")
    for r in rows:
        f = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"
        q = lambda a, b: f"{a / b:6.2f}" if b else f"{'-':>6}"
        print(f"{','.join(map(str, r['shape'])):<18} {r['dtype']:<5} {r['layout']:<4} {r['threads']:>3} {r['unit']:<8} "
              f"{f(r['kiln'])} {100 * r['kiln_peak_fraction']:5.1f}% {f(r['numpy'])} {f(r['torch'])} "
              f"{q(r['kiln'], r['numpy'])} {q(r['kiln'], r['torch']):>7}")
    infos = sorted({r["numpy_info"] for r in rows if r["numpy_info"]})
    for i in infos:
        print(f"numpy BLAS: {i}")
    if args.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
