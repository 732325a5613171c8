"""A reference server for `serve_load.py`: transformers' GPT-2 behind a minimal HTTP wrapper.

`POST /v1/completions` with `stream: true` (server-sent events, one chunk per token) or not,
greedy or sampled, one request at a time (a lock around `generate`; the standard library's
threading HTTP server accepts the connections). It is what "a model behind a minimal wrapper"
gives: no batching across requests. Loads a kiln / Hub checkpoint folder.

    python3 benches/compare/serve_reference.py --model DIR --port 8001 --threads 2
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import queue

from transformers import GPT2LMHeadModel, GPT2TokenizerFast
from transformers.generation.streamers import BaseStreamer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--port", type=int, default=8001)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--dtype", default="float32")
args = ap.parse_args()
torch.set_num_threads(args.threads)
try:
    tok = GPT2TokenizerFast.from_pretrained(args.model)
except Exception:
    tok = GPT2TokenizerFast.from_pretrained("gpt2")
model = GPT2LMHeadModel.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).eval()
lock = threading.Lock()


class TokenStreamer(BaseStreamer):
    """Every generated token as its own text piece (the first `put` is the prompt)."""

    def __init__(self):
        self.q = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i in value.reshape(-1).tolist():
            self.q.put(tok.decode([i]))

    def end(self):
        self.q.put(None)

    def __iter__(self):
        while (piece := self.q.get()) is not None:
            yield piece


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = tok(body["prompt"], return_tensors="pt").input_ids
        n = int(body.get("max_tokens", 16))
        t = float(body.get("temperature", 1.0))
        kw = dict(max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.eos_token_id,
                  do_sample=t > 0)
        if t > 0:
            kw["temperature"] = t
        if not body.get("stream"):
            with lock, torch.inference_mode():
                out = model.generate(ids, **kw)
            text = tok.decode(out[0, ids.shape[1]:])
            data = json.dumps({"object": "text_completion", "choices": [
                {"index": 0, "text": text, "finish_reason": "length"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(payload):
            b = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
            self.wfile.flush()

        with lock:
            streamer = TokenStreamer()
            th = threading.Thread(target=lambda: model.generate(ids, streamer=streamer, **kw))
            with torch.inference_mode():
                th.start()
                for piece in streamer:
                    send(json.dumps({"choices": [{"index": 0, "text": piece,
                                                      "finish_reason": None}]}))
                th.join()
        send(json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


print(f"reference server on http://127.0.0.1:{args.port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
