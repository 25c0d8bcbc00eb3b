//! A checker of llama.cpp's GBNF grammar syntax, run before llama.cpp sees the text.
//!
//! It follows `llama_grammar_parser::parse` (src/llama-grammar.cpp) rule for rule, so it
//! accepts what llama.cpp accepts, and reports the first problem as `line L, column C:
//! <what>` (llama.cpp's own parser writes its message and the whole grammar to stderr and
//! returns only "failed to parse grammar"). It also keeps the bounds of
//! [`crate::grammar_bounds`] (nesting, repetition counts, rule count), and checks what
//! llama.cpp checks after parsing: every referenced rule is defined, the root rule exists.
//! Whether a `<token>` is one token of the vocabulary stays llama.cpp's to report.
//!
//! It also builds the rule graph llama.cpp builds (groups and repetitions become generated
//! rules, as in `parse_sequence`/`handle_repetitions`) and does llama.cpp's
//! left-recursion check itself, in linear time: llama.cpp's
//! `llama_grammar_detect_left_recursion` never reads its `rules_visited`, so it re-explores
//! a shared sub-rule on every path to it (a 1 KB chain `r0 ::= r1 | r1`, `r1 ::= r2 | r2`,
//! ... takes 2^60 calls inside `llama_sampler_init_grammar`, uncancellable). Left recursion
//! is refused here by name, and so is a grammar whose check would make more than
//! [`MAX_LEFT_RECURSION_CALLS`] calls, counted by dynamic programming over the graph: what
//! reaches llama.cpp is cheap for it to check.
//!
//! One pass, each byte read a bounded number of times; the only recursion is one frame per
//! parenthesis level, at most `MAX_NESTING` deep (the graph walks are iterative).

use std::collections::{HashMap, HashSet};

use crate::grammar_bounds::{MAX_EXPANDED_ELEMENTS, MAX_LEFTMOST_PATHS, MAX_LEFT_RECURSION_CALLS, MAX_NESTING, MAX_REPETITION, MAX_REPETITION_SUM, MAX_RULES};

/// Checks `text` as llama.cpp's parser would, with `root` as the rule that must exist.
pub fn check(text: &str, root: &str) -> Result<(), String> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
        depth: 0,
        rules: 0,
        rep_sum: 0,
        expanded: 0,
        defined: HashSet::new(),
        refs: Vec::new(),
        symbols: HashMap::new(),
        n_symbols: 0,
        graph: Vec::new(),
        owners: Vec::new(),
        owner: 0,
    };
    p.grammar().map_err(|(at, what)| format!("{}: {what}", location(text, at)))?;
    // llama.cpp's checks after the parse, at the first reference of a missing rule.
    if let Some((name, at)) = p.refs.iter().find(|(name, _)| !p.defined.contains(name)) {
        return Err(format!("{}: undefined rule '{}'", location(text, *at), String::from_utf8_lossy(name)));
    }
    if !p.defined.contains(root.as_bytes()) {
        return Err(format!("no rule '{root}' (the root rule)"));
    }
    p.left_recursion_check().map_err(|(at, what)| format!("{}: {what}", location(text, at)))
}

