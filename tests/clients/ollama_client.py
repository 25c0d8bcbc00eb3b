"""Drives `llama serve`'s Ollama API (/api/*) with the official `ollama` package.
Usage: python3 ollama_client.py BASE_URL
The server serves `smol` (SmolLM2, ChatML template) with pooling, so it can embed too.
Lists, shows, generates (whole and streamed, with statistics), chats (streamed, with a
JSON Schema `format` whose reply validates, with `tools` whose call's arguments validate),
embeds, and unloads with keep_alive=0. Prints one line per check and exits non-zero on the
first failure; ends with "ok"."""
import sys

import jsonschema
import ollama

base = sys.argv[1]
client = ollama.Client(host=base)
model = "smol"

# The catalogue: the client parses modified_at as a datetime and size as bytes.
listed = client.list()
names = [m.model for m in listed.models]
assert model in names, names
m = next(m for m in listed.models if m.model == model)
assert m.modified_at is not None and m.modified_at.year >= 2000, m
assert m.size > 0, m
assert m.details.format == "gguf" and m.details.family == "llama", m.details
assert m.details.parameter_size.endswith("M"), m.details
print("list:", names, m.details.parameter_size, m.details.quantization_level)

shown = client.show(model)
assert "completion" in shown.capabilities, shown.capabilities
assert "<|im_start|>" in shown.template, shown.template
assert shown.modelinfo["general.architecture"] == "llama", shown.modelinfo
assert shown.modelinfo["general.parameter_count"] > 0, shown.modelinfo
print("show:", shown.capabilities, shown.modelinfo)

try:
    client.show("no-such-model")
    raise AssertionError("an unknown model was shown")
except ollama.ResponseError as e:
    assert e.status_code == 404 and "not found" in e.error, (e.status_code, e.error)
print("show unknown: 404")

# A whole answer, with its statistics.
r = client.generate(model=model, prompt="Say hello.", options={"temperature": 0, "num_predict": 16})
assert r.done and r.done_reason in ("stop", "length"), r
assert r.response, r
assert r.prompt_eval_count > 0 and r.eval_count > 0, r
assert r.total_duration > 0 and r.load_duration is not None and r.prompt_eval_duration is not None and r.eval_duration is not None, r
print("generate:", repr(r.response), r.eval_count, "tokens")

# The same, streamed: pieces, then one done object with the statistics.
parts = list(client.generate(model=model, prompt="Say hello.", options={"temperature": 0, "num_predict": 16}, stream=True))
assert len(parts) >= 2 and all(not p.done for p in parts[:-1]) and parts[-1].done, parts
text = "".join(p.response for p in parts)
assert text == r.response, (text, r.response)
last = parts[-1]
assert last.eval_count == r.eval_count and last.prompt_eval_count == r.prompt_eval_count, (last, r)
print("generate streamed:", len(parts), "objects, same text")

# A streamed chat.
parts = list(client.chat(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], options={"temperature": 0, "num_predict": 24}, stream=True))
assert parts[-1].done and parts[-1].done_reason in ("stop", "length"), parts[-1]
reply = "".join(p.message.content or "" for p in parts)
assert reply.strip(), parts
assert all(p.message.role == "assistant" for p in parts)
print("chat streamed:", repr(reply))

# `format` as a JSON Schema: the reply is JSON that validates.
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"]}
r = client.chat(model=model, messages=[{"role": "user", "content": "Describe a person as JSON with a name and an age."}], format=schema, options={"temperature": 0, "num_predict": 80})
import json

doc = json.loads(r.message.content)
jsonschema.validate(doc, schema)
print("chat format:", doc)

# `format="json"`: any JSON object.
r = client.generate(model=model, prompt="A JSON object describing a cat.", format="json", options={"temperature": 0, "num_predict": 60})
if r.done_reason == "stop":
    assert isinstance(json.loads(r.response), dict), r.response
print("generate format json:", r.done_reason)

# Tools: the model calls the tool, with arguments that validate against its schema.
params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city", "parameters": params}}]
question = [{"role": "user", "content": "What is the weather in Oslo?"}]
r = client.chat(model=model, messages=question, tools=tools, options={"temperature": 0, "num_predict": 80})
calls = r.message.tool_calls
assert calls, r.message
assert calls[0].function.name == "get_weather", calls
jsonschema.validate(dict(calls[0].function.arguments), params)
print("chat tools:", calls[0].function.name, dict(calls[0].function.arguments))

# Streamed, the call comes whole once the answer is complete.
parts = list(client.chat(model=model, messages=question, tools=tools, options={"temperature": 0, "num_predict": 80}, stream=True))
streamed = [c for p in parts for c in (p.message.tool_calls or [])]
assert len(streamed) == 1 and streamed[0].function.name == "get_weather", parts
assert dict(streamed[0].function.arguments) == dict(calls[0].function.arguments), (streamed, calls)
assert parts[-1].done, parts[-1]
print("chat tools streamed: the same call")

# The round trip: the call and its result in the history.
history = question + [{"role": "assistant", "content": "", "tool_calls": [calls[0]]}, {"role": "tool", "content": '{"celsius": 4}', "tool_name": "get_weather"}]
r = client.chat(model=model, messages=history, options={"temperature": 0, "num_predict": 30})
assert r.message.content, r.message
print("chat tool result:", repr(r.message.content))

# Embeddings: L2-normalised vectors, one per input.
e = client.embed(model=model, input=["The cat sleeps.", "Paris is in France."])
assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 576, len(e.embeddings)
norm = sum(x * x for x in e.embeddings[0]) ** 0.5
assert abs(norm - 1.0) < 1e-3, norm
assert e.prompt_eval_count > 0, e
legacy = client.embeddings(model=model, prompt="The cat sleeps.")
assert len(legacy.embedding) == 576
print("embed:", len(e.embeddings), "vectors of", len(e.embeddings[0]))

# An empty prompt with keep_alive=0 unloads the model.
assert model in [p.model for p in client.ps().models], client.ps()
r = client.generate(model=model, prompt="", keep_alive=0)
assert r.done and r.done_reason == "unload", r
assert model not in [p.model for p in client.ps().models], client.ps()
print("unload: gone from ps")

# An empty prompt loads it again.
r = client.generate(model=model, prompt="", keep_alive="5m")
assert r.done_reason == "load", r
loaded = [p for p in client.ps().models if p.model == model]
assert loaded and loaded[0].expires_at is not None and loaded[0].context_length > 0, client.ps()
print("load: in ps until", loaded[0].expires_at)

import httpx

version = httpx.get(base + "/api/version").json()["version"]
assert version.count(".") == 2, version
print("version:", version)
print("ok")
