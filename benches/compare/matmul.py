#!/usr/bin/env python3
"""kiln matmul side by side with numpy (OpenBLAS), PyTorch and BLIS, on the same shapes, one after
the other in the same run, at 1 and 2 threads.

    python3 benches/compare/matmul.py            # squares and GPT-2 inference shapes
    python3 benches/compare/matmul.py --quick    # skip 4096^3 (and the 4096-token logits)
    python3 benches/compare/matmul.py --threads 1 --shapes square
    python3 benches/compare/matmul.py --shapes train     # GPT-2 training: dW (tn), dX (nt)
    python3 benches/compare/matmul.py --shapes dcgan     # DCGAN weight gradients dy·colᵀ (nt)
    python3 benches/compare/matmul.py --shapes square --layouts tn,nt

Layouts (`kiln bench matmul --layout`): `nn` both operands row-major; `tn` A is the transposed
view of a row-major [k, m] array (dW = Xᵀ·dY: numpy `x.T @ dy`); `nt` B is the transposed view
of a row-major [n, k] array (dX = dY·Wᵀ, the logits x·wteᵀ, a conv weight gradient dy·colᵀ:
numpy `dy @ w.T`). Every peer gets the same strided views, never a transposed copy.

BLIS is the `blis` package from PyPI (its wheel is built without threads, so it always runs on
one thread, and its CPU detection knows no CPU newer than Zen 2 / Skylake-X: on others it picks
its slow `generic` configuration). The script therefore times the package's own compiled
kernels for this CPU's ISA as well (the `skx` context where the CPU has AVX-512F, else `zen2`
or `haswell`), called through the library's `bli_sgemm_ex` with that context, and reports the
faster of the two (`blis_info` names which).

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
import platform
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SQUARE = [256, 512, 1024, 2048, 4096]
GPT2_KN = [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]
# GPT-2 124M linear layers as (in, out): c_attn, attn c_proj, c_fc, mlp c_proj. The weight is
# stored [in, out] (Conv1D), so dX = dY·Wᵀ has a column-major B.
GPT2_LINEAR = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
TOKENS = [256, 4096]
VOCAB, EMBD = 50257, 768
# DCGAN weight gradients dW = dy · im2col(x)ᵀ, one implicit-GEMM chunk of about 4096 pixels,
# batch 64: (Cout, Cin·4·4, pixels) of D1/G5, D2/G4, D3/G3, D4/G2 (a transposed layer's
# gradient has the roles of its input and output exchanged and the same shape).
DCGAN_WGRAD = [(64, 48, 4096), (128, 1024, 4096), (256, 2048, 4096), (512, 4096, 1024)]


def shapes(which, quick, layouts):
    out = []  # (m, n, k, dtype, layout)
    if which in ("all", "square"):
        for s in SQUARE:
            if quick and s > 2048:
                continue
            for lay in layouts:
                out.append((s, s, s, "f32", lay))
    if which in ("all", "gpt2"):
        for k, n in GPT2_KN:
            out.append((128, n, k, "f32", "nn"))
        out.append((128, 50257, 768, "f32", "nt"))  # logits: x . wte^T
        for k, n in GPT2_KN:
            out.append((1, n, k, "f32", "nn"))
            out.append((1, n, k, "bf16", "nn"))
        out.append((1, 50257, 768, "f32", "nt"))
        out.append((1, 50257, 768, "bf16", "nt"))
    if which in ("train", "backward"):
        for t in TOKENS:
            for i, o in GPT2_LINEAR:
                out.append((i, o, t, "f32", "tn"))  # dW [in, out] = Xᵀ [in, T] · dY [T, out]
                out.append((t, i, o, "f32", "nt"))  # dX [T, in] = dY [T, out] · Wᵀ [out, in]
            if quick and t > 256:
                continue
            out.append((VOCAB, EMBD, t, "f32", "tn"))  # d wte [V, C] = dlogitsᵀ · X
            out.append((t, EMBD, VOCAB, "f32", "nn"))  # dX [T, C] = dlogits · wte
    if which in ("dcgan", "backward"):
        for m, n, k in DCGAN_WGRAD:
            out.append((m, n, k, "f32", "nt"))
    return out


def cpu_name():
    """The CPU model, family/model and the ISA extensions that pick kernels, from /proc/cpuinfo."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, val = (x.strip() for x in line.split(":", 1))
                    info.setdefault(key, val)
    except OSError:
        return platform.processor() or "unknown CPU"
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}; {os.cpu_count()} CPUs; {' '.join(isa)})")


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
    CPU = {}
    def median_ms(f):
        # Also leaves the process's CPU time per call (all threads, warm-up included) in CPU["ms"].
        c0 = time.process_time()
        f(); f()
        ts = []
        t0 = time.perf_counter()
        while len(ts) < min_reps or time.perf_counter() - t0 < 0.5:
            s = time.perf_counter(); f(); ts.append((time.perf_counter() - s) * 1e3)
            if len(ts) >= 10000: break
        CPU["ms"] = (time.process_time() - c0) * 1e3 / (len(ts) + 2)
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
            a = rng.random((k, m), dtype=np.float32).T if layout == "tn" else rng.random((m, k), dtype=np.float32)
            b = rng.random((n, k), dtype=np.float32).T if layout == "nt" else rng.random((k, n), dtype=np.float32)
            c = np.empty((m, n), dtype=np.float32)
            ms = median_ms(lambda: np.matmul(a, b, out=c))
            print(json.dumps({"median_ms": ms, "cpu_ms": CPU["ms"], "info": info}), flush=True)
    elif lib == "blis":
        # The blis wheel: its own choice of kernel (blis.py.gemm with the transpose flags), and
        # its compiled kernels for this CPU's ISA through bli_sgemm_ex with that context
        # (strided views, no copies); the faster is reported.
        import ctypes
        import numpy as np
        import blis, blis.about, blis.cy, blis.py
        lib_ = ctypes.CDLL(blis.cy.__file__)
        lib_.bli_init()
        lib_.bli_arch_string.restype = ctypes.c_char_p
        lib_.bli_gks_lookup_nat_cntx.restype = ctypes.c_void_p
        lib_.bli_gks_lookup_nat_cntx.argtypes = [ctypes.c_int]
        I, P = ctypes.c_int64, ctypes.c_void_p
        lib_.bli_sgemm_ex.argtypes = [ctypes.c_int, ctypes.c_int, I, I, I, P, P, I, I, P, I, I, P, P, I, I, P, P]
        auto = lib_.bli_arch_string(lib_.bli_arch_query_id()).decode()
        flags = open("/proc/cpuinfo").read()
        names = {lib_.bli_arch_string(i).decode(): i for i in range(21) if lib_.bli_arch_string(i)}
        forced = "skx" if " avx512f" in flags else ("zen2" if "AuthenticAMD" in flags else "haswell")
        cntx = lib_.bli_gks_lookup_nat_cntx(names[forced])
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        def ctx_gemm(a, b, c):
            m, k = a.shape; n = b.shape[1]
            lib_.bli_sgemm_ex(0, 0, m, n, k, ctypes.byref(one), a.ctypes.data, a.strides[0] // 4, a.strides[1] // 4,
                              b.ctypes.data, b.strides[0] // 4, b.strides[1] // 4, ctypes.byref(zero),
                              c.ctypes.data, c.strides[0] // 4, c.strides[1] // 4, cntx, None)
        rng = np.random.default_rng(0)
        for m, n, k, dtype, layout in shapes:
            if dtype != "f32":
                print(json.dumps(None)); continue
            a_s = rng.random((k, m), dtype=np.float32) if layout == "tn" else rng.random((m, k), dtype=np.float32)
            b_s = rng.random((n, k), dtype=np.float32) if layout == "nt" else rng.random((k, n), dtype=np.float32)
            a = a_s.T if layout == "tn" else a_s
            b = b_s.T if layout == "nt" else b_s
            c = np.empty((m, n), dtype=np.float32)
            # The generic configuration runs at a few GFLOP/s: timed only on small products.
            if auto == "generic" and 2.0 * m * n * k > 2e9:
                t_auto, cpu_auto = float("inf"), float("inf")
            else:
                t_auto = median_ms(lambda: blis.py.gemm(a_s, b_s, out=c, trans1=layout == "tn", trans2=layout == "nt", beta=0.0))
                cpu_auto = CPU["ms"]
            t_forced = median_ms(lambda: ctx_gemm(a, b, c))
            ms, cpu_ms, which = min((t_auto, cpu_auto, f"auto:{auto}"), (t_forced, CPU["ms"], f"context:{forced}"))
            info = f"blis {blis.about.__version__}, one thread; its detection picks {auto}; reported: {which}"
            print(json.dumps({"median_ms": ms, "cpu_ms": cpu_ms, "info": info}), flush=True)
    else:
        import torch
        torch.set_num_threads(threads)
        info = f"torch {torch.__version__} threads={torch.get_num_threads()}"
        g = torch.Generator().manual_seed(0)
        for m, n, k, dtype, layout in shapes:
            dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
            # bf16 weights: torch multiplies bf16 x bf16 (A cast to bf16 too).
            a = torch.rand((k, m), generator=g).to(dt).t() if layout == "tn" else torch.rand((m, k), generator=g).to(dt)
            b = torch.rand((n, k), generator=g).to(dt).t() if layout == "nt" else torch.rand((k, n), generator=g).to(dt)
            with torch.inference_mode():
                ms = median_ms(lambda: torch.matmul(a, b))
            print(json.dumps({"median_ms": ms, "cpu_ms": CPU["ms"], "info": info}), flush=True)
""")


def run_peer(lib, threads, shape_list, reps):
    env = dict(os.environ)
    if lib in ("numpy", "blis"):
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
    ap.add_argument("--shapes", default="all", choices=["all", "square", "gpt2", "train", "dcgan", "backward"],
                    help="all = square + gpt2 (inference); train = GPT-2 dW/dX at 256 and 4096 tokens; "
                         "dcgan = conv weight gradients; backward = train + dcgan")
    ap.add_argument("--layouts", default="nn", help="layouts of the square shapes: nn, tn, nt (comma-separated)")
    ap.add_argument("--peers", default="numpy,torch,blis", help="comma-separated subset of numpy, torch, blis")
    ap.add_argument("--quick", action="store_true", help="skip 4096^3 and the 4096-token logits gradients")
    ap.add_argument("--match", default=None,
                    help="only shapes whose 'm,n,k,dtype,layout' matches this regular expression")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each shape, keep the best")
    ap.add_argument("--json", action="store_true", help="also print every row as JSON")
    ap.add_argument("--cpu-time", action="store_true",
                    help="rates from CPU time per call (the process's, all threads) instead of wall time: "
                         "for a machine shared with other work; meaningful at one thread")
    args = ap.parse_args()
    if not os.path.exists(args.kiln):
        sys.exit(f"error: {args.kiln} not found: run `cargo build --release` first")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if any(x not in ("nn", "tn", "nt") for x in layouts):
        sys.exit(f"error: --layouts takes nn, tn, nt, not {args.layouts}")
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if any(x not in ("numpy", "torch", "blis") for x in peers):
        sys.exit(f"error: --peers takes numpy, torch, blis, not {args.peers}")
    if "blis" in peers:
        try:
            import blis  # noqa: F401
        except ImportError:
            print("note: the blis package is not installed (pip install blis): no BLIS column", file=sys.stderr)
            peers.remove("blis")
    sl = shapes(args.shapes, args.quick, layouts)
    if args.match:
        import re
        sl = [s for s in sl if re.search(args.match, ",".join(map(str, s)))]
    cpu = cpu_name()
    print(f"CPU: {cpu}", file=sys.stderr, flush=True)
    rows = []
    for t in [int(x) for x in args.threads.split(",")]:
        # Interleaved shape by shape (kiln and every peer back to back), so that all see the same
        # machine load; with --rounds > 1 the best round of each is kept. The blis wheel has no
        # threads: it runs at one thread only.
        for s in sl:
            best = {}
            load = os.getloadavg()[0]
            for _ in range(args.rounds):
                results = [("kiln", run_kiln(args.kiln, s, t, args.reps))]
                for p in peers:
                    if p == "blis" and t > 1:
                        continue
                    results.append((p, run_peer(p, t, [s], args.reps)[0]))
                for name, res in results:
                    if res and args.cpu_time:
                        res = dict(res, median_ms=res.get("cpu_ms") or res["median_ms"])
                    if res and (name not in best or res["median_ms"] < best[name]["median_ms"]):
                        best[name] = res
            eb = 2 if s[3] == "bf16" else 4
            kr = best["kiln"]
            r = {
                "shape": list(s[:3]), "dtype": s[3], "layout": s[4], "threads": t,
                "unit": "GB/s" if s[0] == 1 else "GFLOP/s",
                "kiln": rate(s, kr["median_ms"], eb),
                "kiln_peak_fraction": kr["peak_fraction"],
                "load": load,
                "time": "cpu" if args.cpu_time else "wall",
            }
            for p in ("numpy", "torch", "blis"):
                res = best.get(p)
                r[p] = rate(s, res["median_ms"], eb) if res else None
                r[f"{p}_info"] = res["info"] if res else None
            peer_rates = [r[p] for p in ("numpy", "torch", "blis") if r[p]]
            r["best_peer"] = max(peer_rates) if peer_rates else None
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"CPU: {cpu}")
    print("rates from " + ("CPU time per call (the process's, all threads)" if args.cpu_time
                           else "the median wall time per call"))
    print(f"{'shape m,n,k':<18} {'B':<5} {'lay':<4} {'thr':>3} {'load':>5} {'unit':<8} {'kiln':>8} {'%peak':>6} "
          f"{'numpy':>8} {'torch':>8} {'blis':>8} {'k/best':>6}")
    for r in rows:
        f = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"
        q = lambda a, b: f"{a / b:6.2f}" if b else f"{'-':>6}"
        # kiln's own FMA probe is timed by the wall clock: no fraction next to CPU-time rates.
        pk = f"{'-':>6}" if args.cpu_time else f"{100 * r['kiln_peak_fraction']:5.1f}%"
        print(f"{','.join(map(str, r['shape'])):<18} {r['dtype']:<5} {r['layout']:<4} {r['threads']:>3} "
              f"{r['load']:5.1f} {r['unit']:<8} {f(r['kiln'])} {pk} "
              f"{f(r['numpy'])} {f(r['torch'])} {f(r['blis'])} {q(r['kiln'], r['best_peer'])}")
    for p, label in (("numpy", "numpy BLAS"), ("torch", "PyTorch"), ("blis", "BLIS")):
        for i in sorted({r[f"{p}_info"] for r in rows if r[f"{p}_info"]}):
            print(f"{label}: {i}")
    if args.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
