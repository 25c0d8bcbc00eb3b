"""Drives `llama serve` with the official `openai` package: structured output and tool calls.
Usage: python3 openai_structured.py BASE_URL
Every answer is checked with the `jsonschema` validator against the schema that was asked
for. Prints one line per check and exits non-zero on the first failure."""
import json
import sys
from typing import List, Literal

import jsonschema
from openai import OpenAI
from pydantic import BaseModel, Field

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="unused")
model = client.models.list().data[0].id
print("model:", model)

# 1. response_format with a JSON schema.
person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Describe a programmer as JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}},
    max_tokens=200,
    temperature=0,
)
assert r.choices[0].finish_reason == "stop", r
doc = json.loads(r.choices[0].message.content)
jsonschema.validate(doc, person)
print("response_format json_schema:", json.dumps(doc))

# 1b. json_object: any JSON object.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
    response_format={"type": "json_object"},
    max_tokens=120,
    temperature=0,
)
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(r.choices[0].message.content), dict)
print("response_format json_object:", r.choices[0].finish_reason, repr(r.choices[0].message.content[:80]))


# 2. The client's parse helper with a Pydantic model.
class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0)
    kind: Literal["capital", "town", "village"]


class Cities(BaseModel):
    cities: List[City] = Field(min_length=1, max_length=3)


p = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "List two European cities."}],
    response_format=Cities,
    max_tokens=300,
    temperature=0,
)
parsed = p.choices[0].message.parsed
assert isinstance(parsed, Cities), p
print("parse helper:", parsed)

# 3. Tools with tool_choice="required": arguments validate against the function's schema.
weather_params = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
time_params = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
    "required": ["timezone"],
}
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": weather_params}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": time_params}},
]
schemas = {"get_weather": weather_params, "get_time": time_params}
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=200, temperature=0)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
calls = choice.message.tool_calls
assert calls, choice.message
for c in calls:
    assert c.type == "function" and c.id, c
    jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
print("tool_choice=required:", [(c.function.name, c.function.arguments) for c in calls])

# 3b. A named function.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
    tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_time"}},
    max_tokens=200,
    temperature=0,
)
calls = r.choices[0].message.tool_calls
assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_time"], r
jsonschema.validate(json.loads(calls[0].function.arguments), time_params)
print("named tool_choice:", calls[0].function.arguments)

# 4. Streaming tool calls, assembled by the client's own stream helper.
with client.chat.completions.stream(
    model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=200, temperature=0
) as stream:
    arg_events = 0
    for event in stream:
        if event.type == "tool_calls.function.arguments.delta":
            arg_events += 1
    final = stream.get_final_completion()
streamed = final.choices[0].message.tool_calls
assert final.choices[0].finish_reason == "tool_calls", final
assert streamed and arg_events >= 1, final
for c in streamed:
    jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
# The same greedy answer as the non-streaming one.
assert [(c.function.name, c.function.arguments) for c in streamed] == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
print("streamed tool calls:", [(c.function.name, c.function.arguments) for c in streamed], "argument deltas:", arg_events)

# 5. A full round trip: the call, the tool's result, the final answer.
call = choice.message.tool_calls[0]
messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})})
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none", max_tokens=40, temperature=0)
final = r.choices[0]
assert final.message.content and not final.message.tool_calls, final
print("round trip answer:", repr(final.message.content), final.finish_reason)
r = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=120, temperature=0)
print("round trip with tool_choice=auto:", r.choices[0].finish_reason, repr(r.choices[0].message.content), r.choices[0].message.tool_calls)
assert r.choices[0].finish_reason in ("stop", "tool_calls", "length")
print("ok")
