//! A parser for the GBNF subset we emit, and the checks `finish` runs over the whole
//! grammar: dangling references, repetition budget, productivity (every rule derives some
//! finite string) and left recursion (which llama.cpp's engine refuses).
//! Everything here is iterative or depth-bounded: rule bodies can come from callers.

use std::collections::{BTreeMap, HashMap, HashSet};

/// Deepest parenthesis nesting accepted in one rule body.
const MAX_GROUP_DEPTH: usize = 256;

/// Alternatives, each a sequence of terms.
pub(crate) type Alts = Vec<Vec<Term>>;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Term {
    pub atom: Atom,
    pub min: u32,
    /// `None` = unbounded.
    pub max: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Atom {
    Lit(Vec<char>),
    Class { negated: bool, ranges: Vec<(char, char)> },
    /// `.`: any character.
    Any,
    Ref(String),
    Group(Alts),
}

struct Parser<'a> {
    s: &'a [char],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn skip_space(&mut self, nested: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.i += 1,
                '\n' | '\r' if nested => self.i += 1,
                '#' => {
                    while let Some(c) = self.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at offset {}", self.i))
    }

    fn hex(&mut self, n: usize) -> Result<char, String> {
        let mut v: u32 = 0;
        for _ in 0..n {
            let d = match self.peek().and_then(|c| c.to_digit(16)) {
                Some(d) => d,
                None => return self.err("bad hex escape"),
            };
            v = v * 16 + d;
            self.i += 1;
        }
        match char::from_u32(v) {
            Some(c) => Ok(c),
            None => self.err("escape is not a Unicode scalar value"),
        }
    }

    /// One (possibly escaped) character, as llama.cpp's `parse_char` reads it.
    fn character(&mut self) -> Result<char, String> {
        let c = match self.peek() {
            Some(c) => c,
            None => return self.err("unexpected end"),
        };
        self.i += 1;
        if c != '\\' {
            return Ok(c);
        }
        let e = match self.peek() {
            Some(e) => e,
            None => return self.err("unexpected end after backslash"),
        };
        self.i += 1;
        match e {
            'x' => self.hex(2),
            'u' => self.hex(4),
            'U' => self.hex(8),
            't' => Ok('\t'),
            'r' => Ok('\r'),
            'n' => Ok('\n'),
            '\\' | '"' | '[' | ']' | '-' => Ok(e),
            _ => self.err("unknown escape"),
        }
    }

    fn number(&mut self) -> Result<u32, String> {
        let start = self.i;
        while matches!(self.peek(), Some('0'..='9')) {
            self.i += 1;
        }
        if start == self.i {
            return self.err("expected a number");
        }
        let text: String = self.s[start..self.i].iter().collect();
        text.parse().or_else(|_| self.err("number too large"))
    }

    fn alternatives(&mut self, depth: usize, nested: bool) -> Result<Alts, String> {
        if depth > MAX_GROUP_DEPTH {
            return self.err("groups nest too deeply");
        }
        let mut alts = vec![self.sequence(depth, nested)?];
        while self.peek() == Some('|') {
            self.i += 1;
            self.skip_space(true);
            alts.push(self.sequence(depth, nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, depth: usize, nested: bool) -> Result<Vec<Term>, String> {
        let mut seq = Vec::new();
        loop {
            self.skip_space(nested);
            let atom = match self.peek() {
                None | Some('|') | Some(')') => break,
                Some('"') => {
                    self.i += 1;
                    let mut lit = Vec::new();
                    loop {
                        match self.peek() {
                            None => return self.err("unterminated literal"),
                            Some('"') => {
                                self.i += 1;
                                break;
                            }
                            _ => lit.push(self.character()?),
                        }
                    }
                    Atom::Lit(lit)
                }
                Some('[') => {
                    self.i += 1;
                    let negated = self.peek() == Some('^');
                    if negated {
                        self.i += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        match self.peek() {
                            None => return self.err("unterminated character class"),
                            Some(']') => {
                                self.i += 1;
                                break;
                            }
                            _ => {
                                let lo = self.character()?;
                                let mut hi = lo;
                                if self.peek() == Some('-') && self.s.get(self.i + 1) != Some(&']') {
                                    self.i += 1;
                                    hi = self.character()?;
                                }
                                ranges.push((lo, hi));
                            }
                        }
                    }
                    Atom::Class { negated, ranges }
                }
                Some('.') => {
                    self.i += 1;
                    Atom::Any
                }
                Some('(') => {
                    self.i += 1;
                    self.skip_space(true);
                    let alts = self.alternatives(depth + 1, true)?;
                    if self.peek() != Some(')') {
                        return self.err("expected ')'");
                    }
                    self.i += 1;
                    Atom::Group(alts)
                }
                Some(c) if c.is_ascii_alphanumeric() || c == '-' => {
                    let start = self.i;
                    while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '-') {
                        self.i += 1;
                    }
                    Atom::Ref(self.s[start..self.i].iter().collect())
                }
                Some(_) => return self.err("unexpected character"),
            };
            let (mut min, mut max) = (1, Some(1));
            match self.peek() {
                Some('*') => (min, max, self.i) = (0, None, self.i + 1),
                Some('+') => (min, max, self.i) = (1, None, self.i + 1),
                Some('?') => (min, max, self.i) = (0, Some(1), self.i + 1),
                Some('{') => {
                    self.i += 1;
                    self.skip_space(true);
                    min = self.number()?;
                    self.skip_space(true);
                    max = Some(min);
                    if self.peek() == Some(',') {
                        self.i += 1;
                        self.skip_space(true);
                        max = if matches!(self.peek(), Some('0'..='9')) { Some(self.number()?) } else { None };
                        self.skip_space(true);
                    }
                    if self.peek() != Some('}') {
                        return self.err("expected '}'");
                    }
                    self.i += 1;
                    if max.is_some_and(|m| m < min) {
                        return self.err("repetition maximum below minimum");
                    }
                }
                _ => {}
            }
            seq.push(Term { atom, min, max });
        }
        Ok(seq)
    }
}

/// Parses one rule body. Bodies are single-line outside groups, as in llama.cpp.
pub(crate) fn parse_body(body: &str) -> Result<Alts, String> {
    let chars: Vec<char> = body.chars().collect();
    let mut p = Parser { s: &chars, i: 0 };
    p.skip_space(false);
    let alts = p.alternatives(0, false)?;
    p.skip_space(false);
    if p.i != chars.len() {
        return p.err("unexpected text");
    }
    Ok(alts)
}

/// Parses a whole grammar of `name ::= body` lines (used by the tests' matcher).
#[cfg(test)]
pub(crate) fn parse_grammar(text: &str) -> Result<BTreeMap<String, Alts>, String> {
    let mut rules = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, body) = line.split_once(" ::= ").ok_or_else(|| format!("no '::=' in {line}"))?;
        rules.insert(name.trim().to_string(), parse_body(body)?);
    }
    Ok(rules)
}

