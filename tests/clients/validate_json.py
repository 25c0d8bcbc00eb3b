"""Validates generated documents against their JSON schemas with the `jsonschema` package.
Usage: python3 validate_json.py RESULTS.jsonl
Each line: {"schema": FILE, "seed": N, "finish": "stop"|"length"|..., "output": TEXT}.
Outputs that ended with finish `stop` must parse as JSON and validate against their schema
(draft 2020-12, formats checked where the validator knows them); the others are counted.
Prints one line per output and a summary; exits 1 if any `stop` output is invalid."""
import json
import sys

import jsonschema

bad = stopped = other = 0
for line in open(sys.argv[1], encoding="utf-8"):
    r = json.loads(line)
    schema = json.load(open(r["schema"], encoding="utf-8"))
    name = r["schema"].rsplit("/", 1)[-1]
    if r["finish"] != "stop":
        other += 1
        print(f"{r['finish']:6} {name} seed {r['seed']}: {r['output'][:60]!r}")
        continue
    stopped += 1
    try:
        doc = json.loads(r["output"])
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(doc)
        print(f"valid  {name} seed {r['seed']}: {json.dumps(doc)[:100]}")
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        bad += 1
        print(f"INVALID {name} seed {r['seed']}: {r['output']!r}: {str(e).splitlines()[0]}")
print(f"summary: {stopped} stopped, {bad} invalid, {other} not stopped")
sys.exit(1 if bad else 0)
