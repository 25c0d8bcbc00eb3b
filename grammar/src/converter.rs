//! The schema walk. Each schema becomes a GBNF expression; named rules are shared through
//! `SchemaConverter::rules`. `$ref`s become rule references (reserved before their target
//! is visited, so cycles close on themselves); every nested visit counts towards
//! [`MAX_DEPTH`], which also bounds `$ref` chains.
//!
//! Work is bounded too, since depth alone is not: a node reachable along many paths was
//! walked once per path (3^32 steps for a `$defs` entry whose `allOf` refers to itself
//! three times). `$ref` targets are converted and resolved once per document, `kinds` is
//! memoized per node, an `allOf` merges each component once, and everything else that
//! repeats is charged to [`MAX_WORK`](crate::MAX_WORK).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};

use crate::numbers::{int_range, MAX_ABS_BOUND};
use crate::pattern::{pattern_to_gbnf, PatternError};
use crate::{gbnf, gbnf_literal_of, SchemaError};
use crate::{MAX_DEPTH, MAX_ENUM, MAX_GRAMMAR_BYTES, MAX_PROPERTIES, MAX_REPETITION, MAX_RULES, MAX_TOTAL_REPETITION, MAX_WORK};

const SPACE_RULE: &str = r#"| " " | "\n"{1,2} [ \t]{0,20}"#;