/// Calls `f` on every term of `alts`, groups included (iteratively: bodies may nest).
fn for_each_term<'a>(alts: &'a Alts, mut f: impl FnMut(&'a Term)) {
    let mut stack: Vec<&'a Alts> = vec![alts];
    while let Some(alts) = stack.pop() {
        for term in alts.iter().flatten() {
            f(term);
            if let Atom::Group(inner) = &term.atom {
                stack.push(inner);
            }
        }
    }
}

/// The facts about a grammar that `finish` needs.
pub(crate) struct Analysis {
    /// A reference to a rule that does not exist: (from rule, missing name).
    pub dangling: Option<(String, String)>,
    /// Sum over every repetition of its largest finite bound (what llama.cpp expands).
    pub repetition_total: u64,
    /// First rule (by name) that derives no finite string.
    pub unproductive: Option<String>,
    /// A rule on a left-recursive cycle, or holding a `*`/`+` over something nullable.
    pub left_recursive: Option<String>,
    /// First rule (in grammar order) with a repetition llama.cpp's parser refuses.
    pub over_repetition: Option<String>,
}

/// llama.cpp's `MAX_REPETITION_THRESHOLD` (src/llama-grammar.cpp).
const LLAMA_REPETITION_THRESHOLD: u64 = crate::MAX_REPETITION as u64;

