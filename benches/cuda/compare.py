#!/usr/bin/env python3
"""Compares a GPU run of a kiln command with the CPU run of the same command, for
benches/cuda/run.sh (Python standard library only: the GPU machine may have nothing else).

    compare.py logits CUDA.safetensors CPU.safetensors   # kiln gpt2 logits --out ...
    compare.py dcgan CUDA/metrics.csv CPU/metrics.csv    # kiln dcgan train --out ...

Prints one JSON object: for logits, the largest absolute difference, the largest logit
magnitude and the fraction of positions whose argmax agrees; for a DCGAN run, the largest
relative difference of each step's losses, D(x) and D(G(z)) (the columns of metrics.csv).
"""
import json
import struct
import sys


def read_f32(path, name):
    """Tensor `name` of a safetensors file as a list of floats (f32 only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[name]
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        data = f.read(end - start)
    return list(struct.unpack(f"<{len(data) // 4}f", data)), info["shape"]


def logits(cuda_path, cpu_path):
    a, shape = read_f32(cuda_path, "logits")
    b, shape_b = read_f32(cpu_path, "logits")
    if shape != shape_b:
        raise SystemExit(f"shapes differ: {shape} vs {shape_b}")
    rows, v = shape
    diff = max(abs(x - y) for x, y in zip(a, b))
    mag = max(abs(y) for y in b)
    agree = 0
    for r in range(rows):
        ra, rb = a[r * v:(r + 1) * v], b[r * v:(r + 1) * v]
        agree += ra.index(max(ra)) == rb.index(max(rb))
    return {
        "rows": rows,
        "vocab": v,
        "max_abs_diff": diff,
        "max_abs_logit": mag,
        "argmax_agree_fraction": agree / rows,
    }


def dcgan(cuda_csv, cpu_csv):
    def rows(path):
        lines = open(path).read().split("\n")
        head = lines[0].split(",")
        return head, [dict(zip(head, line.split(","))) for line in lines[1:] if line]

    head, a = rows(cuda_csv)
    _, b = rows(cpu_csv)
    cols = ["loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2"]
    out = {"steps": min(len(a), len(b))}
    for i, (ra, rb) in enumerate(zip(a, b)):
        rel = max(abs(float(ra[c]) - float(rb[c])) / max(abs(float(rb[c])), 1e-3) for c in cols)
        out[f"step{i + 1}_max_rel_diff"] = rel
        out[f"step{i + 1}_cuda"] = {c: float(ra[c]) for c in cols}
        out[f"step{i + 1}_cpu"] = {c: float(rb[c]) for c in cols}
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("logits", "dcgan"):
        raise SystemExit(__doc__)
    kind, x, y = sys.argv[1:]
    print(json.dumps(logits(x, y) if kind == "logits" else dcgan(x, y)))
