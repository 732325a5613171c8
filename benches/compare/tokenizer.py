#!/usr/bin/env python3
"""kiln's GPT-2 tokenizer against the Python `tokenizers` library, side by side in one run.

Runs `cargo run --release --example tokenize_bench` (one JSON object, see examples/tokenize_bench.rs) and
`tokenizers` (BPE model from the same vocab.json/merges.txt, ByteLevel pre-tokenizer without prefix space) on
the same text, checks that both produce the same ids (count and FNV-1a hash), and prints encode MB/s for both
and the ratio kiln / tokenizers, with a cold cache (a fresh tokenizer per run), a warm one, and warm paragraph by
paragraph (the text split at blank lines, one `encode` call each: the library slows down on very long single
inputs, so this is the fairer figure for prompts). Medians over the runs, and the fastest run ("best").

    python3 benches/compare/tokenizer.py [CORPUS] [--iters N] [--kiln-json FILE]

CORPUS defaults to tests/fixtures/tokenizer/bench_corpus.txt. Both sides are single-threaded (one `encode` call
on the whole text). Numbers taken while other work runs on the machine are noisy: the ratio, measured back to
back, is the figure to read.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "crates", "kiln-models", "assets", "gpt2")


def make_reference():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(os.path.join(ASSETS, "vocab.json"), os.path.join(ASSETS, "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def fnv1a(ids):
    h = 0xCBF29CE484222325
    for i in ids:
        for b in i.to_bytes(4, "little"):
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def run_reference(text, iters):
    mb = len(text.encode()) / 1e6
    t = time.perf_counter()
    tok = make_reference()
    load_ms = (time.perf_counter() - t) * 1e3
    cold = []
    for _ in range(3):
        fresh = make_reference()
        t = time.perf_counter()
        fresh.encode(text)
        cold.append(mb / (time.perf_counter() - t))
    ids = tok.encode(text).ids
    warm = []
    for _ in range(iters):
        t = time.perf_counter()
        tok.encode(text)
        warm.append(mb / (time.perf_counter() - t))
    paras = text.split("\n\n")
    para = []
    for _ in range(iters):
        t = time.perf_counter()
        for p in paras:
            tok.encode(p)
        para.append(mb / (time.perf_counter() - t))
    dec = []
    for _ in range(max(3, iters // 4)):
        t = time.perf_counter()
        s = tok.decode(ids)
        dec.append(len(s.encode()) / 1e6 / (time.perf_counter() - t))
    return {
        "tokens": len(ids),
        "ids_fnv1a": fnv1a(ids),
        "load_ms": load_ms,
        "cold_mb_s": statistics.median(cold),
        "warm_mb_s": statistics.median(warm),
        "warm_best_mb_s": max(warm),
        "para_mb_s": statistics.median(para),
        "para_best_mb_s": max(para),
        "decode_mb_s": statistics.median(dec),
    }


def main():
    args = sys.argv[1:]
    corpus = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "bench_corpus.txt")
    iters, kiln_json = 20, None
    i = 0
    while i < len(args):
        if args[i] == "--iters":
            iters = int(args[i + 1])
            i += 2
        elif args[i] == "--kiln-json":
            kiln_json = args[i + 1]
            i += 2
        else:
            corpus = args[i]
            i += 1
    with open(corpus, newline="") as f:  # keep \r\n as it is
        text = f.read()

    if kiln_json:
        with open(kiln_json) as f:
            kiln = json.load(f)
    else:
        cmd = ["cargo", "run", "--release", "--quiet", "--example", "tokenize_bench", "--", corpus,
               "--iters", str(iters)]
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        kiln = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    ref = run_reference(text, iters)

    same = kiln["tokens"] == ref["tokens"] and kiln["ids_fnv1a"] == ref["ids_fnv1a"]
    print(f"corpus: {corpus} ({len(text.encode())} bytes, {ref['tokens']} tokens); "
          f"ids identical: {'yes' if same else 'NO'}")
    print(f"{'MB/s':22}{'kiln':>12}{'tokenizers':>12}{'ratio':>9}")
    for key, label in [("cold_mb_s", "encode, cold cache"), ("warm_mb_s", "encode, warm"),
                       ("warm_best_mb_s", "encode, warm (best)"), ("para_mb_s", "encode by paragraph"),
                       ("para_best_mb_s", "by paragraph (best)"), ("decode_mb_s", "decode"), ("load_ms", "load ms")]:
        ratio = kiln[key] / ref[key] if key != "load_ms" else ref[key] / kiln[key]
        print(f"{label:22}{kiln[key]:12.2f}{ref[key]:12.2f}{ratio:8.1f}x")
    print(json.dumps({"op": "tokenizer_encode", "kiln": kiln, "tokenizers": ref,
                      "ratio_warm": kiln["warm_mb_s"] / ref["warm_mb_s"],
                      "ratio_cold": kiln["cold_mb_s"] / ref["cold_mb_s"],
                      "ratio_para": kiln["para_mb_s"] / ref["para_mb_s"], "ids_identical": same}))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