/// `line L, column C` of byte offset `at` (both from 1; the column counts characters).
fn location(text: &str, at: usize) -> String {
    let before = &text.as_bytes()[..at.min(text.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    // Count characters, not bytes: UTF-8 continuation bytes do not start one.
    let column = 1 + before[line_start..].iter().filter(|&&b| b & 0xC0 != 0x80).count();
    format!("line {line}, column {column}")
}

type Fail = (usize, String);

/// An element of a sequence as the left-recursion check sees it: a reference to rule `id`
/// or anything else (a literal, class, token or `.`: text, which ends the leftmost walk).
#[derive(Clone, Copy)]
enum Elem {
    Ref(u32),
    Term,
}

/// One rule of llama.cpp's rule list: per alternative, the references before its first
/// element that is not one (all llama.cpp's check can walk into), and whether it is empty.
#[derive(Default)]
struct Rule {
    alts: Vec<(Vec<u32>, bool)>,
}

impl Rule {
    fn push_alt(&mut self, seq: &[Elem]) {
        let refs = seq.iter().map_while(|e| match e { Elem::Ref(id) => Some(*id), Elem::Term => None }).collect();
        self.alts.push((refs, seq.is_empty()));
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
    rules: usize,
    rep_sum: u64,
    /// Grammar elements the repetitions copy (llama.cpp writes each copy out).
    expanded: u64,
    defined: HashSet<&'a [u8]>,
    /// Every rule reference with where it is, in text order.
    refs: Vec<(&'a [u8], usize)>,
    /// llama.cpp's `symbol_ids`: rule name → id, in the order llama.cpp numbers them.
    symbols: HashMap<&'a [u8], u32>,
    /// `symbol_ids.size()`: named and generated rules so far.
    n_symbols: u32,
    /// llama.cpp's rule list by id (`None`: referenced, not defined yet).
    graph: Vec<Option<Rule>>,
    /// Per rule id, the named rule (its name and where its definition starts) whose text
    /// it comes from, for messages about generated rules.
    owners: Vec<(&'a [u8], usize)>,
    /// The index in `owners` of the rule being defined.
    owner: usize,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn at(&self, k: usize) -> Option<u8> {
        self.s.get(self.pos + k).copied()
    }

    fn fail<T>(&self, what: impl Into<String>) -> Result<T, Fail> {
        Err((self.pos, what.into()))
    }

    /// What is at the current position, for "expecting X, found Y".
    fn found(&self) -> String {
        match std::str::from_utf8(&self.s[self.pos..]).ok().and_then(|r| r.chars().next()) {
            None if self.pos >= self.s.len() => "the end of the text".into(),
            None => "a byte that is not UTF-8".into(),
            Some('\n') => "a newline".into(),
            Some('\r') => "a carriage return".into(),
            Some(c) => format!("'{c}'"),
        }
    }

    /// llama.cpp's `parse_space`: blanks and comments, and newlines where allowed.
    fn space(&mut self, newline_ok: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newline_ok => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\r' && c != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Result<&'a [u8], Fail> {
        let start = self.pos;
        while self.peek().is_some_and(is_word) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.fail(format!("expecting a rule name (letters, digits, '-'), found {}", self.found()));
        }
        Ok(&self.s[start..self.pos])
    }

    /// A decimal number (saturating, so a huge one is refused by the bounds, not wrapped).
    fn int(&mut self) -> Result<u64, Fail> {
        let start = self.pos;
        let mut n: u64 = 0;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            n = n.saturating_mul(10).saturating_add(u64::from(d - b'0'));
            self.pos += 1;
        }
        if self.pos == start {
            return self.fail(format!("expecting an integer, found {}", self.found()));
        }
        Ok(n)
    }

    fn grammar(&mut self) -> Result<(), Fail> {
        self.space(true);
        while self.peek().is_some() {
            self.rule()?;
        }
        Ok(())
    }

    /// llama.cpp's `get_symbol_id`: a name's id, numbered on first sight.
    fn symbol(&mut self, name: &'a [u8]) -> u32 {
        if let Some(&id) = self.symbols.get(name) {
            return id;
        }
        let id = self.n_symbols;
        self.symbols.insert(name, id);
        self.n_symbols += 1;
        id
    }

    /// llama.cpp's `generate_symbol_id`: a fresh id for a group or repetition rule.
    fn generated(&mut self) -> u32 {
        let id = self.n_symbols;
        self.n_symbols += 1;
        id
    }

    /// llama.cpp's `add_rule` (a later definition replaces an earlier one).
    fn add_rule(&mut self, id: u32, rule: Rule) {
        let i = id as usize;
        if self.graph.len() <= i {
            self.graph.resize_with(i + 1, || None);
            self.owners.resize(i + 1, (&[], 0));
        }
        self.graph[i] = Some(rule);
        self.owners[i] = self.owners.get(self.owner).copied().unwrap_or((&[], 0));
    }

    fn rule(&mut self) -> Result<(), Fail> {
        let name_at = self.pos;
        let name = self.name()?;
        self.space(false);
        if !self.s[self.pos..].starts_with(b"::=") {
            return self.fail(format!("expecting '::=' after the rule name, found {}", self.found()));
        }
        self.rules += 1;
        if self.rules > MAX_RULES {
            return self.fail(format!("more than {MAX_RULES} rules"));
        }
        self.defined.insert(name);
        let id = self.symbol(name);
        if self.owners.len() <= id as usize {
            self.graph.resize_with(id as usize + 1, || None);
            self.owners.resize(id as usize + 1, (&[], 0));
        }
        self.owners[id as usize] = (name, name_at);
        self.owner = id as usize;
        self.pos += 3;
        self.space(true);
        let rule = self.alternates(false)?;
        self.add_rule(id, rule);
        match self.peek() {
            Some(b'\r') => self.pos += if self.at(1) == Some(b'\n') { 2 } else { 1 },
            Some(b'\n') => self.pos += 1,
            None => {}
            Some(_) => return self.fail(format!("expecting a newline or the end of the rule, found {}", self.found())),
        }
        self.space(true);
        Ok(())
    }

    /// The alternatives of a rule or group, as the rule llama.cpp adds for them.
    fn alternates(&mut self, nested: bool) -> Result<Rule, Fail> {
        let mut rule = Rule::default();
        rule.push_alt(&self.sequence(nested)?);
        while self.peek() == Some(b'|') {
            self.pos += 1;
            self.space(true);
            rule.push_alt(&self.sequence(nested)?);
        }
        Ok(rule)
    }

    /// llama.cpp's `parse_char` inside a literal or class: an escape or one character.
    fn char(&mut self, unterminated: &str) -> Result<(), Fail> {
        match self.peek() {
            None => self.fail(unterminated),
            Some(b'\\') => {
                let hex = match self.at(1) {
                    Some(b'x') => 2,
                    Some(b'u') => 4,
                    Some(b'U') => 8,
                    Some(b't' | b'r' | b'n' | b'\\' | b'"' | b'[' | b']' | b'-') => 0,
                    None => return self.fail(unterminated),
                    Some(_) => {
                        self.pos += 1;
                        return self.fail(format!("unknown escape '\\{}' (known: \\x \\u \\U \\t \\n \\r \\\\ \\\" \\[ \\] \\-)", self.found().trim_matches('\'')));
                    }
                };
                let letter = self.at(1).unwrap_or(b'?') as char;
                self.pos += 2;
                for _ in 0..hex {
                    if !self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                        return self.fail(format!("expecting {hex} hex digits after '\\{letter}', found {}", self.found()));
                    }
                    self.pos += 1;
                }
                Ok(())
            }
            Some(_) => {
                // One UTF-8 character: its bytes after the first are never syntax.
                self.pos += 1;
                while self.peek().is_some_and(|c| c & 0xC0 == 0x80) {
                    self.pos += 1;
                }
                Ok(())
            }
        }
    }

    /// One alternative, as the sequence of elements llama.cpp's `parse_sequence` builds
    /// (repetitions expanded, their generated rules added).
    fn sequence(&mut self, nested: bool) -> Result<Vec<Elem>, Fail> {
        let mut seq: Vec<Elem> = Vec::new();
        // llama.cpp's `last_sym_start` (where the item a repetition repeats starts; nothing
        // to repeat when it is the end, as after an empty literal) and `n_prev_rules`.
        let mut last = 0;
        let mut n_prev: u64 = 1;
        // What one copy of that item costs llama.cpp: a literal or class is an element per
        // character, anything else one element (a reference or a token).
        let mut weight: u64 = 1;
        while let Some(c) = self.peek() {
            let start = self.pos;
            // Most items start a new item to repeat, with one rule.
            if c != b'*' && c != b'+' && c != b'?' && c != b'{' {
                last = seq.len();
                n_prev = 1;
                weight = 1;
            }
            match c {
                b'"' => {
                    self.pos += 1;
                    if self.peek() != Some(b'"') {
                        seq.push(Elem::Term);
                    }
                    while self.peek() != Some(b'"') {
                        if self.peek().is_none() {
                            return Err((start, "unterminated string (no closing '\"')".into()));
                        }
                        self.char("unterminated string (no closing '\"')").map_err(|e| if self.pos >= self.s.len() { (start, e.1) } else { e })?;
                    }
                    self.pos += 1;
                    weight = (self.pos - start) as u64;
                }
                b'[' => {
                    self.pos += 1;
                    if self.peek() == Some(b'^') {
                        self.pos += 1;
                    }
                    if self.peek() != Some(b']') {
                        seq.push(Elem::Term);
                    }
                    let unterminated = "unterminated character class (no closing ']')";
                    while self.peek() != Some(b']') {
                        if self.peek().is_none() {
                            return Err((start, unterminated.into()));
                        }
                        self.char(unterminated).map_err(|e| if self.pos >= self.s.len() { (start, e.1) } else { e })?;
                        if self.peek() == Some(b'-') && self.at(1) != Some(b']') {
                            if self.at(1).is_none() {
                                return Err((start, unterminated.into()));
                            }
                            self.pos += 1;
                            self.char(unterminated).map_err(|e| if self.pos >= self.s.len() { (start, e.1) } else { e })?;
                        }
                    }
                    self.pos += 1;
                    weight = (self.pos - start) as u64;
                }
                b'<' | b'!' => {
                    seq.push(Elem::Term);
                    if c == b'!' {
                        self.pos += 1;
                        if self.peek() != Some(b'<') {
                            return self.fail(format!("expecting '<' after '!' (a token to exclude), found {}", self.found()));
                        }
                    }
                    self.pos += 1;
                    if self.peek() == Some(b'[') {
                        // <[id]>: a token id.
                        self.pos += 1;
                        let id = self.int()?;
                        if id > u64::from(u32::MAX) {
                            return Err((start, format!("the token id {id} is too big")));
                        }
                        for close in [b']', b'>'] {
                            if self.peek() != Some(close) {
                                return self.fail(format!("expecting '{}', found {}", close as char, self.found()));
                            }
                            self.pos += 1;
                        }
                    } else {
                        // <text>: a token by its text (llama.cpp checks it is one token).
                        while self.peek().is_some_and(|c| c != b'>') {
                            self.pos += 1;
                        }
                        if self.peek().is_none() {
                            return Err((start, "unterminated token (no closing '>')".into()));
                        }
                        self.pos += 1;
                    }
                }
                b'(' => {
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        return self.fail(format!("parentheses nest deeper than {MAX_NESTING}"));
                    }
                    self.pos += 1;
                    self.space(true);
                    let before = self.n_symbols;
                    let id = self.generated();
                    let rule = self.alternates(true)?;
                    self.add_rule(id, rule);
                    // llama.cpp counts the rules the group added, for its repetition bound.
                    n_prev = u64::from(self.n_symbols - before).max(1);
                    seq.push(Elem::Ref(id));
                    if self.peek() != Some(b')') {
                        return self.fail(format!("expecting ')' to close the '(' at {}, found {}", location_in(self.s, start), self.found()));
                    }
                    self.depth -= 1;
                    self.pos += 1;
                }
                b'.' => {
                    seq.push(Elem::Term);
                    self.pos += 1;
                }
                b'*' | b'+' | b'?' | b'{' => {
                    if last == seq.len() {
                        return self.fail(format!("nothing before '{}' to repeat", c as char));
                    }
                    self.pos += 1;
                    let (min, max) = match c {
                        b'*' => (0, None),
                        b'+' => (1, None),
                        b'?' => (0, Some(1)),
                        _ => self.counts(nested)?,
                    };
                    self.repeat(&mut seq, last, &mut n_prev, weight, min, max, start)?;
                    if c == b'{' {
                        // `counts` leaves the position after the blanks past the '}'.
                        continue;
                    }
                }
                c if is_word(c) => {
                    let name = self.name()?;
                    self.refs.push((name, start));
                    let id = self.symbol(name);
                    seq.push(Elem::Ref(id));
                }
                _ => break,
            }
            self.space(nested);
        }
        Ok(seq)
    }

    /// llama.cpp's `handle_repetitions`: `S{min,max}` (`max` `None`: no maximum) becomes
    /// `min` copies of S and a chain of generated rules `S' ::= S S'' | ` (one `S' ::= S S' | `
    /// without a maximum). `at` is the repetition operator, for the message.
    #[allow(clippy::too_many_arguments)]
    fn repeat(&mut self, seq: &mut Vec<Elem>, last: usize, n_prev: &mut u64, weight: u64, min: u64, max: Option<u64>, at: usize) -> Result<(), Fail> {
        let total = match max {
            Some(n) if n > 0 => n,
            _ if min > 0 => min,
            _ => 1,
        };
        // llama.cpp refuses (with MAX_REPETITION_THRESHOLD, 2,000) when the rules of the
        // repeated item times the count would be over it.
        if n_prev.saturating_mul(total) > MAX_REPETITION {
            return Err((at, format!("the repeated item holds {n_prev} rules and is repeated up to {total} times: over {MAX_REPETITION} rules")));
        }
        let item = seq[last..].to_vec();
        // llama.cpp copies the item once per count (`"<1 MB>"{2000}` would be gigabytes).
        let copies = min.max(max.unwrap_or(min)).max(1);
        self.expanded = self.expanded.saturating_add(weight.saturating_mul(copies));
        if self.expanded > MAX_EXPANDED_ELEMENTS {
            return Err((at, format!("the repetitions copy more than {MAX_EXPANDED_ELEMENTS} grammar elements (a long item repeated many times)")));
        }
        if min == 0 {
            seq.truncate(last);
        } else {
            for _ in 1..min {
                seq.extend_from_slice(&item);
            }
        }
        let n_opt = max.map_or(1, |n| n - min);
        let mut prev_id = 0;
        for i in 0..n_opt {
            let id = self.generated();
            let mut alt = item.clone();
            if max.is_none() {
                alt.push(Elem::Ref(id));
            } else if i > 0 {
                alt.push(Elem::Ref(prev_id));
            }
            let mut rule = Rule::default();
            rule.push_alt(&alt);
            rule.push_alt(&[]);
            self.add_rule(id, rule);
            prev_id = id;
        }
        if n_opt > 0 {
            seq.push(Elem::Ref(prev_id));
        }
        *n_prev = n_prev.saturating_mul(total);
        Ok(())
    }

    /// `{m}`, `{m,}` or `{m,n}` after the '{', blanks allowed around the numbers: the
    /// minimum and the maximum (`None`: none).
    fn counts(&mut self, nested: bool) -> Result<(u64, Option<u64>), Fail> {
        self.space(nested);
        if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
            return self.fail(format!("expecting a count after '{{', found {}", self.found()));
        }
        let count_at = self.pos;
        let m = self.int()?;
        self.space(nested);
        let mut n = None;
        match self.peek() {
            Some(b'}') => n = Some(m),
            Some(b',') => {
                self.pos += 1;
                self.space(nested);
                if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    n = Some(self.int()?);
                    self.space(nested);
                }
                if self.peek() != Some(b'}') {
                    return self.fail(format!("expecting '}}', found {}", self.found()));
                }
            }
            _ => return self.fail(format!("expecting ',' or '}}', found {}", self.found())),
        }
        // llama.cpp refuses a minimum over 2,000 but silently drops a maximum over it (the
        // repetition becomes unbounded): both are refused here.
        for c in [Some(m), n].into_iter().flatten() {
            if c > MAX_REPETITION {
                return Err((count_at, format!("the repetition count {c} is over {MAX_REPETITION}")));
            }
        }
        if n.is_some_and(|n| n < m) {
            return Err((count_at, format!("the repetition's maximum {} is below its minimum {m}", n.unwrap_or(0))));
        }
        self.rep_sum = self.rep_sum.saturating_add(n.unwrap_or(m));
        if self.rep_sum > MAX_REPETITION_SUM {
            return Err((count_at, format!("the repetition counts add up to more than {MAX_REPETITION_SUM}")));
        }
        self.pos += 1;
        self.space(nested);
        Ok((m, n))
    }

    /// llama.cpp's left-recursion check, done linearly. llama.cpp calls
    /// `llama_grammar_detect_left_recursion` once per rule; a call walks each alternative's
    /// leading rule references, going on to the next only while the one before "may be
    /// empty" (has an empty alternative), and a reference to a rule in progress is left
    /// recursion. So left recursion is a cycle of that "leftmost reference" graph, and
    /// without one, a rule's calls are 1 + the calls of each edge it walks: both computed
    /// here once per rule, in a post-order of an iterative depth-first search.
    fn left_recursion_check(&self) -> Result<(), Fail> {
        let n = self.graph.len();
        let may_be_empty: Vec<bool> =
            self.graph.iter().map(|r| r.as_ref().is_some_and(|r| r.alts.iter().any(|(_, empty)| *empty))).collect();
        let edges = |v: usize| -> Vec<usize> {
            let mut out = Vec::new();
            for (refs, _) in self.graph[v].iter().flat_map(|r| r.alts.iter()) {
                for &id in refs {
                    out.push(id as usize);
                    if !may_be_empty[id as usize] {
                        break;
                    }
                }
            }
            out
        };
        // 0: unseen, 1: on the stack, 2: done.
        let mut state = vec![0u8; n];
        let mut calls = vec![0u64; n];
        for start in 0..n {
            if state[start] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, Vec<usize>, usize)> = vec![(start, edges(start), 0)];
            state[start] = 1;
            while let Some((v, out, i)) = stack.last_mut() {
                if let Some(&w) = out.get(*i) {
                    *i += 1;
                    match state[w] {
                        0 => {
                            state[w] = 1;
                            let e = edges(w);
                            stack.push((w, e, 0));
                        }
                        1 => {
                            let (name, at) = self.owners[w];
                            let name = String::from_utf8_lossy(name);
                            return Err((at, format!("rule '{name}' is left-recursive (it can reach itself again before matching any text), which llama.cpp does not support")));
                        }
                        _ => {}
                    }
                } else {
                    let v = *v;
                    calls[v] = out.iter().fold(1u64, |sum, &w| sum.saturating_add(calls[w]));
                    state[v] = 2;
                    stack.pop();
                }
            }
        }
        let total = calls.iter().fold(0u64, |sum, &c| sum.saturating_add(c));
        if total > MAX_LEFT_RECURSION_CALLS {
            // Name where the paths multiply: the costliest rule that walks into two or
            // more sub-rules (else the costliest one).
            let costliest = |branching: bool| (0..n).filter(|&v| !branching || edges(v).len() > 1).max_by_key(|&v| calls[v]);
            let worst = costliest(true).or_else(|| costliest(false)).unwrap_or(0);
            let (name, at) = self.owners[worst];
            let name = String::from_utf8_lossy(name);
            let shown = if calls[worst] == u64::MAX { "2^64".to_string() } else { calls[worst].to_string() };
            return Err((
                at,
                format!(
                    "rule '{name}' has too many paths for the left-recursion check: llama.cpp would follow {shown} of them \
                     (over {MAX_LEFT_RECURSION_CALLS} in the grammar; it walks a sub-rule again on every path to it)"
                ),
            ));
        }
        // The stacks llama.cpp builds for a rule are its leftmost paths: a rule that starts in
        // very many ways costs quadratic time to set up (its stacks are de-duplicated by a
        // linear search), before any token.
        if let Some(v) = (0..n).filter(|&v| calls[v] > MAX_LEFTMOST_PATHS).max_by_key(|&v| calls[v]) {
            let (name, at) = self.owners[v];
            let name = String::from_utf8_lossy(name);
            return Err((at, format!("rule '{name}' starts in more than {MAX_LEFTMOST_PATHS} ways (through its sub-rules); llama.cpp would build a parse stack for each")));
        }
        Ok(())
    }
}

