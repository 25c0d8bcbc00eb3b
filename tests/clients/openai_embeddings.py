"""Drives `llama serve /v1/embeddings` with the official `openai` package.
Usage: python3 openai_embeddings.py BASE_URL
Asks for float and base64 vectors (the client's default is base64, which it decodes
itself), a batch and a token-id input, and checks they agree. Prints one line per check and
exits non-zero on the first failure."""
import base64
import math
import struct
import sys

from openai import BadRequestError, OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="unused")
model = client.models.list().data[0].id
print("model:", model)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


texts = ["The quick brown fox jumps over the lazy dog.", "A bowl of soup on a cold day.", "Paris is the capital of France."]

r = client.embeddings.create(model=model, input=texts, encoding_format="float")
assert r.object == "list" and len(r.data) == 3, r
assert [d.index for d in r.data] == [0, 1, 2], r
width = len(r.data[0].embedding)
assert width > 0 and all(len(d.embedding) == width for d in r.data)
assert all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-3 for d in r.data), "vectors are not unit length"
assert r.usage.prompt_tokens > 3 and r.usage.total_tokens == r.usage.prompt_tokens, r.usage
print("float:", len(r.data), "vectors of", width, "floats; usage", r.usage.prompt_tokens, "tokens")

# Asked for explicitly, base64 comes back as the string: little-endian float32s.
b = client.embeddings.create(model=model, input=texts, encoding_format="base64")
assert len(b.data) == 3
for f, e in zip(r.data, b.data):
    assert isinstance(e.embedding, str), type(e.embedding)
    raw = base64.b64decode(e.embedding)
    v = struct.unpack("<%df" % (len(raw) // 4), raw)
    # The JSON floats are the shortest text of each float32: read back as float32, equal.
    as_f32 = [struct.unpack("<f", struct.pack("<f", x))[0] for x in f.embedding]
    assert len(v) == width and list(v) == as_f32, "base64 and float vectors differ"
print("base64: little-endian float32, equal to the float vectors")

# The client's default: it asks for base64 and decodes it itself.
d = client.embeddings.create(model=model, input=texts[0])
assert not isinstance(d.data[0].embedding, str)
c = cosine(list(d.data[0].embedding), r.data[0].embedding)
assert c >= 0.9999, c
print("default encoding (base64 decoded by the client), one string alone: cosine with its vector in the batch %.7f" % c)

same = client.embeddings.create(model=model, input=texts[0], dimensions=width)
assert len(same.data[0].embedding) == width
try:
    client.embeddings.create(model=model, input=texts[0], dimensions=width // 2)
    raise AssertionError("dimensions other than the model's were accepted")
except BadRequestError as e:
    assert "dimensions" in str(e), e
print("dimensions: the model's own accepted, another refused with 400")

try:
    client.embeddings.create(model=model, input="")
    raise AssertionError("an empty input was accepted")
except BadRequestError as e:
    assert "input 0 is empty" in str(e), e
print("empty input: 400")
print("ok")
