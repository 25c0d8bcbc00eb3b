//! Unit tests: conversion of every feature checked by matching documents with the
//! test-only matcher, errors and bounds, llama.cpp's own test schemas, and a no-panic sweep.

use serde_json::{json, Value};

use crate::matcher::Matcher;
use crate::*;

fn grammar(schema: Value) -> String {
    json_schema_to_grammar(&schema).unwrap_or_else(|e| panic!("{schema}: {e}"))
}

/// Asserts which documents the schema's grammar accepts and rejects.
fn check(schema: Value, good: &[&str], bad: &[&str]) {
    let g = grammar(schema.clone());
    let m = Matcher::new(&g);
    for d in good {
        assert!(m.accepts(d), "{schema}\nshould accept {d}\n{g}");
    }
    for d in bad {
        assert!(!m.accepts(d), "{schema}\nshould reject {d}\n{g}");
    }
}

fn err(schema: Value) -> SchemaError {
    match json_schema_to_grammar(&schema) {
        Ok(g) => panic!("{schema} converted:\n{g}"),
        Err(e) => e,
    }
}

fn unsupported(keyword: &str, path: &str) -> SchemaError {
    SchemaError::Unsupported { keyword: keyword.into(), path: path.into() }
}

#[test]
fn primitives() {
    check(json!({"type": "string"}), &[r#""""#, r#""a b""#, r#""\n\u00e9""#], &["a", r#""a"#, r#""\x""#]);
    check(json!({"type": "integer"}), &["0", "-12", "123"], &["01", "1.5", "-"]);
    check(json!({"type": "number"}), &["0", "-1.5", "2e10", "3.25E-2"], &["1.", ".5", "abc"]);
    check(json!({"type": "boolean"}), &["true", "false"], &["TRUE", "1"]);
    check(json!({"type": "null"}), &["null"], &["nil", ""]);
    check(json!({}), &["1", "null", r#"{"a": [1, "x"]}"#, "[]"], &["", "{", "nope"]);
    check(json!(true), &["[1,2]", "{}"], &["]"]);
}

#[test]
fn type_arrays_and_nullable() {
    check(json!({"type": ["string", "null"]}), &["null", r#""x""#], &["1"]);
    check(json!({"type": ["string", "integer"], "maxLength": 2}), ["null"].map(|_| r#""ab""#).as_slice(), &[r#""abc""#, "1.5"]);
    check(json!({"type": "integer", "nullable": true, "minimum": 2}), &["null", "2", "30"], &["1", "\"a\""]);
}

#[test]
fn integer_ranges() {
    let cases: &[(Value, i64, i64)] = &[
        (json!({"type": "integer", "minimum": 0}), 0, 2000),
        (json!({"type": "integer", "minimum": 25}), 25, 2000),
        (json!({"type": "integer", "minimum": -123}), -123, 2000),
        (json!({"type": "integer", "maximum": 30}), -2000, 30),
        (json!({"type": "integer", "maximum": -5}), -2000, -5),
        (json!({"type": "integer", "minimum": 15, "maximum": 300}), 15, 300),
        (json!({"type": "integer", "minimum": -123, "maximum": 42}), -123, 42),
        (json!({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 10.5}), 5, 10),
        (json!({"type": "integer", "minimum": 0.5, "maximum": 99.9}), 1, 99),
        (json!({"type": "integer", "minimum": 7, "exclusiveMinimum": true}), 8, 2000),
    ];
    for (schema, lo, hi) in cases {
        let m = Matcher::new(&grammar(schema.clone()));
        for v in -1100i64..=1100 {
            assert_eq!(m.accepts(&v.to_string()), (*lo..=*hi).contains(&v), "{schema} at {v}");
        }
        assert!(!m.accepts("007"), "{schema}");
    }
}

#[test]
fn strings() {
    check(json!({"type": "string", "minLength": 2, "maxLength": 3}), &[r#""ab""#, r#""a\nc""#], &[r#""a""#, r#""abcd""#]);
    check(json!({"format": "date"}), &[r#""2024-02-29""#], &[r#""2024-13-01""#, "2024-01-01"]);
    check(json!({"type": "string", "format": "time"}), &[r#""12:30:00Z""#, r#""23:59:59.123+02:00""#], &[r#""24:00:00Z""#]);
    check(json!({"type": "string", "format": "date-time"}), &[r#""2024-01-02T03:04:05Z""#], &[r#""2024-01-02 03:04:05Z""#]);
    check(json!({"type": "string", "format": "uuid"}), &[r#""123e4567-e89b-12d3-a456-426614174000""#], &[r#""123e4567""#]);
    check(json!({"const": "a\"b\\c\n"}), &[r#""a\"b\\c\n""#], &[r#""ab""#]);
}

#[test]
fn patterns() {
    check(json!({"type": "string", "pattern": "^\\d{3}-[a-z]+$"}), &[r#""123-abc""#], &[r#""12-abc""#, r#""123-""#]);
    check(json!({"type": "string", "pattern": "^(?:ab|cd)*x?$"}), &[r#""""#, r#""abcdx""#], &[r#""ac""#]);
    check(json!({"type": "string", "pattern": "^a\"b\\\\$"}), &[r#""a\"b\\""#], &[r#""a"b\""#]);
    check(json!({"type": "string", "pattern": "^[^a]$"}), &[r#""b""#, r#""\"""#, r#""\n""#], &[r#""a""#, r#"""""#]);
    check(json!({"type": "string", "pattern": "^.+$"}), &[r#""x y""#, r#""\\""#], &[r#""\n""#, r#""""#]);
    check(json!({"type": "string", "pattern": "^[\\s\\w.-]{1,3}$"}), &[r#""a_.""#, r#""\t-""#], &[r#""a,b""#]);
    check(json!({"type": "string", "pattern": "^A|B|C$"}), &[r#""A""#, r#""C""#], &[r#""AB""#]);
    for (p, kw) in [("[0-9]+", "pattern"), ("^(?=a)a$", "pattern"), ("^a\\bb$", "pattern"), ("^\\p{L}$", "pattern"), ("^a\\1$", "pattern")] {
        assert_eq!(err(json!({"type": "string", "pattern": p})), unsupported(kw, ""), "{p}");
    }
    assert!(matches!(err(json!({"type": "string", "pattern": "^(a$"})), SchemaError::Invalid { .. }));
    assert!(matches!(err(json!({"type": "string", "pattern": "^a{3,1}$"})), SchemaError::Invalid { .. }));
    assert!(matches!(err(json!({"type": "string", "pattern": "^a{99999}$"})), SchemaError::LimitExceeded { .. }));
    // A nullable repeated forever is left recursion for llama.cpp's engine.
    assert!(matches!(err(json!({"type": "string", "pattern": "^(a?)*$"})), SchemaError::LeftRecursion { .. }));
}

#[test]
fn enums_and_consts() {
    check(json!({"enum": [1, "a", null, [1, 2], {"k": true}]}), &["1", r#""a""#, "null", "[1,2]", r#"{"k":true}"#], &["2", r#""b""#]);
    check(json!({"type": "string", "enum": ["a", 1]}), &[r#""a""#], &["1"]);
    check(json!({"const": 3, "enum": [3, 4]}), &["3"], &["4"]);
    assert!(matches!(err(json!({"enum": []})), SchemaError::Invalid { .. }));
    assert!(matches!(err(json!({"type": "string", "enum": [1]})), SchemaError::Invalid { .. }));
    assert_eq!(err(json!({"enum": ["a"], "maxLength": 2})), unsupported("maxLength", ""));
}

#[test]
fn objects() {
    let s = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}}, "required": ["b"]});
    check(s, &[r#"{"b": "x"}"#, r#"{ "b":"x", "a":1, "c":true }"#, r#"{"b":"x","c":false}"#], &[r#"{}"#, r#"{"a":1}"#, r#"{"b":"x","d":1}"#, r#"{"b":"x","a":"no"}"#]);
    // additionalProperties: schema, false, true, and the llama.cpp default.
    let s = json!({"properties": {"ab": {"type": "integer"}}, "additionalProperties": {"type": "integer"}});
    check(s, &[r#"{"ab": 1, "x": 2}"#, r#"{"a": 3}"#, r#"{"abc": 3}"#], &[r#"{"ab": 1, "ab": 2}"#, r#"{"x": "s"}"#]);
    check(json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false}), &[r#"{"a": 1}"#, "{}"], &[r#"{"b": 1}"#]);
    check(json!({"type": "object", "properties": {"a": {}}}), &[r#"{"a": [1]}"#], &[r#"{"b": 1}"#]);
    check(json!({"type": "object"}), &[r#"{"anything": {"x": []}}"#, "{}"], &["[]"]);
    check(json!({"type": "object", "additionalProperties": true, "properties": {"a": {"const": 1}}}), &[r#"{"a": 1, "b": 2}"#], &[r#"{"a": 2}"#]);
    // A required key missing from properties is still required.
    check(json!({"type": "object", "required": ["z"]}), &[r#"{"z": 1}"#], &["{}"]);
    assert!(matches!(err(json!({"type": "object", "properties": {}, "required": ["z"], "additionalProperties": false})), SchemaError::Invalid { .. }));
    // Schema order, not alphabetical order (serde_json's preserve_order).
    check(json!({"type": "object", "properties": {"b": {"const": 1}, "a": {"const": 2}}, "required": ["a", "b"]}), &[r#"{"b": 1, "a": 2}"#], &[r#"{"a": 2, "b": 1}"#]);
    // An empty property name does not take over the root rule.
    check(json!({"properties": {"": {"type": "integer"}}, "additionalProperties": false}), &[r#"{"": 1}"#, "{}"], &["1"]);
    // Property names needing escapes.
    check(json!({"type": "object", "properties": {"a\"b": {"const": 1}}, "required": ["a\"b"]}), &[r#"{"a\"b": 1}"#], &[r#"{"ab": 1}"#]);
}

#[test]
fn arrays() {
    check(json!({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}), &["[1]", "[1, 2,3]"], &["[]", "[1,2,3,4]", "[\"a\"]"]);
    check(json!({"type": "array", "maxItems": 0}), &["[]"], &["[1]"]);
    check(json!({"prefixItems": [{"type": "string"}, {"type": "integer"}]}), &[r#"["a", 1]"#], &[r#"["a"]"#, r#"["a",1,2]"#]);
    check(json!({"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}, "maxItems": 3}), &[r#"["a"]"#, r#"["a",1,2]"#], &[r#"["a",1,2,3]"#, "[1]"]);
    check(json!({"type": "array", "items": false}), &["[]"], &["[1]"]);
    check(json!({"type": "array", "uniqueItems": false}), &["[1, 1]"], &[]);
    assert_eq!(err(json!({"type": "array", "uniqueItems": true})), unsupported("uniqueItems", ""));
    assert!(matches!(err(json!({"type": "array", "minItems": 3, "maxItems": 2})), SchemaError::Invalid { .. }));
}

#[test]
fn combinators() {
    check(json!({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]}), &["1", r#""a""#], &[r#""ab""#]);
    check(json!({"oneOf": [{"const": 1}, {"const": 2}], "description": "x"}), &["1", "2"], &["3"]);
    let s = json!({
        "allOf": [{"$ref": "#/definitions/a"}, {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
                  {"anyOf": [{"properties": {"c": {"const": 1}}}, {"properties": {"d": {"const": 2}}}]}],
        "definitions": {"a": {"properties": {"a": {"type": "string"}}, "required": ["a"]}}
    });
    check(s, &[r#"{"a": "x", "b": 1}"#, r#"{"a": "x", "b": 1, "c": 1, "d": 2}"#], &[r#"{"b": 1}"#, r#"{"a":"x","b":1,"e":1}"#]);
    check(json!({"allOf": [{"enum": [1, 2, 3]}, {"enum": [2, 3, 4]}]}), &["2", "3"], &["1", "4"]);
    check(json!({"allOf": [{"type": "string", "maxLength": 2}], "title": "t"}), &[r#""ab""#], &[r#""abc""#]);
    assert_eq!(err(json!({"allOf": [{"type": "string"}, {"maxLength": 2}]})), unsupported("allOf", "/allOf/0"));
    assert_eq!(err(json!({"anyOf": [{"type": "string"}], "minLength": 2})), unsupported("minLength", ""));
    // A `type` next to anyOf is fine when it constrains nothing more.
    check(json!({"type": "object", "anyOf": [{"properties": {"a": {"const": 1}}}, {"properties": {"b": {"const": 2}}}]}), &[r#"{"a":1}"#, "{}"], &[]);
    assert_eq!(err(json!({"type": "string", "anyOf": [{"type": "integer"}]})), unsupported("type", ""));
}

#[test]
fn refs() {
    let s = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}, "required": ["v"]}}});
    let g = grammar(s.clone());
    assert!(g.contains("ref-defs-node ::="), "{g}");
    check(s, &[r#"{"v": 1}"#, r#"{"v": 1, "next": {"v": 2, "next": {"v": 3}}}"#], &[r#"{"next": {"v": 1}}"#]);
    check(json!({"type": "array", "items": {"$ref": "#"}}), &["[]", "[[], [[]]]"], &["[1]"]);
    check(json!({"properties": {"x": {"$ref": "#/definitions/a~1b"}}, "definitions": {"a/b": {"type": "integer"}}}), &[r#"{"x": 1}"#], &[]);
    assert_eq!(err(json!({"$ref": "#/$defs/missing"})), SchemaError::UnresolvedRef { reference: "#/$defs/missing".into() });
    assert_eq!(err(json!({"$ref": "https://example.com/s.json"})), unsupported("$ref", ""));
    assert_eq!(err(json!({"$ref": "#/$defs/a", "minimum": 1, "$defs": {"a": {}}})), unsupported("minimum", ""));
}

#[test]
fn cycles_without_base_case() {
    let e = err(json!({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}));
    assert!(matches!(e, SchemaError::NoBaseCase { .. }), "{e:?}");
    let e = err(json!({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}}}));
    assert!(matches!(e, SchemaError::NoBaseCase { .. }), "{e:?}");
    // The same recursion made optional has a base case.
    grammar(json!({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}}}));
    let e = err(json!({"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}}));
    assert!(matches!(e, SchemaError::LeftRecursion { .. }), "{e:?}");
}

#[test]
fn unsupported_keywords_are_errors() {
    for (schema, kw, path) in [
        (json!({"not": {}}), "not", ""),
        (json!({"properties": {"a": {"not": {"type": "null"}}}}), "not", "/properties/a"),
        (json!({"if": {}, "then": {}}), "if", ""),
        (json!({"type": "array", "contains": {}}), "contains", ""),
        (json!({"type": "object", "patternProperties": {}}), "patternProperties", ""),
        (json!({"type": "object", "dependentRequired": {}}), "dependentRequired", ""),
        (json!({"type": "integer", "multipleOf": 3}), "multipleOf", ""),
        (json!({"type": "number", "minimum": 0}), "minimum", ""),
        (json!({"type": "string", "format": "email"}), "format", ""),
        (json!({"type": "string", "pattern": "^a$", "maxLength": 3}), "maxLength", ""),
        (json!({"type": "string", "frobnicate": 1}), "frobnicate", ""),
        (json!({"minimum": 3}), "minimum", ""),
        (json!({"items": [{"type": "string"}], "additionalItems": false}), "additionalItems", ""),
    ] {
        assert_eq!(err(schema.clone()), unsupported(kw, path), "{schema}");
    }
    assert_eq!(err(json!({"not": {}})).to_string(), "unsupported schema keyword 'not' at the schema root");
    assert_eq!(err(json!({"properties": {"a": {"not": {}}}})).to_string(), "unsupported schema keyword 'not' at /properties/a");
}

#[test]
fn annotations_and_vacuous_keywords_are_accepted() {
    grammar(json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "title": "t", "description": "d",
        "$comment": "c", "default": 1, "examples": [1], "deprecated": false, "readOnly": true, "writeOnly": false,
        "strict": true, "x-vendor": 1, "type": "integer", "minLength": 3, "properties": {}, "multipleOf": 1
    }));
    grammar(json!({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}}], "discriminator": {"propertyName": "k"}}));
}

#[test]
fn bounds() {
    let mut deep = json!({"type": "integer"});
    for _ in 0..100 {
        deep = json!({"type": "array", "items": deep});
    }
    assert_eq!(err(deep), SchemaError::TooDeep { limit: MAX_DEPTH });
    // A long $ref chain counts as depth too.
    let mut defs = serde_json::Map::new();
    for i in 0..200 {
        defs.insert(format!("d{i}"), json!({"$ref": format!("#/$defs/d{}", i + 1)}));
    }
    defs.insert("d200".into(), json!({"type": "null"}));
    assert_eq!(err(json!({"$ref": "#/$defs/d0", "$defs": defs})), SchemaError::TooDeep { limit: MAX_DEPTH });
    assert!(matches!(err(json!({"type": "string", "maxLength": 100_000})), SchemaError::LimitExceeded { .. }));
    assert!(matches!(err(json!({"type": "array", "minItems": 10_001})), SchemaError::LimitExceeded { .. }));
    // `required` names missing from `properties` count as properties (they were pushed
    // one by one with a scan of all before: quadratic).
    let names: Vec<String> = (0..20_000).map(|i| format!("r{i}")).collect();
    assert!(matches!(err(json!({"type": "object", "required": names})), SchemaError::LimitExceeded { .. }));
    let many: Vec<u32> = (0..20_000).collect();
    assert!(matches!(err(json!({"enum": many})), SchemaError::LimitExceeded { .. }));
    let big = "x".repeat(MAX_GRAMMAR_BYTES + 1);
    assert_eq!(err(json!({"const": big})), SchemaError::TooLarge { limit: MAX_GRAMMAR_BYTES });
    let props: serde_json::Map<String, Value> = (0..30).map(|i| (format!("p{i}"), json!({"type": "string", "maxLength": 10_000}))).collect();
    assert!(matches!(err(json!({"properties": props})), SchemaError::LimitExceeded { .. }));
    assert!(matches!(err(json!({"type": "integer", "minimum": 1e17})), SchemaError::LimitExceeded { .. }));
    // A const nested deeper than serde_json's parser allows, built by hand.
    let mut v = json!(1);
    // (Not deeper: dropping a Value recurses in serde_json itself.)
    for _ in 0..500 {
        v = Value::Array(vec![v]);
    }
    assert_eq!(err(json!({"const": v})), SchemaError::TooDeep { limit: MAX_DEPTH });
}

#[test]
fn converter_api() {
    let mut c = SchemaConverter::new();
    let args = c.add_schema("tool-args", &json!({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})).unwrap();
    let name = gbnf_literal("get \"weather\"");
    let root = c.add_rule("root", &format!("{name} space {args}"));
    assert_eq!(root, "root");
    assert_eq!(c.add_rule("string", "\"s\""), "string-");
    let g = c.finish().unwrap();
    assert!(Matcher::new(&g).accepts(r#"get "weather" {"x": 3}"#), "{g}");

    let mut c = SchemaConverter::new();
    c.add_rule("root", "missing");
    assert!(matches!(c.finish(), Err(SchemaError::InvalidRule { .. })));
    let mut c = SchemaConverter::new();
    c.add_rule("root", "\"unterminated");
    assert!(matches!(c.finish(), Err(SchemaError::InvalidRule { .. })));
    assert_eq!(SchemaConverter::new().finish(), Err(SchemaError::MissingRoot));
    assert_eq!(gbnf_literal("a\nb\0"), "\"a\\nb\\x00\"");

    let g = json_object_grammar();
    let m = Matcher::new(&g);
    assert!(m.accepts(r#"{"a": [1, {"b": null}]}"#) && !m.accepts("[1]"));
}

/// llama.cpp's test schemas: same outcome, except where we differ on purpose.
#[test]
fn llama_cpp_test_schemas() {
    let cases: Vec<Value> = serde_json::from_str(include_str!("../testdata/llama_cpp_cases.json")).unwrap();
    // Theirs succeed with "any string"; we refuse what we can't honour.
    let deliberate = ["unanchored regexp", "unsupported regexp in a property", "array with empty items and prefixItems"];
    assert_eq!(cases.len(), 80);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let schema: Value = serde_json::from_str(case["schema_text"].as_str().unwrap()).unwrap();
        let ours = json_schema_to_grammar(&schema);
        let expected_ok = case["status"] == "SUCCESS";
        if deliberate.contains(&name) {
            assert!(ours.is_err(), "{name}");
        } else {
            assert_eq!(ours.is_ok(), expected_ok, "{name}: {ours:?}");
        }
    }
}

/// Random values, schema-shaped or not, never panic the converter.
#[test]
fn no_panic_on_random_values() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const KEYS: &[&str] = &[
        "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
        "enum", "const", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "nullable", "not", "a", "",
    ];
    const STRS: &[&str] = &[
        "string", "integer", "number", "object", "array", "boolean", "null", "#", "#/$defs/a", "#/properties/a",
        "#/definitions/", "^[a-z]+$", "^(a|b)*$", "date", "uuid", "a", "", "^\\d{2,}$", "^(?:x)?[^\"]$", "kaboom",
    ];
    fn gen(rng: &mut impl FnMut() -> u64, depth: u32) -> Value {
        match rng() % if depth > 4 { 6 } else { 9 } {
            0 => Value::Null,
            1 => Value::Bool(rng() % 2 == 0),
            2 => json!((rng() % 40) as i64 - 10),
            3 => json!((rng() % 1000) as f64 / 7.0 - 50.0),
            4 | 5 => json!(STRS[(rng() % STRS.len() as u64) as usize]),
            6 => Value::Array((0..rng() % 4).map(|_| gen(rng, depth + 1)).collect()),
            _ => Value::Object(
                (0..rng() % 5).map(|_| (KEYS[(rng() % KEYS.len() as u64) as usize].to_string(), gen(rng, depth + 1))).collect(),
            ),
        }
    }
    let mut ok = 0;
    for _ in 0..600 {
        let v = gen(&mut rng, 0);
        if let Ok(g) = json_schema_to_grammar(&v) {
            ok += 1;
            // Whatever converts must also be a grammar our parser reads.
            let _ = Matcher::new(&g);
        }
    }
    assert!(ok > 10, "only {ok} random schemas converted");
}

/// llama.cpp's GBNF parser reads a `{m,n}` maximum above 2,000 as "no maximum" and
/// refuses a larger minimum: every count keyword stops at [`MAX_REPETITION`] with an
/// error naming it, and what is allowed converts into a grammar llama.cpp accepts.
#[test]
fn repetition_counts_stop_at_llama_cpp_limit() {
    assert_eq!(MAX_REPETITION, 2_000);
    for key in ["minLength", "maxLength"] {
        let e = err(json!({"type": "string", key: 2_001}));
        assert_eq!(e, SchemaError::LimitExceeded { what: format!("{key} 2001"), limit: 2_000, path: String::new() });
        assert_eq!(e.to_string(), format!("{key} 2001 exceeds the limit of 2000 at the schema root"));
    }
    for key in ["minItems", "maxItems"] {
        let e = err(json!({"type": "array", "items": {"type": "integer"}, key: 5_000}));
        assert_eq!(e, SchemaError::LimitExceeded { what: format!("{key} 5000"), limit: 2_000, path: String::new() });
    }
    let e = err(json!({"properties": {"s": {"type": "string", "pattern": "^a{2001}$"}}}));
    assert!(matches!(e, SchemaError::LimitExceeded { limit: 2_000, ref path, .. } if path == "/properties/s"), "{e:?}");
    assert!(matches!(err(json!({"type": "string", "pattern": "^a{1,2001}$"})), SchemaError::LimitExceeded { .. }));
    // A counted group expands to several llama.cpp rules: 4 × 1000 is over its limit.
    let e = err(json!({"type": "string", "pattern": "^(a{0,3}b){0,1000}$"}));
    assert!(matches!(e, SchemaError::LimitExceeded { ref what, .. } if what.contains("rules its group expands to")), "{e:?}");

    // At the limit everything converts and passes `finish`'s check of llama.cpp's count
    // (the repeated thing is always a single rule reference or terminal).
    for schema in [
        json!({"type": "string", "maxLength": 2_000}),
        json!({"type": "string", "minLength": 2_000, "maxLength": 2_000}),
        json!({"type": "array", "items": {"type": "integer"}, "maxItems": 2_000}),
        json!({"type": "array", "items": {"type": "integer"}, "minItems": 2_000}),
        json!({"type": "array", "items": {"type": "integer"}, "minItems": 1_000, "maxItems": 2_000}),
        json!({"type": "array", "prefixItems": [{"type": "string"}, {"type": "null"}], "items": {"type": "integer"}, "maxItems": 2_000}),
        json!({"type": "array", "items": {"$ref": "#/$defs/x"}, "maxItems": 2_000, "$defs": {"x": {"type": "object", "properties": {"a": {"type": "integer"}}}}}),
        json!({"type": "string", "pattern": "^(ab|c){0,2000}[a-z]{2000}$"}),
    ] {
        grammar(schema);
    }
    check(json!({"type": "array", "items": {"type": "integer"}, "maxItems": 3}), &["[]", "[1]", "[1, 2, 3]"], &["[1,2,3,4]", "[,]"]);
    check(json!({"prefixItems": [{"const": 0}], "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}), &["[0,1]", "[0,1,2]"], &["[0]", "[0,1,2,3]"]);

    // The same check guards hand-written rules: a group meeting two new names repeated
    // 1,500 times is 3,000 llama.cpp rules; a count over 2,000 would silently unbound.
    for body in ["(x y){0,1500}", "x{0,2001}", "x{2001,}"] {
        let mut c = SchemaConverter::new();
        c.add_rule("root", body);
        c.add_rule("x", "\"x\"");
        c.add_rule("y", "\"y\"");
        assert!(matches!(c.finish(), Err(SchemaError::LimitExceeded { .. })), "{body}");
    }
    let mut c = SchemaConverter::new();
    c.add_rule("root", "x y (x y){0,1000}");
    c.add_rule("x", "\"x\"");
    c.add_rule("y", "\"y\"");
    c.finish().unwrap();
}

/// Converts `schema`, which must complete (no duration asserted: an exponential walk
/// simply never returns). Any typed result is fine here; callers say which they expect.
fn finishes(schema: &Value) -> Result<String, SchemaError> {
    json_schema_to_grammar(schema)
}

/// A grammar, or one of the limit errors (a count, the work budget, the grammar size).
fn ok_or_limit(schema: Value) {
    match finishes(&schema) {
        Ok(_) | Err(SchemaError::LimitExceeded { .. } | SchemaError::TooLarge { .. }) => {}
        Err(e) => panic!("{e:?}"),
    }
}

/// Shapes whose conversion work was exponential or quadratic in their size.
#[test]
fn adversarial_shapes_finish() {
    // A $defs entry whose allOf holds three $refs to itself: 3^32 `kinds` steps before.
    let e = finishes(&json!({"$ref": "#/$defs/a", "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}]}}}));
    assert!(e.is_err(), "{e:?}");
    // The same next to a `type` (which makes the converter ask `kinds`), and via anyOf.
    let e = finishes(&json!({"type": "object", "$ref": "#/$defs/a", "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}]}}}));
    assert!(e.is_err(), "{e:?}");
    let e = finishes(&json!({"type": "object", "$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}, {"type": "null"}]}}}));
    assert!(e.is_err(), "{e:?}");

    // A chain of 31 $defs, each an anyOf of two $refs to the next (2^31 before).
    let mut defs = serde_json::Map::new();
    for i in 0..31 {
        let next = format!("#/$defs/d{}", i + 1);
        defs.insert(format!("d{i}"), json!({"anyOf": [{"$ref": next}, {"$ref": next}]}));
    }
    defs.insert("d31".into(), json!({"type": "integer"}));
    let s = json!({"type": "integer", "$ref": "#/$defs/d0", "$defs": defs});
    check(s, &["12"], &["\"a\""]);

    // anyOf fan-out chains: ten $refs to the next, 25 levels deep (each two of MAX_DEPTH),
    // with types to check (10^25 before).
    let mut defs = serde_json::Map::new();
    for i in 0..25 {
        let next = format!("#/$defs/d{}", i + 1);
        defs.insert(format!("d{i}"), json!({"type": "array", "anyOf": vec![json!({"$ref": next}); 10]}));
    }
    defs.insert("d25".into(), json!({"type": "array", "items": {"type": "integer"}, "maxItems": 2}));
    check(json!({"$ref": "#/$defs/d0", "$defs": defs}), &["[1, 2]"], &["[1,2,3]"]);

    // Deep allOf of refs: each level's object has two properties merging the next level
    // (2^levels merges, each making rules): stops at a limit.
    let mut defs = serde_json::Map::new();
    for i in 0..40 {
        let next = json!({"allOf": [{"$ref": format!("#/$defs/d{}", i + 1)}, {"properties": {"n": {"type": "null"}}}]});
        defs.insert(format!("d{i}"), json!({"properties": {"x": next.clone(), "y": next}}));
    }
    defs.insert("d40".into(), json!({"properties": {"z": {"type": "integer"}}}));
    ok_or_limit(json!({"allOf": [{"$ref": "#/$defs/d0"}, {"required": []}], "$defs": defs}));

    // One allOf with many $refs to the same object and enum components: each merged once.
    let comps: Vec<Value> = (0..5_000).map(|i| json!({"$ref": format!("#/$defs/{}", if i % 2 == 0 { "o" } else { "p" })})).collect();
    let big: serde_json::Map<String, Value> = (0..1_000).map(|i| (format!("k{i}"), json!({"type": "integer"}))).collect();
    let s = json!({"allOf": comps, "$defs": {"o": {"properties": big.clone()}, "p": {"properties": big}}});
    grammar(s);
    let wide: Vec<u32> = (0..10_000).collect();
    let comps: Vec<Value> = (0..5_000).map(|_| json!({"$ref": "#/$defs/e"})).collect();
    check(json!({"allOf": comps, "$defs": {"e": {"enum": wide}}}), &["9999"], &["10000"]);
    // A wide enum inside allOf, merged again under many properties: each merge pays for
    // the values it reads (500 × 10,000 of them exhaust MAX_WORK; smaller here so the
    // debug-build suite stays fast).
    let wide: Vec<u32> = (0..2_000).collect();
    let props: serde_json::Map<String, Value> =
        (0..40).map(|i| (format!("p{i}"), json!({"allOf": [{"$ref": "#/$defs/e"}, {"$ref": "#/$defs/f"}]}))).collect();
    check(json!({"properties": props, "$defs": {"e": {"enum": wide}, "f": {"enum": [0, 1]}}}), &[r#"{"p0": 1}"#], &[r#"{"p0": 2}"#]);
    // Visits whose pointers and rule names are long pay for them: a 100 kB property name
    // above an anyOf of 1,000 alternatives is ~3,000 steps per alternative visited.
    let alts = vec![json!({"type": "null"}); 1_000];
    let e = err(json!({"properties": {"n".repeat(100_000): {"anyOf": alts}}}));
    assert!(matches!(e, SchemaError::LimitExceeded { limit: MAX_WORK, .. }), "{e:?}");
    assert!(e.to_string().contains("work needed to convert the schema"), "{e}");

    // `nullable` and type lists at every level used to deep-clone the subtree per level.
    let mut s = json!({"type": "integer"});
    for _ in 0..15 {
        s = json!({"type": ["array", "null"], "nullable": true, "items": s, "description": "x".repeat(1_000)});
    }
    grammar(s);

    // Long property names: the key trie is refused before it is rendered.
    let props: serde_json::Map<String, Value> = (0..300).map(|i| (format!("{i}{}", "n".repeat(1_000)), json!({"type": "null"}))).collect();
    let e = err(json!({"properties": props, "additionalProperties": {"type": "integer"}}));
    assert!(matches!(e, SchemaError::TooLarge { .. }), "{e:?}");
}