/// llama.cpp's accounting in `parse_sequence` over one body: returns how many symbols
/// parsing it generates, or `Err` at a repetition it refuses or would silently unbound.
/// It refuses a minimum above the threshold, reads a larger maximum as none, and refuses `x{m,n}` when the symbols `x` generated (1 for a terminal or rule
/// reference; for a group, the group, its inner groups and repetition rules, and every
/// rule name first met inside it) times n (or m when unbounded) exceeds the threshold.
/// `seen` holds the names met so far, in grammar order. Recursion is bounded by the
/// parser's group depth.
fn llama_symbols<'a>(alts: &'a Alts, seen: &mut HashSet<&'a str>) -> Result<u64, ()> {
    let mut generated = 0u64;
    for term in alts.iter().flatten() {
        let (n_prev, mut made) = match &term.atom {
            Atom::Ref(r) => (1, u64::from(seen.insert(r.as_str()))),
            Atom::Group(inner) => {
                let g = 1 + llama_symbols(inner, seen)?;
                (g, g)
            }
            _ => (1, 0),
        };
        if (term.min, term.max) != (1, Some(1)) {
            let min = u64::from(term.min);
            let max = term.max.map(u64::from);
            // llama.cpp refuses the minimum; the maximum it would read as "none", silently
            // unbounding the repetition, so we refuse that too.
            if min > LLAMA_REPETITION_THRESHOLD || max.is_some_and(|m| m > LLAMA_REPETITION_THRESHOLD) {
                return Err(());
            }
            let total = match max {
                Some(m) if m > 0 => m,
                _ if min > 0 => min,
                _ => 1,
            };
            if n_prev.saturating_mul(total) > LLAMA_REPETITION_THRESHOLD {
                return Err(());
            }
            made += max.map_or(1, |m| m - min);
        }
        generated = generated.saturating_add(made);
    }
    Ok(generated)
}

/// Whether llama.cpp would refuse a repetition in this body on its own (a body that
/// refers to no rules, as a `pattern`'s).
pub(crate) fn llama_refuses_repetition(alts: &Alts) -> bool {
    llama_symbols(alts, &mut HashSet::new()).is_err()
}

/// Evaluates a predicate ("nullable" or "productive") over a body given the rules'
/// current values. Recursion depth is bounded by the parser's group limit.
fn eval(alts: &Alts, known: &HashMap<&str, bool>, productive: bool) -> bool {
    alts.iter().any(|seq| seq.iter().all(|t| t.min == 0 || eval_atom(&t.atom, known, productive)))
}

fn eval_atom(atom: &Atom, known: &HashMap<&str, bool>, productive: bool) -> bool {
    match atom {
        Atom::Lit(l) => productive || l.is_empty(),
        Atom::Class { negated, ranges } => productive && (*negated || ranges.iter().any(|(a, b)| a <= b)),
        Atom::Any => productive,
        Atom::Ref(r) => known.get(r.as_str()).copied().unwrap_or(false),
        Atom::Group(inner) => eval(inner, known, productive),
    }
}

/// Least fixpoint of `eval` over all rules, driven by a worklist so that each rule is
/// re-evaluated only when one of the rules it refers to changes.
fn fixpoint<'a>(rules: &'a BTreeMap<String, Alts>, users: &HashMap<&'a str, Vec<&'a str>>, productive: bool) -> HashMap<&'a str, bool> {
    let mut known: HashMap<&str, bool> = rules.keys().map(|k| (k.as_str(), false)).collect();
    let mut work: Vec<&str> = rules.keys().map(|k| k.as_str()).collect();
    while let Some(name) = work.pop() {
        if known[name] {
            continue;
        }
        if eval(&rules[name], &known, productive) {
            known.insert(name, true);
            if let Some(u) = users.get(name) {
                work.extend(u.iter().copied());
            }
        }
    }
    known
}

