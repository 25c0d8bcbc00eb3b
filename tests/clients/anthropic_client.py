"""Drives `llama serve` with the official `anthropic` package: the Messages API whole and
streamed (raw events and the client's stream helper), a tool round trip, count_tokens, stop
sequences and the API key.
Usage: python3 anthropic_client.py BASE_URL API_KEY MODEL
Prints one line per check and exits non-zero on the first failure."""
import json
import sys

import anthropic
import jsonschema

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
# This client version has no sampling arguments: temperature 0 goes in the body.
T0 = {"temperature": 0}
hello = [{"role": "user", "content": "Say hello."}]

# 1. A whole answer.
m = client.messages.create(model=model, extra_body=T0, max_tokens=24, system="You are friendly.", messages=hello)
assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
assert m.stop_reason in ("end_turn", "max_tokens"), m
assert len(m.content) == 1 and m.content[0].type == "text" and m.content[0].text, m
assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 24, m.usage
whole = m.content[0].text
print("create:", m.stop_reason, repr(whole), m.usage.input_tokens, m.usage.output_tokens)

# 2. The same request streamed, as raw events in Anthropic's order.
events = list(client.messages.create(model=model, extra_body=T0, max_tokens=24, system="You are friendly.", messages=hello, stream=True))
kinds = [e.type for e in events]
print("raw events:", " ".join(dict.fromkeys(kinds)))
assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
assert events[0].message.usage.input_tokens == m.usage.input_tokens, events[0]
assert events[0].message.content == [], events[0]
blocks = [k for k in kinds if k not in ("ping",)][1:-2]
assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop", blocks
assert set(blocks[1:-1]) == {"content_block_delta"}, blocks
streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta")
assert streamed == whole, (streamed, whole)
assert events[-2].delta.stop_reason == m.stop_reason and events[-2].usage.output_tokens == m.usage.output_tokens, events[-2]

# 3. The client's stream helper assembles the same message.
with client.messages.stream(model=model, extra_body=T0, max_tokens=24, system="You are friendly.", messages=hello) as s:
    pieces = list(s.text_stream)
    final = s.get_final_message()
assert "".join(pieces) == whole, pieces
assert final.content[0].text == whole and final.stop_reason == m.stop_reason, final
assert final.usage.input_tokens == m.usage.input_tokens and final.usage.output_tokens == m.usage.output_tokens, final.usage
print("stream helper:", len(pieces), "pieces,", final.stop_reason)

# 4. count_tokens counts the prompt the same request gets.
n = client.messages.count_tokens(model=model, system="You are friendly.", messages=hello)
assert n.input_tokens == m.usage.input_tokens, (n, m.usage)
print("count_tokens:", n.input_tokens)

# 5. A tool round trip: a forced call whose input validates, its result, a text answer.
weather_schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
tools = [{"name": "get_weather", "description": "The current weather in a city.", "input_schema": weather_schema}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
    t = client.messages.create(model=model, extra_body=T0, max_tokens=100, messages=ask, tools=tools, tool_choice=choice)
    assert t.stop_reason == "tool_use", t
    calls = [b for b in t.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("toolu_"), t
    jsonschema.validate(calls[0].input, weather_schema)
    print("tool_choice", choice["type"], "->", json.dumps(calls[0].input))
n = client.messages.count_tokens(model=model, messages=ask, tools=tools, tool_choice={"type": "any"})
assert n.input_tokens == t.usage.input_tokens, (n, t.usage)
call = calls[0]
followup = ask + [
    {"role": "assistant", "content": t.content},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 degrees and sunny"}]},
]
# This small model would call again if it may: tool_choice none asks for the answer.
r = client.messages.create(model=model, extra_body=T0, max_tokens=60, messages=followup, tools=tools, tool_choice={"type": "none"})
texts = [b.text for b in r.content if b.type == "text"]
assert r.stop_reason in ("end_turn", "max_tokens") and texts and texts[0].strip(), r
assert not [b for b in r.content if b.type == "tool_use"], r
print("after the tool result:", r.stop_reason, repr(texts[0][:80]))
r = client.messages.create(model=model, extra_body=T0, max_tokens=100, messages=followup, tools=tools)
assert r.stop_reason in ("end_turn", "max_tokens", "tool_use"), r
print("after the tool result, tool_choice auto:", r.stop_reason, [b.type for b in r.content])

# 5b. The forced call streamed: a tool_use block with input_json_delta pieces.
with client.messages.stream(model=model, extra_body=T0, max_tokens=100, messages=ask, tools=tools, tool_choice={"type": "any"}) as s:
    raw = list(s)
    final = s.get_final_message()
partial = "".join(e.delta.partial_json for e in raw if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use", final
assert json.loads(partial) == final.content[-1].input, (partial, final.content[-1].input)
jsonschema.validate(final.content[-1].input, weather_schema)
print("streamed tool call:", json.dumps(final.content[-1].input))

# 6. A stop sequence the answer reaches at temperature 0 ends it, and is named.
words = whole.split()
stop = words[1] if len(words) > 1 else words[0]
st = client.messages.create(model=model, extra_body=T0, max_tokens=24, system="You are friendly.", messages=hello, stop_sequences=["zzz-never", stop])
assert st.stop_reason == "stop_sequence" and st.stop_sequence == stop, st
assert stop not in st.content[0].text and whole.startswith(st.content[0].text), (st.content, whole)
with client.messages.stream(model=model, extra_body=T0, max_tokens=24, system="You are friendly.", messages=hello, stop_sequences=[stop]) as s:
    final = s.get_final_message()
assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop, final
print("stop_sequences:", repr(stop), "->", repr(st.content[0].text))

# 6b. output_config.format: the answer is JSON that validates against the schema.
person = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
j = client.messages.create(
    model=model, extra_body=T0, max_tokens=100, messages=[{"role": "user", "content": "Describe a person as JSON."}],
    output_config={"format": {"type": "json_schema", "schema": person}},
)
assert j.stop_reason == "end_turn", j
doc = json.loads(j.content[0].text)
jsonschema.validate(doc, person)
print("output_config.format:", json.dumps(doc))

# 7. Errors arrive as the client's exceptions.
try:
    client.messages.create(model="no-such-model", extra_body=T0, max_tokens=5, messages=hello)
    raise AssertionError("an unknown model was served")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
    print("unknown model:", e.status_code, e.body["error"]["type"])
try:
    client.messages.create(model=model, extra_body=T0, max_tokens=5, messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    raise AssertionError("an image was accepted")
except anthropic.BadRequestError as e:
    assert "messages.0.content.0: image blocks are not supported" in e.message, e.message
    print("image block:", e.status_code, e.body["error"]["type"])
wrong = anthropic.Anthropic(base_url=base, api_key=key + "-wrong", max_retries=0)
try:
    wrong.messages.create(model=model, extra_body=T0, max_tokens=5, messages=hello)
    raise AssertionError("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
    print("wrong key:", e.status_code, e.body["error"]["type"])
print("ok")
