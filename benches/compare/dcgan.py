#!/usr/bin/env python3
"""kiln vs PyTorch CPU on DCGAN: the generator's forward pass (eval mode, batch 64) and one full
training iteration of the PyTorch DCGAN example (batch 64 and 16), at 1 and 2 threads.

Each row runs `kiln bench dcgan ... --json` in a subprocess and then the same work in PyTorch in
another subprocess (so that each engine's peak resident memory is its own), back to back, so
both see the same machine. The PyTorch side is the example's code: `nn.Sequential` networks,
`BCELoss`, `Adam(lr=2e-4, betas=(0.5, 0.999))`, D on a real batch and on `fake.detach()`, D step,
then G through D, G step. Prints a markdown table; `speedup` = torch ms / kiln ms.

Usage: cargo build --release && python3 benches/compare/dcgan.py [--threads 1,2]
       [--min-time 3] [--arch dcgan] [--kiln target/release/kiln] [--json out.json]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

TORCH_CHILD = r"""
import json, resource, sys, time
import torch, torch.nn as nn
threads, batch, train, min_time, arch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(0)
nz, ngf, ndf, nc = 100, 64, 64, 3
if arch == "dcgan":
    G = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    D = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0))
    z_shape = (batch, nz, 1, 1)
else:
    G = nn.Sequential(
        nn.Linear(nz, 8 * 8 * 256), nn.ReLU(), nn.Unflatten(1, (256, 8, 8)),
        nn.ConvTranspose2d(256, 128, 5, 1, 2), nn.ReLU(),
        nn.ConvTranspose2d(128, 128, 5, 2, 2, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 5, 2, 2, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(64, nc, 5, 2, 2, output_padding=1), nn.Sigmoid())
    D = nn.Sequential(
        nn.Conv2d(nc, 64, 5, 2, 2), nn.ReLU(), nn.Conv2d(64, 128, 5, 2, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * 16 * 16, 1), nn.Sigmoid(), nn.Flatten(0))
    z_shape = (batch, nz)
crit = nn.BCELoss()
oD = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
oG = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
real = torch.rand(batch, nc, 64, 64) * 2 - 1
noise = torch.randn(*z_shape)
ones, zeros = torch.ones(batch), torch.zeros(batch)

def step():
    D.zero_grad()
    out = D(real); errD_real = crit(out, ones); errD_real.backward()
    fake = G(noise)
    out = D(fake.detach()); errD_fake = crit(out, zeros); errD_fake.backward()
    oD.step()
    G.zero_grad()
    out = D(fake); errG = crit(out, ones); errG.backward()
    oG.step()

def gen():
    with torch.no_grad():
        G(noise)

if not train:
    G.eval()
f = step if train else gen
f()
times, start = [], time.perf_counter()
while len(times) < 3 or time.perf_counter() - start < min_time:
    t = time.perf_counter(); f(); times.append((time.perf_counter() - t) * 1e3)
times.sort()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"median_ms": times[len(times) // 2], "peak_rss_mib": rss,
                  "torch": torch.__version__}))
"""


def torch_record(threads, batch, train, min_time, arch):
    out = subprocess.run([sys.executable, "-c", TORCH_CHILD, str(threads), str(batch),
                          "1" if train else "0", str(min_time), arch],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def kiln_record(kiln, threads, batch, train, min_time, arch):
    cmd = [kiln, "bench", "dcgan", "--batch", str(batch), "--arch", arch, "--threads",
           str(threads), "--min-time", str(min_time), "--json"]
    if train:
        cmd.append("--train")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--arch", default="dcgan")
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "avx512f" if " avx512f" in flags else ("avx2" if " avx2" in flags else "?")
    print(f"CPU: {cpu_name()} ({isa}), arch {args.arch}\n")
    print("| work | batch | threads | kiln ms | torch ms | speedup | kiln img/s | torch img/s "
          "| kiln GFLOP/s (% peak) | kiln RSS MiB | torch RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for train, batch in [(False, 64), (True, 64), (True, 16)]:
        for threads in [int(t) for t in args.threads.split(",")]:
            k = kiln_record(args.kiln, threads, batch, train, args.min_time, args.arch)
            t = torch_record(threads, batch, train, args.min_time, args.arch)
            work = "train step" if train else "G forward (eval)"
            kips = batch / (k["median_ms"] / 1e3)
            tips = batch / (t["median_ms"] / 1e3)
            row = dict(work=work, batch=batch, threads=threads, kiln_ms=k["median_ms"],
                       torch_ms=t["median_ms"], speedup=t["median_ms"] / k["median_ms"],
                       kiln_images_per_s=kips, torch_images_per_s=tips,
                       kiln_gflops=k["gflops"], kiln_peak_fraction=k["peak_fraction"],
                       kiln_rss_mib=k.get("peak_rss_mib"), torch_rss_mib=t["peak_rss_mib"],
                       torch_version=t["torch"])
            rows.append(row)
            print(f"| {work} | {batch} | {threads} | {k['median_ms']:.1f} | {t['median_ms']:.1f} "
                  f"| {row['speedup']:.2f} | {kips:.1f} | {tips:.1f} | {k['gflops']:.1f} "
                  f"({100 * k['peak_fraction']:.0f} %) | {k.get('peak_rss_mib', 0):.0f} "
                  f"| {t['peak_rss_mib']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
