//! The one error type of the crate. Messages are written for the API user who sent the
//! schema: they name the keyword and the JSON pointer inside *their* schema.

/// Why a schema could not be turned into a grammar.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SchemaError {
    /// A keyword that constrains documents but that this converter cannot honour.
    /// It is never ignored: a grammar that silently accepted more than the schema would
    /// let the model produce documents the caller's validator then rejects.
    #[error("unsupported schema keyword '{keyword}' at {}", at(path))]
    Unsupported { keyword: String, path: String },
    /// The schema is malformed (wrong value type, empty enum, min above max, bad regex...).
    #[error("invalid schema at {}: {reason}", at(path))]
    Invalid { path: String, reason: String },
    /// The schema (or a `$ref` chain, or a `const` value) nests deeper than `limit` levels.
    #[error("schema nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// The generated grammar would be larger than `limit` bytes.
    #[error("generated grammar exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// A count in the schema (repetitions, enum values, properties, rules...) is above a limit.
    #[error("{what} exceeds the limit of {limit} at {}", at(path))]
    LimitExceeded { what: String, limit: usize, path: String },
    /// A rule can never finish: every derivation of it recurses forever (a `$ref` cycle
    /// with no alternative, or an object requiring a property of its own type).
    #[error("schema has no finite instance: rule '{rule}' recurses with no base case")]
    NoBaseCase { rule: String },
    /// A rule can reach itself without consuming input; llama.cpp's grammar engine
    /// rejects such grammars.
    #[error("grammar is left-recursive through rule '{rule}'")]
    LeftRecursion { rule: String },
    /// A `$ref` that does not point at anything in the schema.
    #[error("unresolved $ref '{reference}'")]
    UnresolvedRef { reference: String },
    /// A rule body (from [`SchemaConverter::add_rule`](crate::SchemaConverter::add_rule))
    /// is not valid GBNF, or refers to a rule that does not exist.
    #[error("invalid grammar rule '{rule}': {reason}")]
    InvalidRule { rule: String, reason: String },
    /// [`SchemaConverter::finish`](crate::SchemaConverter::finish) was called with no `root` rule.
    #[error("grammar has no 'root' rule")]
    MissingRoot,
}

/// A JSON pointer as the user reads it: the empty pointer is the whole schema.
fn at(path: &str) -> &str {
    if path.is_empty() {
        "the schema root"
    } else {
        path
    }
}
