//! `pattern` (an ECMA-262 regex subset) → GBNF over the *JSON-encoded* string contents.
//!
//! The regex speaks about the decoded string, the grammar about the characters the model
//! writes between the quotes, so a `"` in the regex becomes `\"` in the grammar, and
//! classes never let a raw `"`, `\` or control character through (that would be invalid
//! JSON; llama.cpp's converter lets them through). Anything outside the subset is an
//! error, never a silent "any string".

use crate::{class_char, gbnf_literal_of, MAX_REPETITION};

/// Deepest group nesting accepted in a pattern.
const MAX_PATTERN_DEPTH: usize = 64;

#[derive(Debug)]
pub(crate) enum PatternError {
    /// Valid regex, but not in the subset (anchors missing, lookaround, `\b`...); the
    /// text says which feature, for debugging (the API error names the keyword only).
    #[allow(dead_code)]
    Unsupported(String),
    /// Not a valid regex at all.
    Invalid(String),
    /// A `{n,m}` count above [`MAX_REPETITION`].
    TooMany,
    /// A counted group whose count times the grammar rules llama.cpp expands the group to
    /// exceeds [`MAX_REPETITION`] (llama.cpp would refuse the grammar).
    TooManyRules,
}

type Alt = Vec<Vec<(Node, u32, Option<u32>)>>;

#[derive(Debug)]
enum Node {
    Char(char),
    /// Sorted, possibly overlapping ranges.
    Class { negated: bool, ranges: Vec<(char, char)> },
    Group(Alt),
}

const DIGIT: &[(char, char)] = &[('0', '9')];
const WORD: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];
const SPACE: &[(char, char)] = &[
    ('\t', '\r'),
    (' ', ' '),
    ('\u{a0}', '\u{a0}'),
    ('\u{1680}', '\u{1680}'),
    ('\u{2000}', '\u{200a}'),
    ('\u{2028}', '\u{2029}'),
    ('\u{202f}', '\u{202f}'),
    ('\u{205f}', '\u{205f}'),
    ('\u{3000}', '\u{3000}'),
    ('\u{feff}', '\u{feff}'),
];