fn location_in(s: &[u8], at: usize) -> String {
    // The text came in as &str, so it is UTF-8.
    location(std::str::from_utf8(s).unwrap_or(""), at)
}

#[cfg(test)]
mod tests {
    use super::check;

    /// llama.cpp's grammars/json.gbnf, as a JSON grammar looks (multi-line groups,
    /// escapes in classes, counted repetitions, an empty first alternative).
    const JSON: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

    /// What a JSON-schema converter emits (llama.cpp's json_schema_to_grammar style).
    const SCHEMA: &str = r#"char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})
integral-part ::= [0] | [1-9] [0-9]{0,15}
name-kv ::= "\"name\"" space ":" space string
age-kv ::= "\"age\"" space ":" space integer
integer ::= ("-"? integral-part) space
root ::= "{" space name-kv ( "," space ( age-kv ) )? "}" space
space ::= | " " | "\n"{1,2} [ \t]{0,20}
string ::= "\"" char* "\"" space
tags ::= "[" space (string ("," space string){0,9})? "]" space
"#;

    /// Each a grammar llama.cpp parses (from its grammars/ and tests), written here.
    const ACCEPTED: &[&str] = &[
        JSON,
        SCHEMA,
        "root ::= (expr \"=\" ws term \"\\n\")+\nexpr ::= term ([-+*/] term)*\nterm ::= ident | num | \"(\" ws expr \")\" ws\nident ::= [a-z] [a-z0-9_]* ws\nnum ::= [0-9]+ ws\nws ::= [ \\t\\n]*",
        "root ::= [^\\n]+ \"\\n\"\r\n\r\n# CRLF line ends\r\nother ::= \"x\"",
        "root ::= \"日本語\" [ぁ-ゟ]+ [\\u3000-\\u303F] [\\U0001F600-\\U0001F64F]?",
        "root ::= . .? \"\\x41\" [\\[\\]\\-] [a-] [^\\]] \"\\\"\\\\\"",
        "root ::= <think> !<[2]> <[123]>* \"x\"{3} \"y\"{0,} \"z\"{ 1 , 2 }",
        "root::=\"a\"|\"b\"\n\n\n   # only a comment\nx-Y-9 ::= root",
        "root ::= (\n  \"a\" # comment inside\n  | \"b\"\n)",
        "root ::= ",
        "root ::= \"a\"* \"b\"+*",
        // A rule defined twice: llama.cpp keeps the last.
        "root ::= \"a\"\nroot ::= \"b\"",
    ];

