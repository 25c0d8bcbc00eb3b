# Extracts (name, status, schema) of every test case in llama.cpp's tests/test-json-schema-to-grammar.cpp.
import re, json, sys
src = open(sys.argv[1]).read()
# each test case: test({ STATUS, "name", R"""(schema)""", R"""(grammar)""" });
pat = re.compile(r'test\(\{\s*(SUCCESS|FAILURE),\s*"((?:[^"\\]|\\.)*)",\s*R"""\((.*?)\)"""', re.S)
out = []
for m in pat.finditer(src):
    status, name, schema = m.group(1), m.group(2), m.group(3)
    try:
        val = json.loads(schema)
        ok = True
    except Exception as e:
        val = schema; ok = False
    out.append({"name": name, "status": status, "schema_text": schema, "parses": ok})
print(json.dumps(out, indent=1))
