//! The streaming parser of a model's answer: content, reasoning and tool calls, as deltas
//! in OpenAI's order, and the whole message at the end.
//!
//! Text is read one character at a time through a small state machine, so each `push` costs
//! O(delta) amortized: nothing is rescanned but a held-back piece no longer than a marker
//! (or a 256-byte probe). Text that might still become a marker is held until it is
//! resolved; text that was meant as a call but does not parse comes back as content,
//! never lost, and the problem is reported by [`ToolCallParser::finish`].

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::{ReasoningFormat, ThinkTags, ToolFormat};

/// Most calls one answer may make; more is a [`ParseProblem::TooManyCalls`].
pub const MAX_CALLS: usize = 128;

/// Most bytes of one call's text (its arguments, mostly).
pub const MAX_CALL_BYTES: usize = 4 << 20;

/// Longest text held while deciding whether an answer starts with a call (Llama 3, Generic)
/// or a think block.
const MAX_PROBE: usize = 256;

/// Whitespace is held (it is dropped before a call and at the end); past this it goes out.
const MAX_PENDING_WS: usize = 4096;

/// One streamed delta, in the order OpenAI sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    Content(String),
    Reasoning(String),
    /// A call starts: its index among this answer's calls, its id (`call_` and 24
    /// characters) and the function's name.
    ToolCallBegin { index: usize, id: String, name: String },
    /// Part of call `index`'s arguments; the fragments of a call concatenate to exactly its
    /// final `arguments` text.
    ToolCallArgs { index: usize, fragment: String },
}

/// One call of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub id: String,
    pub name: String,
    /// JSON text, as OpenAI's `function.arguments`.
    pub arguments: String,
}

/// The whole answer, as OpenAI's non-streamed message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedMessage {
    pub content: Option<String>,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<ParsedToolCall>,
}

/// What [`ToolCallParser::finish`] gives back: the last deltas (held-back text) and the
/// whole message. `message` is what the events add up to, calls whose events were sent but
/// which then failed aside (their text is in `content`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Finished {
    pub events: Vec<OutputEvent>,
    pub message: ParsedMessage,
}

/// Why (part of) the answer was not what its format promised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseProblem {
    #[error("the answer ended inside tool call {index}")]
    TruncatedCall { index: usize },
    #[error("tool call {index} is not valid: {what}")]
    MalformedCall { index: usize, what: &'static str },
    #[error("the answer has more than {limit} tool calls")]
    TooManyCalls { limit: usize },
    #[error("tool call {index} is longer than {limit} bytes")]
    CallTooLong { index: usize, limit: usize },
    #[error("the answer ended inside its JSON object")]
    TruncatedAnswer,
}

/// The answer did not parse as its format: `recovered` is the best reading (text that did
/// not parse is content), `problem` the first thing that went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{problem}; the text it concerns was kept as content")]
pub struct ParseFailure {
    pub problem: ParseProblem,
    pub recovered: Box<Finished>,
}

/// Text on its way out, trimmed as llama.cpp trims content and reasoning: leading
/// whitespace dropped, trailing whitespace held and dropped at the end or before a call.
#[derive(Default)]
struct Channel {
    started: bool,
    pending_ws: String,
    all: String,
}

impl Channel {
    fn feed(&mut self, s: &str) -> Option<String> {
        let end = s.trim_end();
        if end.is_empty() {
            if self.started {
                self.pending_ws.push_str(s);
                if self.pending_ws.len() > MAX_PENDING_WS {
                    let out = std::mem::take(&mut self.pending_ws);
                    self.all.push_str(&out);
                    return Some(out);
                }
            }
            return None;
        }
        let mut out = if self.started { std::mem::take(&mut self.pending_ws) } else { String::new() };
        out.push_str(if self.started { end } else { end.trim_start() });
        self.started = true;
        self.pending_ws = s[end.len()..].to_string();
        self.all.push_str(&out);
        Some(out)
    }

    /// Whitespace before a call is a separator, not content (unless the call fails: the
    /// caller keeps it with the call's text).
    fn take_pending(&mut self) -> String {
        std::mem::take(&mut self.pending_ws)
    }

    fn into_text(self) -> Option<String> {
        Some(self.all).filter(|s| !s.is_empty())
    }
}

/// Tracks where a JSON value ends: nesting and strings, nothing else.
#[derive(Default, Clone)]
struct JsonScan {
    depth: u32,
    in_str: bool,
    esc: bool,
}