struct Parser {
    s: Vec<char>,
    i: usize,
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, PatternError> {
    Err(PatternError::Unsupported(why.into()))
}

fn invalid<T>(why: impl Into<String>) -> Result<T, PatternError> {
    Err(PatternError::Invalid(why.into()))
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn alternation(&mut self, depth: usize) -> Result<Alt, PatternError> {
        if depth > MAX_PATTERN_DEPTH {
            return unsupported("groups nest too deeply");
        }
        let mut alts = vec![self.concat(depth)?];
        while self.peek() == Some('|') {
            self.i += 1;
            alts.push(self.concat(depth)?);
        }
        Ok(alts)
    }

    fn concat(&mut self, depth: usize) -> Result<Vec<(Node, u32, Option<u32>)>, PatternError> {
        let mut seq = Vec::new();
        while let Some(c) = self.peek() {
            let node = match c {
                '|' | ')' => break,
                '(' => {
                    self.i += 1;
                    if self.peek() == Some('?') {
                        if self.s.get(self.i + 1) == Some(&':') {
                            self.i += 2;
                        } else {
                            return unsupported("lookaround or named group '(?'");
                        }
                    }
                    let inner = self.alternation(depth + 1)?;
                    if self.peek() != Some(')') {
                        return invalid("unbalanced parentheses");
                    }
                    self.i += 1;
                    Node::Group(inner)
                }
                '[' => {
                    self.i += 1;
                    self.class()?
                }
                '.' => {
                    self.i += 1;
                    // ECMA-262's dot: anything but line terminators.
                    Node::Class { negated: true, ranges: vec![('\n', '\n'), ('\r', '\r'), ('\u{2028}', '\u{2029}')] }
                }
                '\\' => {
                    self.i += 1;
                    self.escape(false)?
                }
                '^' | '$' => return unsupported("anchor inside the pattern"),
                '*' | '+' | '?' => return invalid("nothing to repeat"),
                '{' | '}' | ']' => return unsupported(format!("bare '{c}'")),
                _ => {
                    self.i += 1;
                    Node::Char(c)
                }
            };
            let (min, max) = self.quantifier()?;
            seq.push((node, min, max));
        }
        Ok(seq)
    }

    fn quantifier(&mut self) -> Result<(u32, Option<u32>), PatternError> {
        let q = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                let close = match self.s[self.i..].iter().position(|&c| c == '}') {
                    Some(p) => self.i + p,
                    None => return unsupported("unterminated '{'"),
                };
                let body: String = self.s[self.i + 1..close].iter().collect();
                let num = |t: &str| -> Result<u32, PatternError> {
                    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                        return unsupported(format!("quantifier '{{{body}}}'"));
                    }
                    match t.parse::<u32>() {
                        Ok(n) if n as usize <= MAX_REPETITION => Ok(n),
                        _ => Err(PatternError::TooMany),
                    }
                };
                let (min, max) = match body.split_once(',') {
                    None => {
                        let n = num(&body)?;
                        (n, Some(n))
                    }
                    Some((a, "")) => (num(a)?, None),
                    Some((a, b)) => (num(a)?, Some(num(b)?)),
                };
                if max.is_some_and(|m| m < min) {
                    return invalid("quantifier range out of order");
                }
                self.i = close;
                (min, max)
            }
            _ => return Ok((1, Some(1))),
        };
        self.i += 1;
        // A lazy quantifier matches the same set of whole strings.
        if self.peek() == Some('?') {
            self.i += 1;
        }
        if matches!(self.peek(), Some('*' | '+' | '?' | '{')) {
            return invalid("nothing to repeat");
        }
        Ok(q)
    }

    /// After a backslash. Inside a class `\b` would be backspace; we keep it unsupported.
    fn escape(&mut self, in_class: bool) -> Result<Node, PatternError> {
        let c = match self.peek() {
            Some(c) => c,
            None => return invalid("trailing backslash"),
        };
        self.i += 1;
        let class = |r: &[(char, char)]| Node::Class { negated: false, ranges: r.to_vec() };
        Ok(match c {
            'd' => class(DIGIT),
            'w' => class(WORD),
            's' => class(SPACE),
            't' => Node::Char('\t'),
            'n' => Node::Char('\n'),
            'r' => Node::Char('\r'),
            'f' => Node::Char('\u{c}'),
            'v' => Node::Char('\u{b}'),
            '0' if !matches!(self.peek(), Some('0'..='9')) => Node::Char('\0'),
            'x' | 'u' => {
                let n = if c == 'x' { 2 } else { 4 };
                let hex: String = self.s.iter().skip(self.i).take(n).collect();
                match u32::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == n).and_then(char::from_u32) {
                    Some(ch) => {
                        self.i += n;
                        Node::Char(ch)
                    }
                    None => return unsupported(format!("escape '\\{c}{hex}'")),
                }
            }
            '-' if in_class => Node::Char('-'),
            c if c.is_ascii_punctuation() => Node::Char(c),
            c => return unsupported(format!("escape '\\{c}'")),
        })
    }

    fn class(&mut self) -> Result<Node, PatternError> {
        let negated = self.peek() == Some('^');
        if negated {
            self.i += 1;
        }
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let c = match self.peek() {
                Some(c) => c,
                None => return invalid("unterminated character class"),
            };
            if c == ']' {
                if first {
                    return unsupported("empty character class");
                }
                self.i += 1;
                break;
            }
            first = false;
            let lo = self.class_atom()?;
            if self.peek() == Some('-') && self.s.get(self.i + 1).is_some_and(|&n| n != ']') {
                self.i += 1;
                let hi = self.class_atom()?;
                match (lo, hi) {
                    (Node::Char(a), Node::Char(b)) if a <= b => ranges.push((a, b)),
                    (Node::Char(_), Node::Char(_)) => return invalid("character range out of order"),
                    _ => return unsupported("range bound is a class shorthand"),
                }
            } else {
                match lo {
                    Node::Char(a) => ranges.push((a, a)),
                    Node::Class { ranges: r, .. } => ranges.extend(r),
                    Node::Group(_) => unreachable!("class atoms are never groups"),
                }
            }
        }
        ranges.sort_unstable();
        Ok(Node::Class { negated, ranges })
    }

    fn class_atom(&mut self) -> Result<Node, PatternError> {
        let c = self.peek().unwrap_or_default();
        self.i += 1;
        if c == '\\' {
            if self.peek() == Some('b') {
                return unsupported("escape '\\b'");
            }
            return self.escape(true);
        }
        if c == '[' && matches!(self.peek(), Some(':' | '=' | '.')) {
            return unsupported("POSIX class syntax");
        }
        Ok(Node::Char(c))
    }
}

/// Characters that may not appear raw in a JSON string.
fn needs_json_escape(c: char) -> bool {
    c == '"' || c == '\\' || c < ' '
}

/// How the model writes `c` inside a JSON string (the one spelling we accept).
fn json_spelling(c: char) -> String {
    serde_json::to_string(&c.to_string()).map(|s| s[1..s.len() - 1].to_string()).unwrap_or_default()
}

/// `ranges` minus the characters that need escaping in JSON, as GBNF class contents.
fn plain_ranges(ranges: &[(char, char)]) -> Vec<(char, char)> {
    let mut out = Vec::new();
    for &(lo, hi) in ranges {
        // Split around the three holes: U+0000..U+001F, '"' and '\'.
        let mut pieces = vec![(lo.max(' '), hi)];
        for hole in ['"', '\\'] {
            pieces = pieces
                .into_iter()
                .flat_map(|(a, b)| {
                    if a > hole || b < hole {
                        vec![(a, b)]
                    } else {
                        let mut v = Vec::new();
                        if a < hole {
                            v.push((a, char::from_u32(hole as u32 - 1).unwrap_or(a)));
                        }
                        if b > hole {
                            v.push((char::from_u32(hole as u32 + 1).unwrap_or(b), b));
                        }
                        v
                    }
                })
                .collect();
        }
        out.extend(pieces.into_iter().filter(|(a, b)| a <= b));
    }
    out
}

