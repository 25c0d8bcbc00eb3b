"""Drives `llama serve` with the official `openai` package: non-streaming and streaming chat.
Usage: python3 openai_chat.py BASE_URL   (e.g. http://127.0.0.1:8080)
Prints one line per check and exits non-zero on the first failure."""
import sys

from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="unused")
model = client.models.list().data[0].id
print("model:", model)

r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant"
assert r.usage.completion_tokens == 8, r.usage
print("non-streaming:", repr(r.choices[0].message.content), r.choices[0].finish_reason)

pieces, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert finish == "length", finish
assert usage is not None and usage.completion_tokens == 8, usage
print("streaming:", repr("".join(pieces)), finish, "usage", usage.completion_tokens)

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
assert c.choices[0].text, c
print("completions:", repr(c.choices[0].text))
print("ok")