impl JsonScan {
    /// True when `c` closes the outermost container.
    fn feed(&mut self, c: char) -> bool {
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if c == '\\' {
                self.esc = true;
            } else if c == '"' {
                self.in_str = false;
            }
            return false;
        }
        match c {
            '"' => self.in_str = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' if self.depth > 0 => {
                self.depth -= 1;
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// Decodes a JSON string's body as it streams (Generic's `content`).
#[derive(Default)]
struct StrDecoder {
    esc: bool,
    unicode: Option<(u32, u8)>,
    high_surrogate: Option<u32>,
}

enum Decoded {
    Char(char),
    Nothing,
    End,
}

impl StrDecoder {
    fn feed(&mut self, c: char) -> Decoded {
        if let Some((acc, n)) = self.unicode {
            let Some(d) = c.to_digit(16) else {
                self.unicode = None;
                return Decoded::Char(char::REPLACEMENT_CHARACTER);
            };
            let acc = acc * 16 + d;
            if n < 3 {
                self.unicode = Some((acc, n + 1));
                return Decoded::Nothing;
            }
            self.unicode = None;
            if (0xD800..0xDC00).contains(&acc) {
                self.high_surrogate = Some(acc);
                return Decoded::Nothing;
            }
            let code = match self.high_surrogate.take() {
                Some(hi) if (0xDC00..0xE000).contains(&acc) => 0x10000 + ((hi - 0xD800) << 10) + (acc - 0xDC00),
                _ => acc,
            };
            return Decoded::Char(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
        }
        if self.esc {
            self.esc = false;
            return Decoded::Char(match c {
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                'b' => '\u{8}',
                'f' => '\u{c}',
                'u' => {
                    self.unicode = Some((0, 0));
                    return Decoded::Nothing;
                }
                other => other,
            });
        }
        match c {
            '\\' => {
                self.esc = true;
                Decoded::Nothing
            }
            '"' => Decoded::End,
            c => Decoded::Char(c),
        }
    }
}

/// Where a call's object is, in the fast path that streams its arguments.
enum Phase {
    Open,
    KeyStart,
    Key(String, bool),
    Colon(String),
    Value(String),
    Name(String, bool),
    Args(JsonScan),
    AfterValue,
    /// Keys in another order, arguments as a string...: read to the object's end and parse.
    Slow,
}

struct CallState {
    index: usize,
    scan: JsonScan,
    phase: Phase,
    name: Option<String>,
    /// Set once its `ToolCallBegin` went out.
    id: Option<String>,
    args: String,
    args_done: bool,
    /// Mistral's `[ARGS]` form: the object is the arguments; the name came before.
    args_only: bool,
    raw: String,
}

impl CallState {
    fn new(index: usize) -> Self {
        CallState { index, scan: JsonScan::default(), phase: Phase::Open, name: None, id: None, args: String::new(), args_done: false, args_only: false, raw: String::new() }
    }
}

#[derive(Default)]
enum Stage {
    /// Reasoning on: the answer may open a think block (held: leading text so far).
    ThinkOpen(String),
    /// Inside the think block (held: a possible start of the close tag).
    Thinking(String),
    /// Content, watching for the format's markers (held: a possible start of one).
    Text(String),
    /// Llama 3 / Generic: does the answer (or what follows a Llama 3 call) start a call?
    Probe(String),
    Call(Box<CallState>),
    /// After a call's object: Hermes' close tag, or an array's `,` / `]`.
    After(String),
    /// After Mistral's `[TOOL_CALLS]`: an array, or a name and `[ARGS]`.
    MistralHead,
    MistralName(String),
    GenericContent(StrDecoder),
    GenericEnd(String),
    /// Everything is content.
    #[default]
    Passthrough,
}

#[derive(Clone, Copy)]
enum Piece {
    Ws,
    /// Whitespace and `;` (between Llama 3 calls).
    WsSemi,
    Lit(&'static str),
}

#[derive(PartialEq, Eq)]
enum Matched {
    Full,
    Partial,
    No,
}

/// Whether `s` is a whole sequence of pieces, the start of one, or neither.
fn seq_match(s: &str, pieces: &[Piece]) -> Matched {
    let mut rest = s;
    for p in pieces {
        match p {
            Piece::Ws => rest = rest.trim_start(),
            Piece::WsSemi => rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';'),
            Piece::Lit(l) => {
                if rest.len() < l.len() {
                    return if l.starts_with(rest) { Matched::Partial } else { Matched::No };
                }
                if !rest.starts_with(l) {
                    return Matched::No;
                }
                rest = &rest[l.len()..];
            }
        }
    }
    if rest.is_empty() {
        Matched::Full
    } else {
        Matched::No
    }
}

const GENERIC_CALLS: &[Piece] = &[Piece::Ws, Piece::Lit("{"), Piece::Ws, Piece::Lit("\"tool_calls\""), Piece::Ws, Piece::Lit(":"), Piece::Ws, Piece::Lit("[")];
const GENERIC_CONTENT: &[Piece] = &[Piece::Ws, Piece::Lit("{"), Piece::Ws, Piece::Lit("\"content\""), Piece::Ws, Piece::Lit(":"), Piece::Ws, Piece::Lit("\"")];
const LLAMA3_CALL: &[Piece] = &[Piece::WsSemi, Piece::Lit("{"), Piece::Ws, Piece::Lit("\"name\"")];
const HERMES_CLOSE: &[Piece] = &[Piece::Ws, Piece::Lit("</tool_call>")];
const GENERIC_END: &[Piece] = &[Piece::Ws, Piece::Lit("}")];

/// Call ids: `call_` and 24 letters and digits, from a hasher with a random key.
struct IdGen {
    key: RandomState,
    n: u64,
}

impl IdGen {
    fn next(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        self.n += 1;
        let mut id = String::with_capacity(29);
        id.push_str("call_");
        for part in 0..3u64 {
            // 62^8 < 2^64: eight characters per hash.
            let mut h = self.key.hash_one((self.n, part));
            for _ in 0..8 {
                id.push(ALPHABET[(h % 62) as usize] as char);
                h /= 62;
            }
        }
        id
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Content,
    Reasoning,
}

/// The streaming parser of one answer. Build one per request: [`ToolCallParser::new`] when
/// the request has tools (and `tool_choice` is not `none`), else
/// [`ToolCallParser::content_only`]; [`push`](ToolCallParser::push) each text delta,
/// [`finish`](ToolCallParser::finish) at the end.
pub struct ToolCallParser {
    format: Option<ToolFormat>,
    tags: ThinkTags,
    stage: Stage,
    /// Text of this push not yet turned into an event, and which channel it is for.
    raw: String,
    raw_kind: Kind,
    content: Channel,
    reasoning: Channel,
    events: Vec<OutputEvent>,
    calls: Vec<ParsedToolCall>,
    /// The text of the call being read (from its marker): content again if it fails.
    fallback: String,
    problem: Option<ParseProblem>,
    ids: IdGen,
}

impl ToolCallParser {
    /// A parser for `format`'s calls, with reasoning split off per `reasoning` (tags
    /// `<think>`/`</think>` unless [`with_think_tags`](Self::with_think_tags) says otherwise).
    /// `thinking_forced_open`: the prompt ended inside a think block
    /// ([`crate::thinking_forced_open`]), so the answer begins with reasoning.
    pub fn new(format: ToolFormat, reasoning: ReasoningFormat, thinking_forced_open: bool) -> Self {
        Self::build(Some(format), reasoning, thinking_forced_open)
    }

    /// A parser that finds no calls (a request without tools), only reasoning.
    pub fn content_only(reasoning: ReasoningFormat, thinking_forced_open: bool) -> Self {
        Self::build(None, reasoning, thinking_forced_open)
    }

    fn build(format: Option<ToolFormat>, reasoning: ReasoningFormat, forced_open: bool) -> Self {
        let mut p = ToolCallParser {
            format,
            tags: ThinkTags::THINK,
            stage: Stage::Passthrough,
            raw: String::new(),
            raw_kind: Kind::Content,
            content: Channel::default(),
            reasoning: Channel::default(),
            events: Vec::new(),
            calls: Vec::new(),
            fallback: String::new(),
            problem: None,
            ids: IdGen { key: RandomState::new(), n: 0 },
        };
        p.stage = match (reasoning.splits(), forced_open) {
            (true, true) => Stage::Thinking(String::new()),
            (true, false) => Stage::ThinkOpen(String::new()),
            (false, _) => p.body_start(),
        };
        if !reasoning.splits() && forced_open {
            // The prompt swallowed the open tag; the content shows the whole block.
            let open = p.tags.open;
            p.out(Kind::Content, open);
        }
        p
    }

    /// Other reasoning tags (Command R7B's, from [`ThinkTags::detect`]).
    pub fn with_think_tags(mut self, tags: ThinkTags) -> Self {
        if !self.events.is_empty() || !self.raw.is_empty() {
            // Only the forced-open content seed can be there: say it with the new tag.
            self.raw = self.raw.replace(self.tags.open, tags.open);
        }
        self.tags = tags;
        self
    }

    /// Reads the next piece of the answer; returns the deltas it completes.
    pub fn push(&mut self, delta: &str) -> Vec<OutputEvent> {
        for c in delta.chars() {
            self.step(c);
        }
        self.flush_raw();
        std::mem::take(&mut self.events)
    }

    /// The end of the answer: held-back text comes out, the message is assembled. An
    /// answer that ended inside a call, or a call that did not parse, is a [`ParseFailure`]
    /// carrying the message with that text as content.
    pub fn finish(mut self) -> Result<Finished, ParseFailure> {
        // A think-block probe resolves into the body first, then the body's held text.
        if let Stage::ThinkOpen(held) = &mut self.stage {
            let held = std::mem::take(held);
            self.stage = self.body_start();
            for c in held.chars() {
                self.step(c);
            }
        }
        match std::mem::take(&mut self.stage) {
            Stage::ThinkOpen(held) | Stage::Text(held) | Stage::Probe(held) => self.out(Kind::Content, &held),
            Stage::Thinking(held) => self.out(Kind::Reasoning, &held),
            Stage::Call(cs) => {
                self.fail(ParseProblem::TruncatedCall { index: cs.index });
            }
            Stage::MistralHead | Stage::MistralName(_) => {
                self.fail(ParseProblem::TruncatedCall { index: self.calls.len() });
            }
            // A missing close tag or `]` after whole calls: the calls stand.
            Stage::After(_) | Stage::GenericEnd(_) | Stage::Passthrough => {}
            Stage::GenericContent(_) => self.note(ParseProblem::TruncatedAnswer),
        }
        self.flush_raw();
        let finished = Finished {
            events: std::mem::take(&mut self.events),
            message: ParsedMessage { content: self.content.into_text(), reasoning_content: self.reasoning.into_text(), tool_calls: self.calls },
        };
        match self.problem {
            None => Ok(finished),
            Some(problem) => Err(ParseFailure { problem, recovered: Box::new(finished) }),
        }
    }

    fn body_start(&self) -> Stage {
        match self.format {
            Some(ToolFormat::Llama3 | ToolFormat::Generic) => Stage::Probe(String::new()),
            Some(ToolFormat::Hermes | ToolFormat::Mistral) => Stage::Text(String::new()),
            None => Stage::Passthrough,
        }
    }

    fn markers(&self) -> &'static [&'static str] {
        match self.format {
            Some(ToolFormat::Hermes) => &["<tool_call>"],
            Some(ToolFormat::Mistral) => &["[TOOL_CALLS]"],
            Some(ToolFormat::Llama3) => &["<|python_tag|>"],
            Some(ToolFormat::Generic) | None => &[],
        }
    }

    // ---- output ----

    fn out(&mut self, kind: Kind, s: &str) {
        if s.is_empty() {
            return;
        }
        if kind != self.raw_kind {
            self.flush_raw();
            self.raw_kind = kind;
        }
        self.raw.push_str(s);
    }

    fn out_char(&mut self, kind: Kind, c: char) {
        let mut b = [0u8; 4];
        self.out(kind, c.encode_utf8(&mut b));
    }

    fn flush_raw(&mut self) {
        if self.raw.is_empty() {
            return;
        }
        let raw = std::mem::take(&mut self.raw);
        let (channel, make): (&mut Channel, fn(String) -> OutputEvent) = match self.raw_kind {
            Kind::Content => (&mut self.content, OutputEvent::Content),
            Kind::Reasoning => (&mut self.reasoning, OutputEvent::Reasoning),
        };
        if let Some(text) = channel.feed(&raw) {
            match (self.events.last_mut(), make(text)) {
                (Some(OutputEvent::Content(a)), OutputEvent::Content(b)) | (Some(OutputEvent::Reasoning(a)), OutputEvent::Reasoning(b)) => a.push_str(&b),
                (_, ev) => self.events.push(ev),
            }
        }
        self.raw = raw;
        self.raw.clear();
    }

    fn begin_call(&mut self, index: usize, name: &str) -> String {
        self.flush_raw();
        self.content.take_pending();
        let id = self.ids.next();
        self.events.push(OutputEvent::ToolCallBegin { index, id: id.clone(), name: name.to_string() });
        id
    }

    fn args_out(&mut self, index: usize, s: &str) {
        match self.events.last_mut() {
            Some(OutputEvent::ToolCallArgs { index: i, fragment }) if *i == index => fragment.push_str(s),
            _ => self.events.push(OutputEvent::ToolCallArgs { index, fragment: s.to_string() }),
        }
    }

    fn note(&mut self, problem: ParseProblem) {
        self.problem.get_or_insert(problem);
    }

    /// The call being read is not one: its text becomes content, and so does the rest.
    fn fail(&mut self, problem: ParseProblem) -> Stage {
        self.note(problem);
        let text = std::mem::take(&mut self.fallback);
        self.out(Kind::Content, &text);
        Stage::Passthrough
    }

    // ---- the state machine ----

    fn step(&mut self, c: char) {
        let stage = std::mem::take(&mut self.stage);
        let (next, replay) = self.advance(stage, c);
        self.stage = next;
        // Held text that turned out to be something else is read again in the new stage
        // (at most a marker's or a probe's length, and at most twice).
        if let Some(text) = replay {
            for c in text.chars() {
                self.step(c);
            }
        }
    }

    fn start_call(&mut self, marker: &str) -> Stage {
        if self.calls.len() >= MAX_CALLS {
            self.fallback.push_str(marker);
            return self.fail(ParseProblem::TooManyCalls { limit: MAX_CALLS });
        }
        self.flush_raw();
        let ws = self.content.take_pending();
        self.fallback.push_str(&ws);
        self.fallback.push_str(marker);
        Stage::Call(Box::new(CallState::new(self.calls.len())))
    }

    fn advance(&mut self, stage: Stage, c: char) -> (Stage, Option<String>) {
        match stage {
            Stage::ThinkOpen(mut held) => {
                held.push(c);
                let t = held.trim_start();
                if t == self.tags.open {
                    (Stage::Thinking(String::new()), None)
                } else if self.tags.open.starts_with(t) && held.len() <= MAX_PROBE {
                    (Stage::ThinkOpen(held), None)
                } else {
                    (self.body_start(), Some(held))
                }
            }
            Stage::Thinking(mut held) => {
                held.push(c);
                if held == self.tags.close {
                    self.flush_raw();
                    return (self.body_start(), None);
                }
                while !held.is_empty() && !self.tags.close.starts_with(held.as_str()) {
                    let first = held.remove(0);
                    self.out_char(Kind::Reasoning, first);
                }
                (Stage::Thinking(held), None)
            }
            Stage::Text(mut held) => {
                held.push(c);
                let markers = self.markers();
                loop {
                    if let Some(m) = markers.iter().find(|m| **m == held) {
                        if self.format == Some(ToolFormat::Mistral) {
                            self.flush_raw();
                            let ws = self.content.take_pending();
                            self.fallback.push_str(&ws);
                            self.fallback.push_str(m);
                            return (Stage::MistralHead, None);
                        }
                        return (self.start_call(m), None);
                    }
                    if held.is_empty() || markers.iter().any(|m| m.starts_with(held.as_str())) {
                        return (Stage::Text(held), None);
                    }
                    let first = held.remove(0);
                    self.out_char(Kind::Content, first);
                }
            }
            Stage::Passthrough => {
                self.out_char(Kind::Content, c);
                (Stage::Passthrough, None)
            }
            Stage::Probe(mut held) => {
                held.push(c);
                if self.format == Some(ToolFormat::Generic) {
                    if seq_match(&held, GENERIC_CALLS) == Matched::Full {
                        self.fallback.push_str(&held);
                        return (self.start_call(""), None);
                    }
                    if seq_match(&held, GENERIC_CONTENT) == Matched::Full {
                        return (Stage::GenericContent(StrDecoder::default()), None);
                    }
                    let partial = seq_match(&held, GENERIC_CALLS) == Matched::Partial || seq_match(&held, GENERIC_CONTENT) == Matched::Partial;
                    if partial && held.len() <= MAX_PROBE {
                        return (Stage::Probe(held), None);
                    }
                    return (Stage::Passthrough, Some(held));
                }
                match seq_match(&held, LLAMA3_CALL) {
                    Matched::Full => {
                        let from_brace = held.trim_start_matches(|c: char| c.is_whitespace() || c == ';').to_string();
                        (self.start_call(""), Some(from_brace))
                    }
                    Matched::Partial if held.len() <= MAX_PROBE => (Stage::Probe(held), None),
                    _ => (Stage::Text(String::new()), Some(held)),
                }
            }
            Stage::Call(mut cs) => {
                cs.raw.push(c);
                self.fallback.push(c);
                if cs.raw.len() > MAX_CALL_BYTES {
                    return (self.fail(ParseProblem::CallTooLong { index: cs.index, limit: MAX_CALL_BYTES }), None);
                }
                let closed = cs.scan.feed(c);
                if let Some(fail) = self.call_phase(&mut cs, c) {
                    return (self.fail(fail), None);
                }
                if closed {
                    return (self.end_call(*cs), None);
                }
                (Stage::Call(cs), None)
            }
            Stage::After(mut held) => {
                held.push(c);
                match self.format {
                    Some(ToolFormat::Hermes) => match seq_match(&held, HERMES_CLOSE) {
                        Matched::Full => (Stage::Text(String::new()), None),
                        Matched::Partial => (Stage::After(held), None),
                        // No close tag: the call stands, what follows is content.
                        Matched::No => (Stage::Text(String::new()), Some(held)),
                    },
                    _ => {
                        // Inside an array (Mistral, Generic).
                        let t = held.trim_start();
                        if t.is_empty() {
                            (Stage::After(held), None)
                        } else if t == "," {
                            self.fallback.clear();
                            (self.start_call(""), None)
                        } else if t == "]" {
                            self.fallback.clear();
                            if self.format == Some(ToolFormat::Generic) {
                                (Stage::GenericEnd(String::new()), None)
                            } else {
                                (Stage::Text(String::new()), None)
                            }
                        } else {
                            self.fallback.clear();
                            (Stage::Text(String::new()), Some(t.to_string()))
                        }
                    }
                }
            }
            Stage::MistralHead => {
                self.fallback.push(c);
                if c.is_whitespace() {
                    (Stage::MistralHead, None)
                } else if c == '[' {
                    (self.start_call(""), None)
                } else if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    (Stage::MistralName(c.to_string()), None)
                } else {
                    (self.fail(ParseProblem::MalformedCall { index: self.calls.len(), what: "[TOOL_CALLS] is followed by neither '[' nor a name" }), None)
                }
            }
            Stage::MistralName(mut name) => {
                self.fallback.push(c);
                name.push(c);
                if let Some(n) = name.strip_suffix("[ARGS]") {
                    if crate::check_name(n).is_err() {
                        return (self.fail(ParseProblem::MalformedCall { index: self.calls.len(), what: "the function name is not valid" }), None);
                    }
                    let index = self.calls.len();
                    let mut cs = CallState::new(index);
                    cs.id = Some(self.begin_call(index, n));
                    cs.name = Some(n.to_string());
                    cs.args_only = true;
                    return (Stage::Call(Box::new(cs)), None);
                }
                if name.len() > crate::MAX_NAME_LEN + "[ARGS]".len() {
                    return (self.fail(ParseProblem::MalformedCall { index: self.calls.len(), what: "no [ARGS] after the function name" }), None);
                }
                (Stage::MistralName(name), None)
            }
            Stage::GenericContent(mut dec) => match dec.feed(c) {
                Decoded::Char(ch) => {
                    self.out_char(Kind::Content, ch);
                    (Stage::GenericContent(dec), None)
                }
                Decoded::Nothing => (Stage::GenericContent(dec), None),
                Decoded::End => (Stage::GenericEnd(String::new()), None),
            },
            Stage::GenericEnd(mut held) => {
                held.push(c);
                match seq_match(&held, GENERIC_END) {
                    Matched::Full => (Stage::Passthrough, None),
                    Matched::Partial => (Stage::GenericEnd(held), None),
                    Matched::No => (Stage::Passthrough, Some(held)),
                }
            }
        }
    }

    /// The fast path over one character of a call's object; `Some` when it cannot be a call.
    fn call_phase(&mut self, cs: &mut CallState, c: char) -> Option<ParseProblem> {
        let ws = c.is_whitespace();
        let phase = std::mem::replace(&mut cs.phase, Phase::Slow);
        cs.phase = match phase {
            Phase::Open if ws => Phase::Open,
            Phase::Open if c == '{' && cs.args_only => {
                cs.args.push(c);
                self.args_out(cs.index, "{");
                let mut scan = JsonScan::default();
                scan.feed(c);
                Phase::Args(scan)
            }
            Phase::Open if c == '{' => Phase::KeyStart,
            Phase::Open => return Some(ParseProblem::MalformedCall { index: cs.index, what: "it does not start with '{'" }),
            Phase::KeyStart if ws => Phase::KeyStart,
            Phase::KeyStart if c == '"' => Phase::Key(String::new(), false),
            Phase::Key(mut k, esc) => {
                if !esc && c == '"' {
                    Phase::Colon(k)
                } else if k.len() > 64 {
                    Phase::Slow
                } else {
                    k.push(c);
                    Phase::Key(k, !esc && c == '\\')
                }
            }
            Phase::Colon(k) if ws => Phase::Colon(k),
            Phase::Colon(k) if c == ':' => Phase::Value(k),
            Phase::Value(k) if ws => Phase::Value(k),
            Phase::Value(k) if k == "name" && c == '"' && cs.name.is_none() => Phase::Name(String::new(), false),
            Phase::Value(k) if (k == "arguments" || k == "parameters") && c == '{' && !cs.args_done && cs.name.is_some() => {
                cs.args.push(c);
                self.args_out(cs.index, "{");
                let mut scan = JsonScan::default();
                scan.feed(c);
                Phase::Args(scan)
            }
            Phase::Name(mut n, esc) => {
                if !esc && c == '"' {
                    cs.id = Some(self.begin_call(cs.index, &n));
                    cs.name = Some(n);
                    Phase::AfterValue
                } else if n.len() > 256 || esc || c == '\\' {
                    // Names are plain identifiers; anything else is read the slow way.
                    Phase::Slow
                } else {
                    n.push(c);
                    Phase::Name(n, false)
                }
            }
            Phase::Args(mut scan) => {
                cs.args.push(c);
                let mut b = [0u8; 4];
                self.args_out(cs.index, c.encode_utf8(&mut b));
                if scan.feed(c) {
                    cs.args_done = true;
                    Phase::AfterValue
                } else {
                    Phase::Args(scan)
                }
            }
            Phase::AfterValue if ws => Phase::AfterValue,
            Phase::AfterValue if c == ',' => Phase::KeyStart,
            Phase::AfterValue if c == '}' => Phase::AfterValue,
            _ => Phase::Slow,
        };
        None
    }

    /// A call's object closed: the call is taken, or its text becomes content.
    fn end_call(&mut self, cs: CallState) -> Stage {
        let index = cs.index;
        let fast = !matches!(cs.phase, Phase::Slow) && cs.args_done;
        let mut id = cs.id.clone();
        let (name, arguments) = if fast {
            (cs.name.clone().unwrap_or_default(), cs.args)
        } else {
            let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(&cs.raw) else {
                return self.fail(ParseProblem::MalformedCall { index, what: "it is not a JSON object" });
            };
            let Some(name) = cs.name.clone().or_else(|| obj.get("name").and_then(|n| n.as_str()).map(str::to_string)) else {
                return self.fail(ParseProblem::MalformedCall { index, what: "it has no \"name\"" });
            };
            let arguments = if cs.args_done {
                cs.args
            } else {
                let text = match obj.get("arguments").or_else(|| obj.get("parameters")) {
                    None => "{}".to_string(),
                    // OpenAI's own shape: the arguments already as JSON text.
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(v @ serde_json::Value::Object(_)) => v.to_string(),
                    Some(_) => return self.fail(ParseProblem::MalformedCall { index, what: "its arguments are not an object" }),
                };
                if id.is_none() {
                    id = Some(self.begin_call(index, &name));
                }
                self.args_out(index, &text);
                text
            };
            (name, arguments)
        };
        let id = id.unwrap_or_else(|| self.ids.next());
        self.calls.push(ParsedToolCall { id, name, arguments });
        self.fallback.clear();
        match self.format {
            Some(ToolFormat::Llama3) => Stage::Probe(String::new()),
            Some(ToolFormat::Mistral) if cs.args_only => Stage::Text(String::new()),
            _ => Stage::After(String::new()),
        }
    }
}
