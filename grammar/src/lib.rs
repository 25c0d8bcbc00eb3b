//! JSON Schema → GBNF, the grammar format of llama.cpp's constrained sampler.
//!
//! The job: turn a schema that arrived over HTTP (so: hostile) into a grammar that accepts
//! only documents the schema accepts, or fail with a [`SchemaError`] that tells the API
//! user which keyword at which JSON pointer is the problem. It must never panic, recurse
//! without bound, or ignore a constraint it cannot honour.
//!
//! The yardstick is llama.cpp's `common/json-schema-to-grammar.cpp`: rule names and
//! structure follow it (whitespace goes *before* separators, `root ::= ...`, shared
//! primitives `space`, `string`, `value`, ...), so grammars are easy to compare.
//!
//! ```
//! let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"]});
//! let grammar = llama_grammar::json_schema_to_grammar(&schema).unwrap();
//! assert!(grammar.contains("root ::= "));
//! ```
//!
//! # What is supported
//! `type` (also arrays of types), `properties`, `required`, `additionalProperties`
//! (absent means: no extra keys when `properties` is given, any keys otherwise — as in
//! llama.cpp), `items`, `prefixItems`, `minItems`, `maxItems`, `enum`, `const`,
//! `minLength`, `maxLength`, `pattern` (subset below), `format` (`date`, `time`,
//! `date-time`, `uuid`), integer `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`
//! (|bound| < 10^15), `anyOf`, `oneOf` (read as `anyOf`), `allOf` (one component, or
//! object components merged, or enum components intersected), `$ref` to `#`, `#/$defs/..`,
//! `#/definitions/..` or any local JSON pointer (cycles become recursive rules), `{}` and
//! `true` (any JSON value), and OpenAPI's `nullable: true` (adds `null`).
//! As in llama.cpp, a lone non-array `prefixItems` is read as the item schema. Property
//! order is the schema's (the crate turns on serde_json's `preserve_order`).
//!
//! Annotations are accepted and ignored: `title`, `description`, `$schema`, `$id`,
//! `$anchor`, `$comment`, `default`, `examples`, `example`, `deprecated`, `readOnly`,
//! `writeOnly`, `$defs`/`definitions` (only read through `$ref`), `strict`,
//! `discriminator` (the `oneOf` branches already constrain the tag), `content*`, `x-*`.
//! A keyword of another type's vocabulary is ignored when `type` excludes that type
//! (`{"type": "integer", "minLength": 3}`), as JSON Schema says. `uniqueItems: false`
//! and integer `multipleOf: 1` constrain nothing and are accepted.
//!
//! `pattern`: must be anchored `^...$`; literals, `.`, classes `[...]`/`[^...]`, `\d \w \s`,
//! escapes `\t \n \r \f \v \0 \xHH \uHHHH \<punct>`, groups `(...)`/`(?:...)`, `|`,
//! `* + ? {n} {n,} {n,m}` (lazy forms too).
//!
//! # Narrower than the schema, on purpose (accepted documents still validate)
//! Properties come in schema order, required first; `prefixItems` tuples are complete;
//! `oneOf` is `anyOf`; strings use one JSON spelling per character (`\n`, not `\u000a`),
//! and negated classes / `.` don't produce rare escapes; extra object keys are written
//! without escapes; integers have at most 16 digits, numbers llama.cpp's number shape.
//!
//! # Deliberate differences from llama.cpp (it ignores these silently; we fail)
//! An error [`SchemaError::Unsupported`] for: `not`, `if`/`then`/`else`, `contains`,
//! `uniqueItems: true`, `patternProperties`, `propertyNames`, `dependentRequired`,
//! `dependentSchemas`, `minProperties`/`maxProperties`, `unevaluated*`, `multipleOf`
//! (other than integer 1), bounds on `number`, unknown `format`s (`email`, `uri`, ...),
//! unanchored or out-of-subset `pattern`s (llama.cpp falls back to any string), a `pattern`
//! or `format` combined with a length, `enum`/`const` next to other constraints,
//! constraint keywords next to `$ref`/`anyOf` (other than a compatible `type`), unknown
//! keywords, remote `$ref`. `required` keys missing from `properties` are honoured
//! (llama.cpp drops them). Also: `nullable: true` is honoured; `$ref` cycles without a
//! base case, left recursion and dangling rules are errors at [`SchemaConverter::finish`].

mod converter;
mod error;
mod gbnf;
mod numbers;
mod pattern;

#[cfg(test)]
mod matcher;
#[cfg(test)]
mod tests;

pub use converter::SchemaConverter;
pub use error::SchemaError;

/// Deepest schema nesting (also bounds `$ref` chains and `const` values).
pub const MAX_DEPTH: usize = 64;
/// Largest grammar text, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 1 << 20;
/// Largest `minLength`/`maxLength`/`minItems`/`maxItems`/regex `{n,m}` count: llama.cpp's
/// largest repetition (a larger GBNF maximum would silently become unbounded, and
/// `Grammar::validate` refuses it), so a schema over it is a schema error naming the limit.
pub const MAX_REPETITION: usize = 2_000;
/// Largest sum of repetition counts over a grammar (llama.cpp expands each `x{n,m}`).
pub const MAX_TOTAL_REPETITION: usize = 200_000;
/// Most values in one `enum` (and components of `anyOf`/`allOf`, members of `type`).
pub const MAX_ENUM: usize = 10_000;
/// Most properties in one object schema.
pub const MAX_PROPERTIES: usize = 2_000;
/// Most rules in one grammar.
pub const MAX_RULES: usize = 10_000;

/// Whole schema → grammar whose `root` rule matches it.
pub fn json_schema_to_grammar(schema: &serde_json::Value) -> Result<String, SchemaError> {
    let mut c = SchemaConverter::new();
    c.add_schema("root", schema)?;
    c.finish()
}

/// Grammar for any JSON object (`--json`, `response_format: json_object`).
pub fn json_object_grammar() -> String {
    let mut c = SchemaConverter::new();
    c.add_schema("root", &serde_json::json!({"type": "object"})).expect("the object schema converts");
    c.finish().expect("the object grammar is well formed")
}

/// A GBNF string literal matching exactly `s` (quotes and escapes), e.g. for tool names.
pub fn gbnf_literal(s: &str) -> String {
    gbnf_literal_of(s)
}

pub(crate) fn gbnf_literal_of(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Raw control characters (NUL above all: the grammar travels as a C string).
            c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One character inside a GBNF `[...]` class, escaped where the GBNF parser would read
/// it as syntax.
pub(crate) fn class_char(c: char) -> String {
    match c {
        ']' | '\\' | '-' | '"' | '[' => format!("\\{c}"),
        '^' => "\\x5E".into(),
        c if c < ' ' || c == '\u{7f}' => format!("\\x{:02X}", c as u32),
        c => c.to_string(),
    }
}
