"""Loads a `kiln gpt2 train` run folder with transformers and checks it against kiln.

Usage: check_hf_load.py RUN_DIR LOGITS.safetensors

`LOGITS.safetensors` holds `ids` [T] (i64) and `logits` [T, V] (f32) written by
`kiln gpt2 logits --model RUN_DIR`; the script loads RUN_DIR with
`GPT2LMHeadModel.from_pretrained` (and the tokenizer with `GPT2TokenizerFast.from_pretrained`),
runs the same ids and prints `OK max_abs_diff=…` when the logits agree within 1e-3 of their
largest magnitude, else exits with status 1.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

run_dir, logits_file = sys.argv[1], sys.argv[2]
model = GPT2LMHeadModel.from_pretrained(run_dir, attn_implementation="eager")
model.eval()
tok = GPT2TokenizerFast.from_pretrained(run_dir)
ref = load_file(logits_file)
ids = ref["ids"].to(torch.long).unsqueeze(0)
with torch.no_grad():
    out = model(ids).logits[0]
diff = (out - ref["logits"]).abs().max().item()
scale = ref["logits"].abs().max().item()
assert tok.decode(ids[0].tolist()) is not None
if diff > 1e-3 * max(scale, 1.0):
    print(f"MISMATCH max_abs_diff={diff} scale={scale}")
    sys.exit(1)
print(f"OK max_abs_diff={diff:.3e} scale={scale:.3e} tokens={ids.shape[1]}")