fn class_text(negated: bool, ranges: &[(char, char)]) -> String {
    let mut s = String::from(if negated { "[^" } else { "[" });
    for &(a, b) in ranges {
        s.push_str(&class_char(a));
        if a != b {
            s.push('-');
            s.push_str(&class_char(b));
        }
    }
    s.push(']');
    s
}

fn render_class(negated: bool, ranges: &[(char, char)]) -> String {
    let contains = |c: char| ranges.iter().any(|&(a, b)| a <= c && c <= b);
    let mut alts = Vec::new();
    if negated {
        // Raw: anything not listed that JSON lets through raw. Escaped: the common escapes
        // of characters not listed (rarer \u00XX spellings are left out: narrower, sound).
        let mut excluded = ranges.to_vec();
        excluded.extend([('\0', '\u{1f}'), ('"', '"'), ('\\', '\\')]);
        alts.push(class_text(true, &excluded));
        for c in ['"', '\\', '\n', '\r', '\t'] {
            if !contains(c) {
                alts.push(gbnf_literal_of(&json_spelling(c)));
            }
        }
    } else {
        let plain = plain_ranges(ranges);
        if !plain.is_empty() {
            alts.push(class_text(false, &plain));
        }
        for &(a, b) in ranges {
            // At most 34 special characters exist, so this loop is short.
            for c in (a as u32..=(b as u32).min(0x5c)).filter_map(char::from_u32) {
                if needs_json_escape(c) {
                    alts.push(gbnf_literal_of(&json_spelling(c)));
                }
            }
        }
        alts.dedup();
    }
    if alts.len() == 1 {
        alts.pop().unwrap_or_default()
    } else {
        format!("({})", alts.join(" | "))
    }
}

fn render(alt: &Alt) -> String {
    let mut out_alts = Vec::new();
    for seq in alt {
        let mut parts: Vec<String> = Vec::new();
        let mut literal = String::new();
        for (node, min, max) in seq {
            let single = (*min, *max) == (1, Some(1));
            if let (Node::Char(c), true) = (node, single) {
                literal.push_str(&json_spelling(*c));
                continue;
            }
            if !literal.is_empty() {
                parts.push(gbnf_literal_of(&std::mem::take(&mut literal)));
            }
            let atom = match node {
                Node::Char(c) => gbnf_literal_of(&json_spelling(*c)),
                Node::Class { negated, ranges } => render_class(*negated, ranges),
                Node::Group(inner) => format!("({})", render(inner)),
            };
            let q = match (min, max) {
                (1, Some(1)) => String::new(),
                (0, None) => "*".into(),
                (1, None) => "+".into(),
                (0, Some(1)) => "?".into(),
                (m, None) => format!("{{{m},}}"),
                (m, Some(n)) if m == n => format!("{{{m}}}"),
                (m, Some(n)) => format!("{{{m},{n}}}"),
            };
            parts.push(atom + &q);
        }
        if !literal.is_empty() {
            parts.push(gbnf_literal_of(&literal));
        }
        out_alts.push(if parts.is_empty() { "\"\"".to_string() } else { parts.join(" ") });
    }
    out_alts.join(" | ")
}

/// The GBNF body for a JSON string whose decoded value matches `pattern`.
/// `^a|b$` is read as `^(a|b)$` (as llama.cpp does): a subset of what the regex
/// matches, so every accepted string still matches it.
pub(crate) fn pattern_to_gbnf(pattern: &str) -> Result<String, PatternError> {
    let chars: Vec<char> = pattern.chars().collect();
    let n = chars.len();
    let escaped_dollar = n >= 2 && chars[..n - 1].iter().rev().take_while(|&&c| c == '\\').count() % 2 == 1;
    if n < 2 || chars[0] != '^' || chars[n - 1] != '$' || escaped_dollar {
        return unsupported("pattern not anchored with ^...$");
    }
    let mut p = Parser { s: chars[1..n - 1].to_vec(), i: 0 };
    let alt = p.alternation(0)?;
    if p.i != p.s.len() {
        return invalid("unbalanced parentheses");
    }
    let body = format!("\"\\\"\" ({}) \"\\\"\"", render(&alt));
    // Checked here, where the pattern is named, rather than only in `finish`.
    match crate::gbnf::parse_body(&body) {
        Ok(alts) if crate::gbnf::llama_refuses_repetition(&alts) => Err(PatternError::TooManyRules),
        _ => Ok(body),
    }
}