    #[test]
    fn grammars_llama_cpp_accepts_are_accepted() {
        for g in ACCEPTED {
            assert_eq!(check(g, "root"), Ok(()), "{g}");
        }
    }

    /// Every grammar llama.cpp ships, when its source tree is at hand (a reference
    /// checkout); without it, the embedded ones above stand for them.
    #[test]
    fn llama_cpps_own_grammars_are_accepted() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ref/src/llama.cpp/grammars");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        let mut seen = 0;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "gbnf") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(check(&text, "root"), Ok(()), "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen > 0, "no .gbnf file in {}", dir.display());
    }

    fn refused(g: &str) -> String {
        check(g, "root").expect_err(&g[..g.len().min(80)])
    }

    #[test]
    fn problems_are_reported_with_their_line_and_column() {
        for (g, says) in [
            ("root ::= \"unterminated", "line 1, column 10: unterminated string (no closing '\"')"),
            ("root ::= [a-z", "line 1, column 10: unterminated character class"),
            ("root ::= foo", "line 1, column 10: undefined rule 'foo'"),
            ("other ::= \"a\"", "no rule 'root' (the root rule)"),
            ("root ::= (\"a\" | \"b\"\n", "line 2, column 1: expecting ')' to close the '(' at line 1, column 10, found the end of the text"),
            ("root ::= \"a\"\nx ::= (\"b\"}", "line 2, column 11: expecting ')' to close the '(' at line 2, column 7, found '}'"),
            ("root = \"a\"", "line 1, column 6: expecting '::=' after the rule name, found '='"),
            ("root ::= \"a\" \"b\" )", "line 1, column 18: expecting a newline or the end of the rule, found ')'"),
            ("root ::= \"\\q\"", "line 1, column 12: unknown escape '\\q'"),
            ("root ::= \"\\x4\"", "line 1, column 14: expecting 2 hex digits after '\\x', found '\"'"),
            ("root ::= * \"a\"", "line 1, column 10: nothing before '*' to repeat"),
            ("root ::= \"a\"{,3}", "line 1, column 14: expecting a count after '{', found ','"),
            ("root ::= \"a\"{3,1}", "line 1, column 14: the repetition's maximum 1 is below its minimum 3"),
            ("root ::= \"a\"{2 3}", "line 1, column 16: expecting ',' or '}', found '3'"),
            ("root ::= <[12x]>", "line 1, column 14: expecting ']', found 'x'"),
            ("root ::= <oops", "line 1, column 10: unterminated token"),
            ("root ::= !\"a\"", "line 1, column 11: expecting '<' after '!'"),
            ("root ::= \"a\"\n| \"b\"", "line 2, column 1: expecting a rule name"),
            ("root ::= \"é\" ü", "line 1, column 14: expecting a newline or the end of the rule, found 'ü'"),
        ] {
            let e = refused(g);
            assert!(e.starts_with(says), "{g:?}:\n  got  {e}\n  want {says}");
        }
    }

    /// llama.cpp's left-recursion check re-walks a shared sub-rule on every path to it:
    /// this 1 KB chain would take it 2^61 calls. Refused here at once, naming the rule.
    #[test]
    fn a_grammar_with_exponentially_many_paths_for_the_left_recursion_check_is_refused() {
        let chain: String = (0..60).map(|i| format!("r{i} ::= r{} | r{}\n", i + 1, i + 1)).collect();
        let g = format!("root ::= r0\n{chain}r60 ::= \"x\"\n");
        let e = refused(&g);
        assert!(e.starts_with("line 2, column 1: rule 'r0' has too many paths for the left-recursion check"), "{e}");
        // A short chain is cheap for llama.cpp, and accepted.
        let chain: String = (0..10).map(|i| format!("r{i} ::= r{} | r{}\n", i + 1, i + 1)).collect();
        assert_eq!(check(&format!("root ::= r0\n{chain}r10 ::= \"x\"\n"), "root"), Ok(()));
        // Groups and repetitions are rules too: the same blow-up through them.
        let chain: String = (0..40).map(|i| format!("r{i} ::= (r{} | r{})+\n", i + 1, i + 1)).collect();
        let e = refused(&format!("root ::= r0\n{chain}r40 ::= \"x\"\n"));
        assert!(e.starts_with("line 2, column 1: rule 'r0' has too many paths"), "{e}");
    }

    #[test]
    fn left_recursion_is_refused_by_rule_name() {
        for (g, says) in [
            ("root ::= root \"a\" | \"b\"", "line 1, column 1: rule 'root' is left-recursive"),
            ("root ::= \"a\"\nx ::= y \"a\"\ny ::= \"b\" | x", "line 2, column 1: rule 'x' is left-recursive"),
            // Through a rule with an empty alternative, and through a group.
            ("root ::= e root \"x\" | \"y\"\ne ::= | \"e\"", "rule 'root' is left-recursive"),
            ("root ::= (\"x\" | root) \"y\"", "rule 'root' is left-recursive"),
            // `S*` where S may be empty: `S' ::= S S' | ` reaches itself.
            ("root ::= e*\ne ::= | \"e\"", "rule 'root' is left-recursive"),
            ("root ::= \"a\"**", "rule 'root' is left-recursive"),
        ] {
            let e = refused(g);
            assert!(e.starts_with(says) || e.contains(says), "{g:?}:\n  got  {e}\n  want {says}");
        }
        // Right recursion, and an empty rule only reached indirectly (llama.cpp's "may be
        // empty" is an empty alternative of the rule itself), are fine.
        for g in ["root ::= a\na ::= \"x\" a \"y\" | \"x\" a \"z\" | \"w\"", "root ::= f root | \"y\"\nf ::= g\ng ::= | \"g\""] {
            assert_eq!(check(g, "root"), Ok(()), "{g}");
        }
    }

    #[test]
    fn repetitions_are_bounded_as_llama_cpp_bounds_them() {
        assert_eq!(check("root ::= \"a\"{2000} \"b\"{0,2000} \"c\"{2000,}", "root"), Ok(()));
        // llama.cpp refuses a minimum over 2,000 and would make a maximum over it unbounded.
        assert_eq!(refused("root ::= \"a\"{2001}"), "line 1, column 14: the repetition count 2001 is over 2000");
        assert_eq!(refused("root ::= \"a\"{0,2001}"), "line 1, column 14: the repetition count 2001 is over 2000");
        // The rules of the repeated item times the count.
        let e = refused("root ::= (\"a\"{0,1000}){0,3}");
        assert!(e.starts_with("line 1, column 23: the repeated item holds 1001 rules and is repeated up to 3 times"), "{e}");
        assert_eq!(check("root ::= (\"a\"{0,999}){0,2}", "root"), Ok(()));
        // Repetitions of nothing (an empty literal or class), as llama.cpp.
        assert!(refused("root ::= \"\"*").contains("nothing before '*'"));
    }

    #[test]
    fn the_first_undefined_reference_is_reported() {
        assert_eq!(refused("root ::= a b\nb ::= c\na ::= \"x\""), "line 2, column 7: undefined rule 'c'");
        assert_eq!(check("start ::= \"x\"", "start"), Ok(()));
        assert_eq!(check("root ::= \"x\"", "start"), Err("no rule 'start' (the root rule)".into()));
    }

    /// llama.cpp builds one parse stack per leftmost path of a rule, and writes each
    /// repetition's copies out: both are bounded before it sees the grammar.
    #[test]
    fn many_leftmost_paths_and_huge_repetitions_are_refused() {
        // 13 levels of two alternatives each reaching the next: 2^13 = 8,192 leftmost paths
        // from r0, a few thousand calls in all (under the left-recursion cap).
        let chain: String = (0..13).map(|i| format!("r{i} ::= r{} \"a\" | r{} \"b\"\n", i + 1, i + 1)).collect();
        let e = refused(&format!("root ::= r0\n{chain}r13 ::= \"x\"\n"));
        assert!(e.contains("starts in more than 4096 ways"), "{e}");
        let chain: String = (0..8).map(|i| format!("r{i} ::= r{} \"a\" | r{} \"b\"\n", i + 1, i + 1)).collect();
        assert_eq!(check(&format!("root ::= r0\n{chain}r8 ::= \"x\"\n"), "root"), Ok(()));
        // A 4,000-character literal copied 2,000 times: 8,000,000 elements.
        let e = refused(&format!("root ::= \"{}\"{{2000}}", "a".repeat(4000)));
        assert!(e.contains("copy more than 4000000 grammar elements"), "{e}");
        assert_eq!(check(&format!("root ::= \"{}\"{{0,100}}", "a".repeat(4000)), "root"), Ok(()));
    }

    /// One pass over a megabyte of nesting-free text: no recursion per item, no quadratic
    /// rescans (a regression guard, not a timing claim: it would take minutes if quadratic).
    #[test]
    fn a_large_grammar_is_checked_in_one_pass() {
        let g = format!("root ::= {}\n", "(\"a\" [b-c]* x{0,5} | ws) ".repeat(30_000)) + "x ::= \"x\"\nws ::= [ \\t]*\n";
        assert!(g.len() < (1 << 20));
        assert!(refused(&g).contains("repetition counts add up"));
        let g = format!("root ::= {}\n", "(\"a\" [b-c]* x | ws) ".repeat(40_000)) + "x ::= \"x\"\nws ::= [ \\t]*\n";
        assert!(check(&g, "root").is_ok());
    }
}