/// Shared rules: (name, body, rules it needs).
const PRIMITIVES: &[(&str, &str, &[&str])] = &[
    ("boolean", r#"("true" | "false")"#, &[]),
    ("decimal-part", "[0-9]{1,16}", &[]),
    ("integral-part", "[0] | [1-9] [0-9]{0,15}", &[]),
    ("number", r#"("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?"#, &["integral-part", "decimal-part"]),
    ("integer", r#"("-"? integral-part)"#, &["integral-part"]),
    ("value", "object | array | string | number | boolean | null", &["object", "array", "string", "number", "boolean", "null"]),
    ("object", r#""{" space ( string ":" space value ("," space string ":" space value)* )? space "}""#, &["string", "value"]),
    ("array", r#""[" space ( value ("," space value)* )? space "]""#, &["value"]),
    ("uuid", r#""\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12} "\"""#, &[]),
    ("char", r#"[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})"#, &[]),
    ("string", r#""\"" char* "\"""#, &["char"]),
    ("null", r#""null""#, &[]),
    // A character of an object key that needs no escape (see `not_strings`).
    ("key-char", r#"[^"\\\x7F\x00-\x1F]"#, &[]),
    ("date", r#"[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )"#, &[]),
    ("time", r#"([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? ( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )"#, &[]),
    ("date-time", r#"date "T" time"#, &["date", "time"]),
    ("date-string", r#""\"" date "\"""#, &["date"]),
    ("time-string", r#""\"" time "\"""#, &["time"]),
    ("date-time-string", r#""\"" date-time "\"""#, &["date-time"]),
];

fn is_reserved(name: &str) -> bool {
    name == "root" || name == "space" || PRIMITIVES.iter().any(|p| p.0 == name)
}

/// Keywords that never constrain a document.
const ANNOTATIONS: &[&str] = &[
    "title", "description", "$schema", "$id", "$anchor", "$comment", "default", "examples", "example",
    "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "strict", "discriminator", "nullable",
    "contentEncoding", "contentMediaType", "contentSchema",
];

// Value types as bits, so a `type` list is a set.
const NULL: u8 = 1;
const BOOL: u8 = 2;
const INT: u8 = 4;
/// Numbers that are not integers; "number" is `INT | FRAC`.
const FRAC: u8 = 8;
const STR: u8 = 16;
const ARR: u8 = 32;
const OBJ: u8 = 64;

fn type_bits(name: &str) -> Option<u8> {
    Some(match name {
        "null" => NULL,
        "boolean" => BOOL,
        "integer" => INT,
        "number" => INT | FRAC,
        "string" => STR,
        "array" => ARR,
        "object" => OBJ,
        _ => return None,
    })
}

/// The type a keyword's vocabulary applies to (0: applies to every type).
fn vocabulary(key: &str) -> u8 {
    match key {
        "minLength" | "maxLength" | "pattern" | "format" => STR,
        "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" | "multipleOf" => INT | FRAC,
        "items" | "prefixItems" | "minItems" | "maxItems" | "uniqueItems" | "contains" | "minContains"
        | "maxContains" | "additionalItems" | "unevaluatedItems" => ARR,
        "properties" | "required" | "additionalProperties" | "patternProperties" | "minProperties"
        | "maxProperties" | "propertyNames" | "dependentRequired" | "dependentSchemas" | "dependencies"
        | "unevaluatedProperties" => OBJ,
        _ => 0,
    }
}

fn value_bits(v: &Value) -> u8 {
    match v {
        Value::Null => NULL,
        Value::Bool(_) => BOOL,
        Value::Number(n) if n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0) => INT,
        Value::Number(_) => FRAC,
        Value::String(_) => STR,
        Value::Array(_) => ARR,
        Value::Object(_) => OBJ,
    }
}

/// Nesting depth of a JSON value, measured without recursion (serializing a value that
/// nests too deeply would overflow the stack).
fn value_depth_exceeds(v: &Value, limit: usize) -> bool {
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        if d > limit {
            return true;
        }
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    false
}

fn push(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn sub_name(name: &str, part: &str) -> String {
    if part.is_empty() {
        // An empty property name must not name the rule "" (that is the root's name).
        return sub_name(name, "empty");
    }
    if name.is_empty() {
        part.to_string()
    } else {
        format!("{name}-{part}")
    }
}

/// Rule names are `[a-zA-Z0-9-]+`: every other run of characters becomes one `-`.
fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_run = false;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('-');
            in_run = true;
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

fn unsupported(keyword: &str, path: &str) -> SchemaError {
    SchemaError::Unsupported { keyword: keyword.to_string(), path: path.to_string() }
}

fn invalid(path: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid { path: path.to_string(), reason: reason.into() }
}

/// `item` repeated `min..=max` times (`max == None`: unbounded). `item` must be a single
/// rule reference or terminal: llama.cpp refuses `x{m,n}` when the rules `x` expands to
/// times the count exceed its threshold (see [`MAX_REPETITION`]), and counts here go up
/// to that threshold.
fn repetition(item: &str, min: usize, max: Option<usize>) -> String {
    match (min, max) {
        (_, Some(0)) => String::new(),
        (1, Some(1)) => item.to_string(),
        (0, Some(1)) => format!("{item}?"),
        (1, None) => format!("{item}+"),
        (0, None) => format!("{item}*"),
        (m, None) => format!("{item}{{{m},}}"),
        (m, Some(n)) if m == n => format!("{item}{{{m}}}"),
        (m, Some(n)) => format!("{item}{{{m},{n}}}"),
    }
}

/// Builds a grammar from schemas and hand-written rules; see the crate docs.
#[derive(Debug, Clone)]
pub struct SchemaConverter {
    rules: BTreeMap<String, String>,
    bytes: usize,
    pending: usize,
    /// An error from `add_rule`, which cannot fail by signature; reported by `finish`.
    deferred: Option<SchemaError>,
    /// Base name → first digit suffix not yet tried, so that many rules with one base
    /// name cost linear, not quadratic, probing in `add`.
    next_suffix: HashMap<String, usize>,
}

impl Default for SchemaConverter {
    fn default() -> Self {
        Self::new()
    }
}

/// A schema's grammar: an existing rule's name, or a body still to be named.
enum Expr {
    Rule(String),
    Body(String),
}

/// How `object_body` reads a schema object (see there).
#[derive(Clone, Copy, PartialEq, Eq)]
enum View<'v> {
    Whole,
    /// As if `nullable` were absent (it has been handled).
    NotNullable,
    /// As if `type` were this one type name (and `nullable` absent).
    OneType(&'v str),
}

enum Additional<'v> {
    None,
    Any,
    Schema(&'v Value, String),
}

static ANY_SCHEMA: Value = Value::Bool(true);

impl SchemaConverter {
    pub fn new() -> Self {
        let mut rules = BTreeMap::new();
        rules.insert("space".to_string(), SPACE_RULE.to_string());
        SchemaConverter { rules, bytes: SPACE_RULE.len() + 10, pending: 0, deferred: None, next_suffix: HashMap::new() }
    }

    /// Converts `schema` (its own `$defs` resolve against it) and adds its rules; returns
    /// the name of the rule matching it. Rule names derive from `name_hint`, made unique;
    /// the hint `"root"` gives the `root` rule.
    pub fn add_schema(&mut self, name_hint: &str, schema: &serde_json::Value) -> Result<String, SchemaError> {
        let name = if name_hint == "root" { "" } else { name_hint };
        let mut v = Visitor {
            conv: self,
            root: schema,
            refs: HashMap::new(),
            resolved: HashMap::new(),
            kinds_memo: HashMap::new(),
            work: 0,
        };
        let rule = v.visit(schema, name, "", 0)?;
        if name.is_empty() && rule != "root" {
            // A primitive answered with its shared rule: give the root its own.
            return self.add("root", &rule);
        }
        Ok(rule)
    }

    /// Adds a rule with this GBNF body under a unique name derived from `name` (`"root"`
    /// stays `"root"` if free; names of shared primitives get a `-` suffix); returns the
    /// name used. The body is checked by [`finish`](Self::finish).
    pub fn add_rule(&mut self, name: &str, body: &str) -> String {
        let name = if name != "root" && is_reserved(name) { format!("{name}-") } else { name.to_string() };
        match self.add(&name, body) {
            Ok(n) => n,
            Err(e) => {
                self.deferred.get_or_insert(e);
                escape_name(&name)
            }
        }
    }

    /// The grammar text (every rule, shared primitives included), checked: size, rule
    /// count, repetition budget, valid bodies, no dangling references, a base case for
    /// every rule, no left recursion. Requires a `root` rule.
    pub fn finish(self) -> Result<String, SchemaError> {
        if let Some(e) = self.deferred {
            return Err(e);
        }
        if !self.rules.contains_key("root") {
            return Err(SchemaError::MissingRoot);
        }
        let mut parsed = BTreeMap::new();
        for (name, body) in &self.rules {
            let alts = gbnf::parse_body(body).map_err(|reason| SchemaError::InvalidRule { rule: name.clone(), reason })?;
            parsed.insert(name.clone(), alts);
        }
        let a = gbnf::analyse(&parsed);
        if let Some((rule, missing)) = a.dangling {
            return Err(SchemaError::InvalidRule { rule, reason: format!("refers to undefined rule '{missing}'") });
        }
        if a.repetition_total > MAX_TOTAL_REPETITION as u64 {
            return Err(SchemaError::LimitExceeded {
                what: "total repetition count of the grammar".into(),
                limit: MAX_TOTAL_REPETITION,
                path: String::new(),
            });
        }
        if let Some(rule) = a.over_repetition {
            return Err(SchemaError::LimitExceeded {
                what: format!("a repetition in rule '{rule}' (its count times the rules it repeats, as llama.cpp counts them)"),
                limit: MAX_REPETITION,
                path: String::new(),
            });
        }
        if let Some(rule) = a.unproductive {
            return Err(SchemaError::NoBaseCase { rule });
        }
        if let Some(rule) = a.left_recursive {
            return Err(SchemaError::LeftRecursion { rule });
        }
        let mut out = String::with_capacity(self.bytes);
        for (name, body) in &self.rules {
            out.push_str(name);
            out.push_str(" ::= ");
            out.push_str(body);
            out.push('\n');
        }
        if out.len() > MAX_GRAMMAR_BYTES {
            return Err(SchemaError::TooLarge { limit: MAX_GRAMMAR_BYTES });
        }
        Ok(out)
    }

    fn account(&mut self, name: &str, body: &str) -> Result<(), SchemaError> {
        self.bytes += name.len() + body.len() + 6;
        if self.bytes > MAX_GRAMMAR_BYTES {
            return Err(SchemaError::TooLarge { limit: MAX_GRAMMAR_BYTES });
        }
        if self.rules.len() >= MAX_RULES {
            return Err(SchemaError::LimitExceeded { what: "number of grammar rules".into(), limit: MAX_RULES, path: String::new() });
        }
        Ok(())
    }

    /// Adds a rule; a name already holding the same body is reused (as llama.cpp does),
    /// otherwise a digit suffix makes it unique.
    fn add(&mut self, name: &str, body: &str) -> Result<String, SchemaError> {
        let base = escape_name(name);
        let mut key = base.clone();
        match self.rules.get(&key) {
            None => {}
            Some(existing) if existing == body => return Ok(key),
            Some(_) => {
                // Suffixes below `next_suffix` were taken when last tried: start after them
                // (such a rule is then not reused even if its body matches: only a smaller
                // grammar is lost, and probing stays linear over all `add`s).
                let i = self.next_suffix.entry(base.clone()).or_insert(0);
                loop {
                    key = format!("{base}{i}");
                    *i += 1;
                    match self.rules.get(&key) {
                        None => break,
                        Some(existing) if existing == body => return Ok(key),
                        Some(_) => {}
                    }
                }
            }
        }
        self.account(&key, body)?;
        self.rules.insert(key.clone(), body.to_string());
        Ok(key)
    }

    /// Takes a fresh name whose body comes later (for `$ref` targets, which may refer to
    /// themselves). The placeholder never equals a real body, so nothing reuses it.
    fn reserve(&mut self, name: &str) -> Result<String, SchemaError> {
        self.pending += 1;
        let placeholder = format!("\0pending{}", self.pending);
        self.add(name, &placeholder)
    }

    fn set(&mut self, name: &str, body: String) -> Result<(), SchemaError> {
        self.account(name, &body)?;
        self.rules.insert(name.to_string(), body);
        Ok(())
    }

    fn primitive(&mut self, name: &str) -> Result<String, SchemaError> {
        let mut todo = vec![name];
        let mut first = None;
        while let Some(n) = todo.pop() {
            let Some(&(_, body, deps)) = PRIMITIVES.iter().find(|p| p.0 == n) else { continue };
            let used = self.add(n, body)?;
            first.get_or_insert(used);
            todo.extend(deps.iter().filter(|d| !self.rules.contains_key(**d)));
        }
        Ok(first.unwrap_or_else(|| name.to_string()))
    }
}

/// Identity of a schema node inside the document: every schema the visitor sees is
/// borrowed from `root` (or is the static `true`) for the visitor's whole life, so an
/// address names one node and memo keys can't be reused by another value.
fn node_id<T>(v: &T) -> usize {
    v as *const T as usize
}

struct Visitor<'c, 'v> {
    conv: &'c mut SchemaConverter,
    root: &'v Value,
    /// `$ref` target node → its rule, for this document: every reference to one target
    /// shares one rule, whose body is converted once.
    refs: HashMap<usize, String>,
    /// `$ref` string node → its target and JSON pointer, so each reference string is
    /// parsed (and paid for) once however often it is reached.
    resolved: HashMap<usize, (&'v Value, String)>,
    /// Schema node → `kinds` of it. Without it, `kinds` followed every `$ref`/`anyOf`/
    /// `allOf` branch again each time: exponential on a `$defs` entry holding three `$ref`s
    /// to itself. A node being computed reads as `None` ("any"), which only widens the
    /// answer: `type_fits` then honours fewer `type`s, never too many.
    kinds_memo: HashMap<usize, Option<u8>>,
    /// Steps taken so far, against [`MAX_WORK`].
    work: usize,
}

impl<'v> Visitor<'_, 'v> {
    /// Counts `units` steps of work; fails once the conversion has done [`MAX_WORK`].
    fn charge(&mut self, units: usize) -> Result<(), SchemaError> {
        self.work = self.work.saturating_add(units);
        if self.work > MAX_WORK {
            return Err(SchemaError::LimitExceeded {
                what: "work needed to convert the schema (it reaches the same subschemas through too many $ref/allOf/anyOf paths, or is too large)".into(),
                limit: MAX_WORK,
                path: String::new(),
            });
        }
        Ok(())
    }

    fn visit(&mut self, schema: &'v Value, name: &str, path: &str, depth: usize) -> Result<String, SchemaError> {
        let e = self.body(schema, name, path, depth)?;
        self.named(e, name)
    }

    /// The rule for an expression: its own when it already is one, else a new rule.
    fn named(&mut self, e: Expr, name: &str) -> Result<String, SchemaError> {
        match e {
            Expr::Rule(r) => Ok(r),
            Expr::Body(b) => {
                let rule_name = if name.is_empty() {
                    "root".to_string()
                } else if is_reserved(name) {
                    format!("{name}-")
                } else {
                    name.to_string()
                };
                self.conv.add(&rule_name, &b)
            }
        }
    }

    /// The target of a `$ref` string node (memoized by node, see `resolved`).
    fn resolve(&mut self, reference: &'v String, path: &str) -> Result<(&'v Value, String), SchemaError> {
        if let Some((t, p)) = self.resolved.get(&node_id(reference)) {
            return Ok((*t, p.clone()));
        }
        self.charge(1 + reference.len() / 64)?;
        let (t, p) = self.resolve_uncached(reference, path)?;
        self.resolved.insert(node_id(reference), (t, p.clone()));
        Ok((t, p))
    }

    fn resolve_uncached(&self, reference: &str, path: &str) -> Result<(&'v Value, String), SchemaError> {
        let Some(fragment) = reference.strip_prefix('#') else {
            return Err(unsupported("$ref", path));
        };
        if fragment.is_empty() {
            return Ok((self.root, String::new()));
        }
        let Some(pointer) = fragment.strip_prefix('/') else {
            // `#anchor` names: not supported.
            return Err(unsupported("$ref", path));
        };
        let mut target = self.root;
        for token in pointer.split('/') {
            let token = token.replace("~1", "/").replace("~0", "~");
            target = match target {
                Value::Object(o) => o.get(&token),
                Value::Array(a) => token.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            }
            .ok_or_else(|| SchemaError::UnresolvedRef { reference: reference.to_string() })?;
        }
        Ok((target, fragment.to_string()))
    }

    fn visit_ref(&mut self, reference: &'v String, path: &str, depth: usize) -> Result<String, SchemaError> {
        let (target, target_path) = self.resolve(reference, path)?;
        if let Some(rule) = self.refs.get(&node_id(target)) {
            return Ok(rule.clone());
        }
        let name = self.conv.reserve(&format!("ref{}", escape_name(&target_path)))?;
        self.refs.insert(node_id(target), name.clone());
        let body = match self.body(target, &name, &target_path, depth + 1)? {
            Expr::Rule(r) | Expr::Body(r) => r,
        };
        self.conv.set(&name, body)?;
        Ok(name)
    }

    /// The value types a schema can produce (`None`: can't tell / any), to check that a
    /// `type` next to `$ref`/`anyOf`/`allOf` constrains nothing more.
    /// Memoized per node (see `kinds_memo`), so each node is computed once per document;
    /// the steps are charged to the work budget.
    fn kinds(&mut self, schema: &'v Value, depth: usize) -> Result<Option<u8>, SchemaError> {
        if depth > MAX_DEPTH {
            return Ok(None);
        }
        if let Some(k) = self.kinds_memo.get(&node_id(schema)) {
            return Ok(*k);
        }
        self.charge(1)?;
        // In progress: a cycle back to this node reads "any".
        self.kinds_memo.insert(node_id(schema), None);
        let k = self.kinds_uncached(schema, depth)?;
        self.kinds_memo.insert(node_id(schema), k);
        Ok(k)
    }

    fn kinds_uncached(&mut self, schema: &'v Value, depth: usize) -> Result<Option<u8>, SchemaError> {
        let Some(o) = schema.as_object() else { return Ok(None) };
        if let Some(Value::String(r)) = o.get("$ref") {
            let Ok((t, _)) = self.resolve(r, "") else { return Ok(None) };
            return self.kinds(t, depth + 1);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(Value::Array(alts)) = o.get(key) {
                let mut bits = 0;
                for a in alts {
                    match self.kinds(a, depth + 1)? {
                        Some(k) => bits |= k,
                        None => return Ok(None),
                    }
                }
                return Ok(Some(bits));
            }
        }
        self.kinds_local(o, depth)
    }

    fn kinds_local(&mut self, o: &'v Map<String, Value>, depth: usize) -> Result<Option<u8>, SchemaError> {
        if let Some(t) = o.get("type") {
            return Ok(match t {
                Value::String(s) => type_bits(s),
                Value::Array(ts) => {
                    self.charge(ts.len())?;
                    ts.iter().try_fold(0, |acc, t| Some(acc | type_bits(t.as_str()?)?))
                }
                _ => None,
            });
        }
        if let Some(c) = o.get("const") {
            return Ok(Some(value_bits(c)));
        }
        if let Some(Value::Array(vs)) = o.get("enum") {
            self.charge(vs.len())?;
            return Ok(Some(vs.iter().fold(0, |acc, v| acc | value_bits(v))));
        }
        if let Some(Value::Array(comps)) = o.get("allOf") {
            let mut bits = 0x7f;
            for c in comps {
                if let Some(k) = self.kinds(c, depth + 1)? {
                    bits &= k;
                }
            }
            return Ok(Some(bits));
        }
        if has_properties(o) {
            return Ok(Some(OBJ));
        }
        Ok(None)
    }

    /// Fails on the first keyword that is neither an annotation, nor in `honoured`, nor
    /// vacuous because the declared types (`types`) exclude its vocabulary.
    fn check_keywords(o: &Map<String, Value>, path: &str, honoured: &[&str], types: Option<u8>) -> Result<(), SchemaError> {
        for (key, value) in o {
            if ANNOTATIONS.contains(&key.as_str()) || key.starts_with("x-") || honoured.contains(&key.as_str()) {
                continue;
            }
            if key == "uniqueItems" && value == &Value::Bool(false) {
                continue;
            }
            let v = vocabulary(key);
            if v != 0 && types.is_some_and(|t| t & v == 0) {
                continue;
            }
            return Err(unsupported(key, path));
        }
        Ok(())
    }

    fn body(&mut self, schema: &'v Value, name: &str, path: &str, depth: usize) -> Result<Expr, SchemaError> {
        let o = match schema {
            Value::Bool(true) => return Ok(Expr::Rule(self.conv.primitive("value")?)),
            Value::Bool(false) => return Err(invalid(path, "the schema `false` accepts no value")),
            Value::Object(o) => o,
            _ => return Err(invalid(path, "a schema must be an object or a boolean")),
        };
        self.object_body(o, name, path, depth, View::Whole)
    }

    /// `view` reads the schema object as if `nullable` (and maybe `type`) were rewritten,
    /// instead of cloning it: a deep clone per `nullable` or listed type, at every level,
    /// cost time proportional to the subtree each time.
    fn object_body(&mut self, o: &'v Map<String, Value>, name: &str, path: &str, depth: usize, view: View<'v>) -> Result<Expr, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError::TooDeep { limit: MAX_DEPTH });
        }
        // Each visit builds its pointer and rule name and scans its keywords: charged so.
        self.charge(1 + o.len() + (path.len() + name.len()) / 64)?;

        // Declared types, as a list and as a set.
        let types: Option<Vec<&str>> = match (view, o.get("type")) {
            (View::OneType(t), _) => Some(vec![t]),
            (_, None) => None,
            (_, Some(Value::String(s))) => Some(vec![s.as_str()]),
            (_, Some(Value::Array(ts))) if !ts.is_empty() && ts.len() <= 7 => {
                let mut v = Vec::new();
                for t in ts {
                    match t.as_str() {
                        Some(s) if !v.contains(&s) => v.push(s),
                        _ => return Err(invalid(path, "type must be a type name or a list of distinct type names")),
                    }
                }
                Some(v)
            }
            (_, Some(_)) => return Err(invalid(path, "type must be a type name or a list of distinct type names")),
        };
        let mut type_set: Option<u8> = None;
        if let Some(ts) = &types {
            let mut bits = 0;
            for t in ts {
                bits |= type_bits(t).ok_or_else(|| invalid(path, format!("unknown type '{t}'")))?;
            }
            type_set = Some(bits);
        }
        let type_fits = |kinds: Option<u8>| match (type_set, kinds) {
            (None, _) => true,
            (Some(t), Some(k)) => k & !t == 0,
            (Some(_), None) => false,
        };

        if view == View::Whole && o.get("nullable") == Some(&Value::Bool(true)) {
            let alt_name = sub_name(name, "0");
            let e = self.object_body(o, &alt_name, path, depth + 1, View::NotNullable)?;
            let alt = self.named(e, &alt_name)?;
            let null = self.conv.primitive("null")?;
            return Ok(Expr::Body(format!("{alt} | {null}")));
        }

        if let Some(r) = o.get("$ref") {
            let Value::String(reference) = r else { return Err(invalid(path, "$ref must be a string")) };
            let target_kinds = match self.resolve(reference, path) {
                Ok((t, _)) => self.kinds(t, depth + 1)?,
                Err(_) => None,
            };
            let fits = type_fits(target_kinds);
            let honoured: &[&str] = if fits { &["$ref", "type"] } else { &["$ref"] };
            Self::check_keywords(o, path, honoured, None)?;
            return Ok(Expr::Rule(self.visit_ref(reference, path, depth)?));
        }

        for key in ["anyOf", "oneOf"] {
            let Some(alts) = o.get(key) else { continue };
            let Value::Array(alts) = alts else { return Err(invalid(&push(path, key), "must be an array of schemas")) };
            if alts.is_empty() {
                return Err(invalid(&push(path, key), "must not be empty"));
            }
            if alts.len() > MAX_ENUM {
                return Err(SchemaError::LimitExceeded { what: format!("number of {key} alternatives"), limit: MAX_ENUM, path: path.into() });
            }
            let mut kinds = Some(0);
            for a in alts {
                kinds = match (kinds, self.kinds(a, depth + 1)?) {
                    (Some(acc), Some(k)) => Some(acc | k),
                    _ => None,
                };
            }
            let honoured: &[&str] = if type_fits(kinds) { &[key, "type"] } else { &[key] };
            // The other of anyOf/oneOf, allOf, properties...: all are unsupported here.
            Self::check_keywords(o, path, honoured, type_set)?;
            let mut rules = Vec::new();
            for (i, alt) in alts.iter().enumerate() {
                let alt_name = if name.is_empty() { format!("alternative-{i}") } else { format!("{name}-{i}") };
                rules.push(self.visit(alt, &alt_name, &push(&push(path, key), &i.to_string()), depth + 1)?);
            }
            return Ok(Expr::Body(rules.join(" | ")));
        }

        if o.contains_key("const") || o.contains_key("enum") {
            return self.visit_enum(o, path, type_set);
        }

        if let Some(ts) = &types {
            if ts.len() > 1 {
                let mut rules = Vec::new();
                for (i, t) in ts.iter().enumerate() {
                    let alt_name = if name.is_empty() { format!("alternative-{i}") } else { format!("{name}-{i}") };
                    let e = self.object_body(o, &alt_name, path, depth + 1, View::OneType(t))?;
                    rules.push(self.named(e, &alt_name)?);
                }
                return Ok(Expr::Body(rules.join(" | ")));
            }
        }

        let single = types.as_ref().map(|t| t[0]);
        let structural_object = has_properties(o);
        match single {
            Some("object") | None if structural_object => self.visit_object(o, name, path, depth),
            _ if o.contains_key("allOf") => self.visit_all_of(o, name, path, depth, type_fits),
            Some("object") => self.visit_object(o, name, path, depth),
            None if o.contains_key("items") || o.contains_key("prefixItems") => self.visit_array(o, name, path, depth),
            Some("array") => self.visit_array(o, name, path, depth),
            None if ["pattern", "minLength", "maxLength", "format"].iter().any(|k| o.contains_key(*k)) => self.visit_string(o, name, path),
            Some("string") => self.visit_string(o, name, path),
            Some("integer") => self.visit_integer(o, path),
            Some("number") => {
                Self::check_keywords(o, path, &["type"], type_set)?;
                Ok(Expr::Rule(self.conv.primitive("number")?))
            }
            Some("boolean") => {
                Self::check_keywords(o, path, &["type"], type_set)?;
                Ok(Expr::Rule(self.conv.primitive("boolean")?))
            }
            Some("null") => {
                Self::check_keywords(o, path, &["type"], type_set)?;
                Ok(Expr::Rule(self.conv.primitive("null")?))
            }
            _ => {
                Self::check_keywords(o, path, &[], None)?;
                Ok(Expr::Rule(self.conv.primitive("value")?))
            }
        }
    }
}

/// llama.cpp reads a schema with `properties`, or with `additionalProperties` other than
/// `true`, as an object schema even without `type`.
fn has_properties(o: &Map<String, Value>) -> bool {
    o.contains_key("properties") || o.get("additionalProperties").is_some_and(|a| a != &Value::Bool(true))
}

/// A non-negative count keyword, bounded by [`MAX_REPETITION`] (refused above it, never
/// clamped: llama.cpp would read a larger maximum as "unbounded").
fn count(o: &Map<String, Value>, key: &str, path: &str) -> Result<Option<usize>, SchemaError> {
    let Some(v) = o.get(key) else { return Ok(None) };
    let n = v
        .as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64))
        .ok_or_else(|| invalid(path, format!("{key} must be a non-negative integer")))?;
    if n > MAX_REPETITION as u64 {
        return Err(SchemaError::LimitExceeded { what: format!("{key} {n}"), limit: MAX_REPETITION, path: path.to_string() });
    }
    Ok(Some(n as usize))
}

/// A numeric bound, or `None`; `Err` when present but not a number.
fn number(o: &Map<String, Value>, key: &str, path: &str) -> Result<Option<f64>, SchemaError> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(invalid(path, format!("{key} must be a number"))),
    }
}

impl<'v> Visitor<'_, 'v> {
    fn visit_enum(&mut self, o: &Map<String, Value>, path: &str, type_set: Option<u8>) -> Result<Expr, SchemaError> {
        Self::check_keywords(o, path, &["type", "const", "enum"], type_set)?;
        let mut values: Vec<&Value> = match o.get("enum") {
            None => Vec::new(),
            Some(Value::Array(vs)) if !vs.is_empty() => {
                if vs.len() > MAX_ENUM {
                    return Err(SchemaError::LimitExceeded { what: "number of enum values".into(), limit: MAX_ENUM, path: path.into() });
                }
                vs.iter().collect()
            }
            Some(_) => return Err(invalid(path, "enum must be a non-empty array")),
        };
        if let Some(c) = o.get("const") {
            if o.contains_key("enum") && !values.contains(&c) {
                return Err(invalid(path, "const is not one of the enum values"));
            }
            values = vec![c];
        }
        if let Some(t) = type_set {
            values.retain(|v| value_bits(v) & t != 0);
            if values.is_empty() {
                return Err(invalid(path, "no enum/const value has the declared type"));
            }
        }
        let mut alts = Vec::new();
        for v in values {
            if value_depth_exceeds(v, MAX_DEPTH) {
                return Err(SchemaError::TooDeep { limit: MAX_DEPTH });
            }
            let text = serde_json::to_string(v).map_err(|e| invalid(path, e.to_string()))?;
            // An enum reached through many allOf merges is serialized once per merge.
            self.charge(1 + text.len() / 64)?;
            alts.push(gbnf_literal_of(&text));
        }
        Ok(Expr::Body(format!("({})", alts.join(" | "))))
    }

    fn visit_object(&mut self, o: &'v Map<String, Value>, name: &str, path: &str, depth: usize) -> Result<Expr, SchemaError> {
        Self::check_keywords(o, path, &["type", "properties", "required", "additionalProperties"], Some(OBJ))?;
        let mut props: Vec<(String, &'v Value, String)> = Vec::new();
        match o.get("properties") {
            None => {}
            Some(Value::Object(ps)) => {
                if ps.len() > MAX_PROPERTIES {
                    return Err(SchemaError::LimitExceeded { what: "number of properties".into(), limit: MAX_PROPERTIES, path: path.into() });
                }
                let ppath = push(path, "properties");
                props.extend(ps.iter().map(|(k, v)| (k.clone(), v, push(&ppath, k))));
            }
            Some(_) => return Err(invalid(path, "properties must be an object")),
        }
        let required = required_names(o, path)?;
        self.charge(required.len())?;
        let additional = match o.get("additionalProperties") {
            None if o.contains_key("properties") => Additional::None,
            None | Some(Value::Bool(true)) => Additional::Any,
            Some(Value::Bool(false)) => Additional::None,
            Some(Value::Object(m)) if m.is_empty() => Additional::Any,
            Some(s @ Value::Object(_)) => Additional::Schema(s, push(path, "additionalProperties")),
            Some(_) => return Err(invalid(path, "additionalProperties must be a boolean or a schema")),
        };
        if props.is_empty() && required.is_empty() && matches!(additional, Additional::Any) {
            return Ok(Expr::Rule(self.conv.primitive("object")?));
        }
        // A required key missing from `properties` is still required: it takes the
        // additional-properties schema (any value when extra keys are merely unspecified).
        // A set, not a scan of `props` per name: `required` can be long.
        let declared: BTreeSet<String> = props.iter().map(|p| p.0.clone()).collect();
        for r in &required {
            if declared.contains(r) {
                continue;
            }
            if props.len() >= MAX_PROPERTIES {
                return Err(SchemaError::LimitExceeded { what: "number of properties".into(), limit: MAX_PROPERTIES, path: path.into() });
            }
            let schema: &'v Value = match &additional {
                Additional::Schema(s, _) => s,
                Additional::Any => &ANY_SCHEMA,
                Additional::None if o.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(invalid(path, format!("required property '{r}' is not in properties, and additionalProperties is false")));
                }
                Additional::None => &ANY_SCHEMA,
            };
            props.push((r.clone(), schema, push(path, "required")));
        }
        self.build_object(name, props, &required, additional, depth)
    }

    fn build_object(
        &mut self,
        name: &str,
        props: Vec<(String, &'v Value, String)>,
        required: &BTreeSet<String>,
        additional: Additional<'v>,
        depth: usize,
    ) -> Result<Expr, SchemaError> {
        let mut kv: HashMap<String, String> = HashMap::new();
        let mut required_props = Vec::new();
        let mut optional_props = Vec::new();
        for (pname, pschema, ppath) in &props {
            let value = self.visit(pschema, &sub_name(name, pname), ppath, depth + 1)?;
            let key = serde_json::to_string(pname).map_err(|e| invalid(ppath, e.to_string()))?;
            let rule = self.conv.add(&format!("{}-kv", sub_name(name, pname)), &format!("{} space \":\" space {value}", gbnf_literal_of(&key)))?;
            kv.insert(pname.clone(), rule);
            if required.contains(pname) {
                required_props.push(pname.clone());
            } else {
                optional_props.push(pname.clone());
            }
        }
        // "*" stands for the additional properties (a property can't be named "*" here:
        // it is a key of `kv` only when additional properties exist, and is listed last).
        let mut star = None;
        if !matches!(additional, Additional::None) {
            let sub = sub_name(name, "additional");
            let value = match &additional {
                Additional::Schema(s, p) => self.visit(s, &format!("{sub}-value"), p, depth + 1)?,
                _ => self.conv.primitive("value")?,
            };
            let key = if props.is_empty() {
                self.conv.primitive("string")?
            } else {
                let names: Vec<&str> = props.iter().map(|p| p.0.as_str()).collect();
                let body = self.not_strings(&names)?;
                self.conv.add(&format!("{sub}-k"), &body)?
            };
            star = Some(self.conv.add(&format!("{sub}-kv"), &format!("{key} \":\" space {value}"))?);
        }
        let mut optional: Vec<(String, bool)> = optional_props.iter().map(|p| (kv[p].clone(), false)).collect();
        if let Some(s) = star {
            optional.push((s, true));
        }
        if required_props.is_empty() && optional.is_empty() {
            return Ok(Expr::Body("\"{\" space \"}\"".into()));
        }
        let mut rule = String::from("\"{\" space ");
        rule.push_str(&required_props.iter().map(|p| kv[p].as_str()).collect::<Vec<_>>().join(" \",\" space "));
        if !optional.is_empty() {
            // Optional keys keep their order: after key i come only keys i+1.. . `rest[i]`
            // is the rule for "whatever may follow optional key i", built back to front.
            let n = optional.len();
            let mut rest: Vec<Option<String>> = vec![None; n];
            for i in (0..n.saturating_sub(1)).rev() {
                let (next, next_star) = &optional[i + 1];
                let mut body = format!("( \",\" space {next} ){}", if *next_star { "*" } else { "?" });
                if let Some(r) = &rest[i + 1] {
                    body.push(' ');
                    body.push_str(r);
                }
                let key_name = if i < optional_props.len() { optional_props[i].as_str() } else { "*" };
                rest[i] = Some(self.conv.add(&format!("{}-rest", sub_name(name, key_name)), &body)?);
            }
            let mut alts = Vec::new();
            for (i, (k, is_star)) in optional.iter().enumerate() {
                let mut alt = k.clone();
                if *is_star {
                    alt.push_str(&format!(" ( \",\" space {k} )*"));
                }
                if let Some(r) = &rest[i] {
                    alt.push(' ');
                    alt.push_str(r);
                }
                alts.push(alt);
            }
            if required_props.is_empty() {
                rule.push_str(&format!(" ({} )?", alts.join(" | ")));
            } else {
                rule.push_str(&format!(" ( \",\" space ( {} ) )?", alts.join(" | ")));
            }
        }
        rule.push_str(" space \"}\"");
        Ok(Expr::Body(rule))
    }

    /// A JSON string that is none of `names`: a trie over the names, each branch either
    /// continuing a name or leaving it. Keys are written with `key-char` (no escapes), so
    /// an escaped spelling can never alias a declared property; names that need escapes
    /// can't be spelled that way at all and drop out of the trie.
    fn not_strings(&mut self, names: &[&str]) -> Result<String, SchemaError> {
        const MAX_KEY_CHARS: usize = 1024;
        struct Node {
            children: BTreeMap<char, usize>,
            terminal: bool,
        }
        let mut nodes = vec![Node { children: BTreeMap::new(), terminal: false }];
        for n in names {
            if n.chars().any(|c| c == '"' || c == '\\' || c < ' ' || c == '\u{7f}') {
                continue;
            }
            if n.chars().count() > MAX_KEY_CHARS {
                return Err(SchemaError::LimitExceeded { what: "property name length".into(), limit: MAX_KEY_CHARS, path: String::new() });
            }
            let mut at = 0;
            for c in n.chars() {
                at = match nodes[at].children.get(&c) {
                    Some(&next) => next,
                    None => {
                        nodes.push(Node { children: BTreeMap::new(), terminal: false });
                        let next = nodes.len() - 1;
                        nodes[at].children.insert(c, next);
                        next
                    }
                };
            }
            nodes[at].terminal = true;
        }
        // Every trie node writes at least this many bytes: a trie too big for the grammar
        // is refused before rendering it.
        if nodes.len().saturating_mul(8) > MAX_GRAMMAR_BYTES {
            return Err(SchemaError::TooLarge { limit: MAX_GRAMMAR_BYTES });
        }
        let kc = self.conv.primitive("key-char")?;
        // Appends to one buffer: returning strings that each parent copies cost the
        // trie's size times its depth. Depth is bounded by MAX_KEY_CHARS.
        fn render(out: &mut String, nodes: &[Node], at: usize, kc: &str) {
            let mut rejects = String::new();
            for (&c, &child) in &nodes[at].children {
                let cc = crate::class_char(c);
                rejects.push_str(&cc);
                let child_node = &nodes[child];
                if child_node.children.is_empty() {
                    out.push_str(&format!("[{cc}] {kc}+"));
                } else {
                    out.push_str(&format!("[{cc}] ("));
                    render(out, nodes, child, kc);
                    out.push(')');
                    if !child_node.terminal {
                        out.push('?');
                    }
                }
                out.push_str(" | ");
            }
            out.push_str(&format!("[^{rejects}\"\\\\\\x7F\\x00-\\x1F] {kc}*"));
        }
        let opt = if nodes[0].terminal { "" } else { "?" };
        let mut trie = String::new();
        render(&mut trie, &nodes, 0, &kc);
        Ok(format!("\"\\\"\" ( {trie} ){opt} \"\\\"\""))
    }

    fn visit_all_of(
        &mut self,
        o: &'v Map<String, Value>,
        name: &str,
        path: &str,
        depth: usize,
        type_fits: impl Fn(Option<u8>) -> bool,
    ) -> Result<Expr, SchemaError> {
        let apath = push(path, "allOf");
        let comps = match o.get("allOf") {
            Some(Value::Array(c)) if !c.is_empty() && c.len() <= MAX_ENUM => c,
            _ => return Err(invalid(&apath, "must be a non-empty array of schemas")),
        };
        let mut kinds = Some(0x7f);
        for c in comps {
            kinds = match (kinds, self.kinds(c, depth + 1)?) {
                (Some(a), Some(b)) => Some(a & b),
                (a, None) => a,
                (None, _) => None,
            };
        }
        let honoured: &[&str] = if type_fits(kinds) { &["allOf", "type"] } else { &["allOf"] };
        Self::check_keywords(o, path, honoured, None)?;
        if comps.len() == 1 {
            return self.body(&comps[0], name, &push(&apath, "0"), depth + 1);
        }

        // Merge: object components pool their properties (anyOf alternatives inside
        // contribute optional ones), enum components intersect. Anything else can't merge.
        let mut props: Vec<(String, &'v Value, String)> = Vec::new();
        // Property name → index in `props`: a scan per merged property was quadratic.
        let mut prop_index: HashMap<String, usize> = HashMap::new();
        let mut required = BTreeSet::new();
        let mut enum_counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut enums = 0;
        let mut work: Vec<(&'v Value, String, bool, usize)> =
            comps.iter().enumerate().map(|(i, c)| (c, push(&apath, &i.to_string()), true, depth + 1)).rev().collect();
        // Components already merged (node, as required?). Merging one again adds nothing
        // (its properties and required keys are there, an enum intersected with itself is
        // unchanged), and without this a component reached through many `$ref`s or anyOf
        // alternatives was merged once per path.
        let mut merged: BTreeSet<(usize, bool)> = BTreeSet::new();
        let mut objects = 0;
        while let Some((comp, cpath, is_required, d)) = work.pop() {
            if d > MAX_DEPTH {
                return Err(SchemaError::TooDeep { limit: MAX_DEPTH });
            }
            if !merged.insert((node_id(comp), is_required)) {
                continue;
            }
            let Value::Object(co) = comp else { return Err(unsupported("allOf", &cpath)) };
            self.charge(1 + co.len() + cpath.len() / 64)?;
            if let Some(Value::String(r)) = co.get("$ref") {
                Self::check_keywords(co, &cpath, &["$ref"], None)?;
                let (t, tpath) = self.resolve(r, &cpath)?;
                work.push((t, tpath, is_required, d + 1));
                continue;
            }
            if is_required {
                if let Some(Value::Array(alts)) = co.get("anyOf") {
                    Self::check_keywords(co, &cpath, &["anyOf"], None)?;
                    // Reversed: `work` is a stack, and property order follows the schema.
                    for (i, a) in alts.iter().enumerate().rev() {
                        work.push((a, push(&push(&cpath, "anyOf"), &i.to_string()), false, d + 1));
                    }
                    continue;
                }
            }
            if co.contains_key("enum") || co.contains_key("const") {
                if !is_required {
                    return Err(unsupported("allOf", &cpath));
                }
                enums += 1;
                let Expr::Body(body) = self.visit_enum(co, &cpath, co.get("type").and_then(|t| t.as_str()).and_then(type_bits))? else {
                    unreachable!("visit_enum returns a body")
                };
                let inner = &body[1..body.len() - 1];
                for alt in inner.split(" | ").collect::<BTreeSet<_>>() {
                    *enum_counts.entry(alt.to_string()).or_default() += 1;
                }
                continue;
            }
            if co.get("type").is_some_and(|t| t != "object") {
                return Err(unsupported("allOf", &cpath));
            }
            if co.get("additionalProperties").is_some_and(|a| a != &Value::Bool(true)) {
                return Err(unsupported("additionalProperties", &cpath));
            }
            Self::check_keywords(co, &cpath, &["type", "properties", "required", "additionalProperties"], Some(OBJ))?;
            objects += 1;
            if let Some(ps) = co.get("properties") {
                let Value::Object(ps) = ps else { return Err(invalid(&cpath, "properties must be an object")) };
                self.charge(ps.len())?;
                for (k, v) in ps {
                    match prop_index.get(k) {
                        Some(&i) => {
                            if !self.same_schema(props[i].1, v)? {
                                return Err(unsupported("allOf", &cpath));
                            }
                        }
                        None => {
                            if props.len() >= MAX_PROPERTIES {
                                return Err(SchemaError::LimitExceeded { what: "number of properties".into(), limit: MAX_PROPERTIES, path: path.into() });
                            }
                            prop_index.insert(k.clone(), props.len());
                            props.push((k.clone(), v, push(&push(&cpath, "properties"), k)));
                        }
                    }
                }
            }
            let req = required_names(co, &cpath)?;
            self.charge(req.len())?;
            if !is_required && !req.is_empty() {
                // An anyOf alternative's required keys would make the merge too loose.
                return Err(unsupported("required", &cpath));
            }
            required.extend(req);
        }
        if enums > 0 {
            if objects > 0 {
                return Err(unsupported("allOf", &apath));
            }
            let common: Vec<&str> = enum_counts.iter().filter(|(_, n)| **n == enums).map(|(v, _)| v.as_str()).collect();
            if common.is_empty() {
                return Err(invalid(&apath, "the enums of allOf have no value in common"));
            }
            return Ok(Expr::Body(format!("({})", common.join(" | "))));
        }
        for r in &required {
            if !prop_index.contains_key(r) {
                if props.len() >= MAX_PROPERTIES {
                    return Err(SchemaError::LimitExceeded { what: "number of properties".into(), limit: MAX_PROPERTIES, path: path.into() });
                }
                props.push((r.clone(), &ANY_SCHEMA, apath.clone()));
            }
        }
        self.build_object(name, props, &required, Additional::None, depth)
    }

    /// Whether two schemas are equal JSON, one step charged per value compared: the same
    /// large property schema met through many merges would otherwise be compared in full
    /// each time for free. The same node is equal without a look.
    fn same_schema(&mut self, a: &Value, b: &Value) -> Result<bool, SchemaError> {
        let mut stack = vec![(a, b)];
        while let Some((a, b)) = stack.pop() {
            if std::ptr::eq(a, b) {
                continue;
            }
            self.charge(1)?;
            match (a, b) {
                (Value::Array(x), Value::Array(y)) => {
                    if x.len() != y.len() {
                        return Ok(false);
                    }
                    stack.extend(x.iter().zip(y));
                }
                (Value::Object(x), Value::Object(y)) => {
                    if x.len() != y.len() {
                        return Ok(false);
                    }
                    for (k, xv) in x {
                        let Some(yv) = y.get(k) else { return Ok(false) };
                        stack.push((xv, yv));
                    }
                }
                (x, y) => {
                    if x != y {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// The rule `"," space item` (`name-next`): what a comma-separated list repeats, so
    /// that the repeated thing is one rule reference (a group `("," space item)` expands
    /// to one llama.cpp rule per name it meets first, times the count).
    fn next_item(&mut self, name: &str, item: &str) -> Result<String, SchemaError> {
        self.conv.add(&sub_name(name, "next"), &format!("\",\" space {item}"))
    }

    /// `item` (a rule) `min..=max` times, comma-separated.
    fn list(&mut self, name: &str, item: &str, min: usize, max: Option<usize>) -> Result<String, SchemaError> {
        if max == Some(0) {
            return Ok(String::new());
        }
        let rest = if max == Some(1) {
            String::new()
        } else {
            let next = self.next_item(name, item)?;
            format!(" {}", repetition(&next, min.saturating_sub(1), max.map(|m| m - 1)))
        };
        let one_or_more = format!("{item}{rest}");
        if min > 0 {
            return Ok(one_or_more);
        }
        if max.is_some_and(|m| m > 2) {
            // `( item next{0,k} )?` would make llama.cpp count the k rules the inner
            // repetition expands to as the group's, times one for `?`: over its threshold
            // for k near it. A rule of its own is one reference.
            let list = self.conv.add(&sub_name(name, "list"), &one_or_more)?;
            return Ok(format!("{list}?"));
        }
        Ok(format!("({one_or_more})?"))
    }

    fn visit_array(&mut self, o: &'v Map<String, Value>, name: &str, path: &str, depth: usize) -> Result<Expr, SchemaError> {
        Self::check_keywords(o, path, &["type", "items", "prefixItems", "minItems", "maxItems"], Some(ARR))?;
        let min = count(o, "minItems", path)?.unwrap_or(0);
        let max = count(o, "maxItems", path)?;
        if max.is_some_and(|m| m < min) {
            return Err(invalid(path, "minItems is above maxItems"));
        }
        let (prefix, rest, rest_key) = match (o.get("prefixItems"), o.get("items")) {
            (Some(Value::Array(p)), Some(Value::Array(_))) => {
                let _ = p;
                return Err(invalid(path, "items must be a schema when prefixItems is given"));
            }
            (Some(Value::Array(p)), items) => (Some((p, "prefixItems")), items, "items"),
            // llama.cpp reads a lone non-array prefixItems as the item schema; older
            // tools emit it, so accept that (only when `items` doesn't also say).
            (Some(p @ (Value::Object(_) | Value::Bool(_))), None) => (None, Some(p), "prefixItems"),
            (Some(_), _) => return Err(invalid(path, "prefixItems must be an array of schemas")),
            (None, Some(Value::Array(p))) => (Some((p, "items")), None, "additionalItems"),
            (None, items) => (None, items, "items"),
        };
        let sub = |part: &str| sub_name(name, part);
        if let Some((items, key)) = prefix {
            let n = items.len();
            // Not a repetition (each item is written out): the component limit applies.
            if n > MAX_ENUM {
                return Err(SchemaError::LimitExceeded { what: "number of tuple items".into(), limit: MAX_ENUM, path: path.into() });
            }
            // Tuples are complete (as in llama.cpp): a shorter array is not generated.
            if max.is_some_and(|m| m < n) {
                return Err(unsupported("maxItems", path));
            }
            let mut parts = Vec::new();
            for (i, item) in items.iter().enumerate() {
                parts.push(self.visit(item, &sub(&format!("tuple-{i}")), &push(&push(path, key), &i.to_string()), depth + 1)?);
            }
            let mut rule = format!("\"[\" space {}", parts.join(" \",\" space "));
            match rest {
                None | Some(Value::Bool(false)) => {
                    if min > n {
                        return Err(unsupported("minItems", path));
                    }
                }
                Some(r) => {
                    let item = self.visit(r, &sub("item"), &push(path, rest_key), depth + 1)?;
                    if n == 0 {
                        rule = format!("\"[\" space {}", self.list(name, &item, min, max)?);
                    } else if max != Some(n) {
                        let next = self.next_item(name, &item)?;
                        rule.push(' ');
                        rule.push_str(&repetition(&next, min.saturating_sub(n), max.map(|m| m - n)));
                    }
                }
            }
            rule.push_str(" space \"]\"");
            return Ok(Expr::Body(rule));
        }
        let item = match rest {
            Some(Value::Bool(false)) => {
                if min > 0 {
                    return Err(invalid(path, "items is false but minItems is above 0"));
                }
                return Ok(Expr::Body("\"[\" space \"]\"".into()));
            }
            None | Some(Value::Bool(true)) if min == 0 && max.is_none() => return Ok(Expr::Rule(self.conv.primitive("array")?)),
            None => self.conv.primitive("value")?,
            Some(Value::Object(m)) if m.is_empty() && min == 0 && max.is_none() => return Ok(Expr::Rule(self.conv.primitive("array")?)),
            Some(r) => self.visit(r, &sub("item"), &push(path, rest_key), depth + 1)?,
        };
        let list = self.list(name, &item, min, max)?;
        Ok(Expr::Body(format!("\"[\" space {list} space \"]\"")))
    }

    fn visit_string(&mut self, o: &'v Map<String, Value>, name: &str, path: &str) -> Result<Expr, SchemaError> {
        Self::check_keywords(o, path, &["type", "minLength", "maxLength", "pattern", "format"], Some(STR))?;
        let min = count(o, "minLength", path)?;
        let max = count(o, "maxLength", path)?;
        let length_key = if min.is_some() { Some("minLength") } else if max.is_some() { Some("maxLength") } else { None };
        if let Some(p) = o.get("pattern") {
            let Value::String(p) = p else { return Err(invalid(path, "pattern must be a string")) };
            if o.contains_key("format") {
                return Err(unsupported("format", path));
            }
            if let Some(k) = length_key {
                return Err(unsupported(k, path));
            }
            let body = pattern_to_gbnf(p).map_err(|e| match e {
                PatternError::Unsupported(_) => unsupported("pattern", path),
                PatternError::Invalid(why) => invalid(path, format!("pattern is not a valid regular expression: {why}")),
                PatternError::TooMany => SchemaError::LimitExceeded { what: "pattern repetition count {n,m}".into(), limit: MAX_REPETITION, path: path.into() },
                PatternError::TooManyRules => SchemaError::LimitExceeded {
                    what: "pattern repetition count times the grammar rules its group expands to (llama.cpp's limit)".into(),
                    limit: MAX_REPETITION,
                    path: path.into(),
                },
            })?;
            let rule_name = if name.is_empty() { "root".to_string() } else { name.to_string() };
            return Ok(Expr::Rule(self.conv.add(&rule_name, &body)?));
        }
        if let Some(f) = o.get("format") {
            let Value::String(f) = f else { return Err(invalid(path, "format must be a string")) };
            let prim = match f.as_str() {
                "date" => "date-string",
                "time" => "time-string",
                "date-time" => "date-time-string",
                "uuid" | "uuid1" | "uuid2" | "uuid3" | "uuid4" | "uuid5" => "uuid",
                _ => return Err(unsupported("format", path)),
            };
            if let Some(k) = length_key {
                return Err(unsupported(k, path));
            }
            return Ok(Expr::Rule(self.conv.primitive(prim)?));
        }
        let min = min.unwrap_or(0);
        if max.is_some_and(|m| m < min) {
            return Err(invalid(path, "minLength is above maxLength"));
        }
        if min == 0 && max.is_none() {
            return Ok(Expr::Rule(self.conv.primitive("string")?));
        }
        let ch = self.conv.primitive("char")?;
        Ok(Expr::Body(format!("\"\\\"\" {} \"\\\"\"", repetition(&ch, min, max))))
    }

    fn visit_integer(&mut self, o: &Map<String, Value>, path: &str) -> Result<Expr, SchemaError> {
        let unit_multiple = o.get("multipleOf").and_then(|m| m.as_f64()) == Some(1.0);
        let honoured: &[&str] = if unit_multiple {
            &["type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"]
        } else {
            &["type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]
        };
        Self::check_keywords(o, path, honoured, Some(INT))?;
        let minimum = number(o, "minimum", path)?;
        let maximum = number(o, "maximum", path)?;
        // Fractional bounds round inwards; draft-4's boolean exclusive* modify min/max.
        let mut lo: Option<f64> = minimum.map(|m| if o.get("exclusiveMinimum") == Some(&Value::Bool(true)) { m.floor() + 1.0 } else { m.ceil() });
        let mut hi: Option<f64> = maximum.map(|m| if o.get("exclusiveMaximum") == Some(&Value::Bool(true)) { m.ceil() - 1.0 } else { m.floor() });
        if let Some(Value::Number(e)) = o.get("exclusiveMinimum") {
            let e = e.as_f64().unwrap_or(0.0).floor() + 1.0;
            lo = Some(lo.map_or(e, |l| l.max(e)));
        } else if o.get("exclusiveMinimum").is_some_and(|e| !e.is_boolean()) {
            return Err(invalid(path, "exclusiveMinimum must be a number"));
        }
        if let Some(Value::Number(e)) = o.get("exclusiveMaximum") {
            let e = e.as_f64().unwrap_or(0.0).ceil() - 1.0;
            hi = Some(hi.map_or(e, |h| h.min(e)));
        } else if o.get("exclusiveMaximum").is_some_and(|e| !e.is_boolean()) {
            return Err(invalid(path, "exclusiveMaximum must be a number"));
        }
        let bound = MAX_ABS_BOUND as f64;
        for (v, key) in [(lo, "minimum"), (hi, "maximum")] {
            if v.is_some_and(|v| v.abs() > bound) {
                return Err(SchemaError::LimitExceeded { what: format!("integer {key} magnitude"), limit: MAX_ABS_BOUND as usize, path: path.into() });
            }
        }
        let (lo, hi) = (lo.map(|v| v as i64), hi.map(|v| v as i64));
        if let (Some(l), Some(h)) = (lo, hi) {
            if l > h {
                return Err(invalid(path, "no integer lies between the minimum and the maximum"));
            }
        }
        if lo.is_none() && hi.is_none() {
            return Ok(Expr::Rule(self.conv.primitive("integer")?));
        }
        let mut out = String::from("(");
        int_range(&mut out, lo, hi, 16, true);
        out.push(')');
        Ok(Expr::Body(out))
    }
}

fn required_names(o: &Map<String, Value>, path: &str) -> Result<BTreeSet<String>, SchemaError> {
    match o.get("required") {
        None => Ok(BTreeSet::new()),
        Some(Value::Array(rs)) => rs
            .iter()
            .map(|r| r.as_str().map(str::to_string).ok_or_else(|| invalid(path, "required must be an array of strings")))
            .collect(),
        Some(_) => Err(invalid(path, "required must be an array of strings")),
    }
}
