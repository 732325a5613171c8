"""The official `openai` Python client against a running `kiln serve`.

Run by `tests/serve.rs` (`openai_python_client`) when KILN_TEST_PYTHON names a Python with the
`openai` package; `tests/serve/run_openai_client.sh` installs one into a venv and runs the test.
Environment: KILN_URL (http://HOST:PORT/v1), KILN_API_KEY, KILN_BIN (the kiln binary), KILN_MODEL
(the checkpoint the server serves).
"""
import json
import os
import subprocess
import sys

import openai

URL = os.environ["KILN_URL"]
KEY = os.environ["KILN_API_KEY"]
KILN = os.environ["KILN_BIN"]
MODEL_DIR = os.environ["KILN_MODEL"]

client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0)


def cli_greedy(prompt, n):
    out = subprocess.run(
        [KILN, "gpt2", "generate", "--model", MODEL_DIR, "--prompt", prompt, "--greedy",
         "--max-new-tokens", str(n), "--json"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["text"]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


# Models.
models = client.models.list()
check([m.id for m in models.data] == ["gpt2"], f"models {models}")

# Completions, greedy: the command line's text, in the parsed object.
for prompt in ["What is the capital of France?", "Hello"]:
    want = cli_greedy(prompt, 10)
    r = client.completions.create(model="gpt2", prompt=prompt, max_tokens=10, temperature=0)
    check(r.object == "text_completion", r.object)
    check(r.model == "gpt2", r.model)
    check(r.choices[0].text == want, f"{r.choices[0].text!r} vs {want!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
    # Streaming: the same text, chunk by chunk.
    chunks = list(client.completions.create(model="gpt2", prompt=prompt, max_tokens=10,
                                            temperature=0, stream=True))
    check("".join(c.choices[0].text for c in chunks if c.choices) == want, "stream text")
    check(chunks[-1].choices[0].finish_reason in ("stop", "length"), "stream finish")

# n > 1 with a seed, stop, logprobs.
r = client.completions.create(model="gpt2", prompt="The meaning of life is", max_tokens=8,
                              temperature=0.9, seed=3, n=3)
check(len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2], "n = 3")
again = client.completions.create(model="gpt2", prompt="The meaning of life is", max_tokens=8,
                                  temperature=0.9, seed=3, n=3)
check([c.text for c in r.choices] == [c.text for c in again.choices], "seeded n is reproducible")
full = cli_greedy("Hello", 12)
stop = full[4:7]
r = client.completions.create(model="gpt2", prompt="Hello", max_tokens=12, temperature=0,
                              stop=[stop])
check(r.choices[0].text == full[:full.index(stop)], f"stop {stop!r}: {r.choices[0].text!r}")
check(r.choices[0].finish_reason == "stop", "stop finish")
r = client.completions.create(model="gpt2", prompt="Hello", max_tokens=5, temperature=0,
                              logprobs=2)
lp = r.choices[0].logprobs
check(len(lp.tokens) == 5 and len(lp.token_logprobs) == 5, f"logprobs {lp}")
check(all(len(t) == 2 for t in lp.top_logprobs), "top logprobs")
check("".join(lp.tokens) == r.choices[0].text, "logprob tokens spell the text")

# Chat, streaming and not.
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
r = client.chat.completions.create(model="gpt2", messages=msgs, max_tokens=8, temperature=0,
                                   logprobs=True, top_logprobs=2)
check(r.object == "chat.completion", r.object)
msg = r.choices[0].message
check(msg.role == "assistant", msg.role)
want = cli_greedy("System: Be brief.\nUser: Hi there\nAssistant:", 8)
check(want.startswith(msg.content), f"chat {msg.content!r} vs {want!r}")
check(len(r.choices[0].logprobs.content) >= 1, "chat logprobs")
check(len(r.choices[0].logprobs.content[0].top_logprobs) == 2, "chat top logprobs")
text = ""
for c in client.chat.completions.create(model="gpt2", messages=msgs, max_tokens=8,
                                        temperature=0, stream=True):
    if c.choices and c.choices[0].delta.content:
        text += c.choices[0].delta.content
check(text == msg.content, f"chat stream {text!r} vs {msg.content!r}")

# Errors come back as the client's exceptions.
try:
    client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    check(False, "unknown model accepted")
except openai.NotFoundError:
    pass
try:
    client.completions.create(model="gpt2", prompt="Hi", max_tokens=2, temperature=-1)
    check(False, "temperature -1 accepted")
except openai.BadRequestError as e:
    check("temperature" in str(e), str(e))
try:
    openai.OpenAI(base_url=URL, api_key="wrong", max_retries=0).completions.create(
        model="gpt2", prompt="Hi", max_tokens=2)
    check(False, "wrong key accepted")
except openai.AuthenticationError:
    pass

print("openai client: all checks passed")
