"""A bounded load test of an OpenAI-compatible completions server on loopback.

For each concurrency C (default 1, 4, 16), C clients each send streaming `/v1/completions`
requests (greedy, fixed `max_tokens`, no stop, `ignore_eos`-free: a random-weight model rarely
ends early) back to back until `--requests` requests are done or `--seconds` have passed.
Prints per concurrency: requests, generated tokens, aggregate tokens/s, p50/p99 time to first
token and p50/p99 inter-token latency, and one JSON line per concurrency (`--json`).
Standard library only (asyncio streams, HTTP/1.1, chunked SSE).

    python3 benches/compare/serve_load.py --url http://127.0.0.1:8000 --max-tokens 64
"""
import argparse
import asyncio
import json
import random
import statistics
import time
from urllib.parse import urlparse

WORDS = ("the of and to in is was that for it with as on by at from his her their an this which "
         "people time year way day thing man world life hand part child eye woman place work week").split()


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(host, port, body, key):
    """Sends one streaming request; returns (ttft, [token arrival times], tokens)."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    t0 = time.perf_counter()
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"status {status!r}")
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    buf = b""
    arrivals = []
    done = False
    while not done:
        if chunked:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.strip().split(b";")[0], 16)
            if size == 0:
                break
            chunk = await reader.readexactly(size + 2)
            buf += chunk[:-2]
        else:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            for line in ev.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                obj = json.loads(payload)
                for c in obj.get("choices", []):
                    if c.get("text"):
                        arrivals.append(time.perf_counter())
    writer.close()
    if not arrivals:
        return None
    return arrivals[0] - t0, arrivals


async def run_level(args, conc, host, port):
    stop_at = time.perf_counter() + args.seconds
    left = [args.requests]
    ttfts, itls, tokens = [], [], [0]
    rng = random.Random(conc)

    async def client(i):
        while left[0] > 0 and time.perf_counter() < stop_at:
            left[0] -= 1
            prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
            body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True}
            r = await one_request(host, port, body, args.api_key)
            if r is None:
                continue
            ttft, arrivals = r
            ttfts.append(ttft)
            itls.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
            tokens[0] += len(arrivals)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(conc)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": conc,
        "requests": len(ttfts),
        "tokens": tokens[0],
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "ttft_p50_ms": round(1e3 * pct(ttfts, 50), 1),
        "ttft_p99_ms": round(1e3 * pct(ttfts, 99), 1),
        "itl_p50_ms": round(1e3 * pct(itls, 50), 1),
        "itl_p99_ms": round(1e3 * pct(itls, 99), 1),
    }


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="per concurrency level")
    ap.add_argument("--seconds", type=float, default=120, help="per concurrency level")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    u = urlparse(args.url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loopback only")
    for conc in [int(c) for c in args.concurrency.split(",")]:
        # One warm-up request (page faults, lazy init) before timing.
        await one_request(u.hostname, u.port, {"model": args.model, "prompt": "Hello",
                                               "max_tokens": 4, "temperature": 0,
                                               "stream": True}, args.api_key)
        r = await run_level(args, conc, u.hostname, u.port)
        r["label"] = args.label
        print(f"{args.label} c={conc}: {r['requests']} requests, {r['tokens']} tokens in "
              f"{r['seconds']} s = {r['tokens_per_s']} tokens/s; TTFT p50 {r['ttft_p50_ms']} "
              f"p99 {r['ttft_p99_ms']} ms; ITL p50 {r['itl_p50_ms']} p99 {r['itl_p99_ms']} ms",
              flush=True)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