pub(crate) fn analyse(rules: &BTreeMap<String, Alts>) -> Analysis {
    let mut dangling = None;
    let mut repetition_total: u64 = 0;
    let mut users: HashMap<&str, Vec<&str>> = HashMap::new();
    for (name, alts) in rules {
        for_each_term(alts, |t| {
            repetition_total += u64::from(t.max.unwrap_or(t.min).max(t.min));
            if let Atom::Ref(r) = &t.atom {
                if !rules.contains_key(r) && dangling.is_none() {
                    dangling = Some((name.clone(), r.clone()));
                }
                users.entry(r.as_str()).or_default().push(name.as_str());
            }
        });
    }
    // Once per user: a body naming one rule many times was re-evaluated (in full) once
    // per mention whenever that rule's value changed.
    for u in users.values_mut() {
        u.sort_unstable();
        u.dedup();
    }
    let mut over_repetition = None;
    let mut seen = HashSet::new();
    for (name, alts) in rules {
        seen.insert(name.as_str());
        if llama_symbols(alts, &mut seen).is_err() {
            over_repetition = Some(name.clone());
            break;
        }
    }
    let productive = fixpoint(rules, &users, true);
    let unproductive = rules.keys().find(|k| !productive[k.as_str()]).cloned();
    let nullable = fixpoint(rules, &users, false);

    // Edges "A may start with B at the same input position".
    let mut starts: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut left_recursive = None;
    for (name, alts) in rules {
        let mut stack: Vec<&Alts> = vec![alts];
        while let Some(alts) = stack.pop() {
            for seq in alts {
                for t in seq {
                    match &t.atom {
                        Atom::Ref(r) => starts.entry(name.as_str()).or_default().push(r.as_str()),
                        Atom::Group(inner) => stack.push(inner),
                        _ => {}
                    }
                    if !(t.min == 0 || atom_nullable(t, &nullable)) {
                        break;
                    }
                }
            }
        }
    }
    // llama.cpp expands `x*` to `r ::= x r |`: with x nullable, r starts with itself.
    for (name, alts) in rules {
        for_each_term(alts, |t| {
            if t.max.is_none() && left_recursive.is_none() && atom_nullable(t, &nullable) {
                left_recursive = Some(name.clone());
            }
        });
    }
    if left_recursive.is_none() {
        left_recursive = find_cycle(rules, &starts);
    }
    Analysis { dangling, repetition_total, unproductive, left_recursive, over_repetition }
}

/// Without cloning the atom (a group's clone, per term, per nesting level, was quadratic).
fn atom_nullable(t: &Term, nullable: &HashMap<&str, bool>) -> bool {
    eval_atom(&t.atom, nullable, false)
}

/// A rule on a cycle of `edges`, found by repeatedly removing rules with no outgoing
/// edge (Kahn's algorithm backwards: iterative, linear).
fn find_cycle(rules: &BTreeMap<String, Alts>, edges: &HashMap<&str, Vec<&str>>) -> Option<String> {
    let mut out_degree: HashMap<&str, usize> = rules.keys().map(|k| (k.as_str(), 0)).collect();
    let mut preds: HashMap<&str, Vec<&str>> = HashMap::new();
    for (from, tos) in edges {
        for to in tos {
            if out_degree.contains_key(to) {
                *out_degree.get_mut(from).expect("rule exists") += 1;
                preds.entry(*to).or_default().push(*from);
            }
        }
    }
    let mut ready: Vec<&str> = out_degree.iter().filter(|(_, d)| **d == 0).map(|(k, _)| *k).collect();
    while let Some(n) = ready.pop() {
        for p in preds.get(n).into_iter().flatten() {
            let d = out_degree.get_mut(p).expect("rule exists");
            *d -= 1;
            if *d == 0 {
                ready.push(p);
            }
        }
    }
    // What remains reaches a cycle, and every rule left has an edge to another rule left:
    // walking those edges from any of them must revisit a rule, which is on a cycle.
    // (A search from each remaining rule was quadratic.) Report the cycle's least name,
    // starting from the least rule left, so the answer is deterministic.
    let start = out_degree.iter().filter(|(_, d)| **d > 0).map(|(k, _)| *k).min()?;
    let mut order: HashMap<&str, usize> = HashMap::new();
    let mut walk: Vec<&str> = Vec::new();
    let mut at = start;
    loop {
        if let Some(&i) = order.get(at) {
            return walk[i..].iter().min().map(|s| s.to_string());
        }
        order.insert(at, walk.len());
        walk.push(at);
        at = edges.get(at).into_iter().flatten().copied().find(|n| out_degree.get(n).is_some_and(|d| *d > 0))?;
    }
}
