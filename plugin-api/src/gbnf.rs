//! A checker of llama.cpp's GBNF grammar syntax, run before llama.cpp sees the text.
//!
//! It follows `llama_grammar_parser::parse` (src/llama-grammar.cpp) rule for rule, so it
//! accepts what llama.cpp accepts, and reports the first problem as `line L, column C:
//! <what>` (llama.cpp's own parser writes its message and the whole grammar to stderr and
//! returns only "failed to parse grammar"). It also keeps the bounds of
//! [`crate::grammar_bounds`] (nesting, repetition counts, rule count), and checks what
//! llama.cpp checks after parsing: every referenced rule is defined, the root rule exists.
//! Left recursion and whether a `<token>` is one token of the vocabulary stay llama.cpp's
//! to report. One pass, each byte read a bounded number of times; the only recursion is
//! one frame per parenthesis level, at most `MAX_NESTING` deep.

use std::collections::HashSet;

use crate::grammar_bounds::{MAX_NESTING, MAX_REPETITION, MAX_REPETITION_SUM, MAX_RULES};

/// Checks `text` as llama.cpp's parser would, with `root` as the rule that must exist.
pub fn check(text: &str, root: &str) -> Result<(), String> {
    let mut p = Parser { s: text.as_bytes(), pos: 0, depth: 0, rules: 0, rep_sum: 0, defined: HashSet::new(), refs: Vec::new() };
    p.grammar().map_err(|(at, what)| format!("{}: {what}", location(text, at)))?;
    // llama.cpp's checks after the parse, at the first reference of a missing rule.
    if let Some((name, at)) = p.refs.iter().find(|(name, _)| !p.defined.contains(name)) {
        return Err(format!("{}: undefined rule '{}'", location(text, *at), String::from_utf8_lossy(name)));
    }
    if !p.defined.contains(root.as_bytes()) {
        return Err(format!("no rule '{root}' (the root rule)"));
    }
    Ok(())
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

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
    rules: usize,
    rep_sum: u64,
    defined: HashSet<&'a [u8]>,
    /// Every rule reference with where it is, in text order.
    refs: Vec<(&'a [u8], usize)>,
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

    fn rule(&mut self) -> Result<(), Fail> {
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
        self.pos += 3;
        self.space(true);
        self.alternates(false)?;
        match self.peek() {
            Some(b'\r') => self.pos += if self.at(1) == Some(b'\n') { 2 } else { 1 },
            Some(b'\n') => self.pos += 1,
            None => {}
            Some(_) => return self.fail(format!("expecting a newline or the end of the rule, found {}", self.found())),
        }
        self.space(true);
        Ok(())
    }

    fn alternates(&mut self, nested: bool) -> Result<(), Fail> {
        self.sequence(nested)?;
        while self.peek() == Some(b'|') {
            self.pos += 1;
            self.space(true);
            self.sequence(nested)?;
        }
        Ok(())
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

    fn sequence(&mut self, nested: bool) -> Result<(), Fail> {
        // Whether an item precedes, for `*`, `+`, `?` and `{...}` to repeat.
        let mut item = false;
        while let Some(c) = self.peek() {
            let start = self.pos;
            match c {
                b'"' => {
                    self.pos += 1;
                    while self.peek() != Some(b'"') {
                        if self.peek().is_none() {
                            return Err((start, "unterminated string (no closing '\"')".into()));
                        }
                        self.char("unterminated string (no closing '\"')").map_err(|e| if self.pos >= self.s.len() { (start, e.1) } else { e })?;
                    }
                    self.pos += 1;
                }
                b'[' => {
                    self.pos += 1;
                    if self.peek() == Some(b'^') {
                        self.pos += 1;
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
                }
                b'<' | b'!' => {
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
                    self.alternates(true)?;
                    if self.peek() != Some(b')') {
                        return self.fail(format!("expecting ')' to close the '(' at {}, found {}", location_in(self.s, start), self.found()));
                    }
                    self.depth -= 1;
                    self.pos += 1;
                }
                b'.' => self.pos += 1,
                b'*' | b'+' | b'?' | b'{' => {
                    if !item {
                        return self.fail(format!("nothing before '{}' to repeat", c as char));
                    }
                    self.pos += 1;
                    if c == b'{' {
                        self.counts(nested)?;
                        // `counts` leaves the position after the blanks past the '}'.
                        continue;
                    }
                }
                c if is_word(c) => {
                    let name = self.name()?;
                    self.refs.push((name, start));
                }
                _ => break,
            }
            item = true;
            self.space(nested);
        }
        Ok(())
    }

    /// `{m}`, `{m,}` or `{m,n}` after the '{', blanks allowed around the numbers.
    fn counts(&mut self, nested: bool) -> Result<(), Fail> {
        self.space(nested);
        if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
            return self.fail(format!("expecting a count after '{{', found {}", self.found()));
        }
        let count_at = self.pos;
        let m = self.int()?;
        self.space(nested);
        let mut n = None;
        match self.peek() {
            Some(b'}') => {}
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
        "root ::= \"a\"**",
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

    #[test]
    fn the_first_undefined_reference_is_reported() {
        assert_eq!(refused("root ::= a b\nb ::= c\na ::= \"x\""), "line 2, column 7: undefined rule 'c'");
        assert_eq!(check("start ::= \"x\"", "start"), Ok(()));
        assert_eq!(check("root ::= \"x\"", "start"), Err("no rule 'start' (the root rule)".into()));
    }

    /// One pass over a megabyte of nesting-free text: no recursion per item, no quadratic
    /// rescans (a regression guard, not a timing claim: it would take minutes if quadratic).
    #[test]
    fn a_large_grammar_is_checked_in_one_pass() {
        let g = format!("root ::= {}\n", "(\"a\" [b-c]* x{0,5} | ws) ".repeat(30_000)) + "x ::= \"x\"\nws ::= [ \\t]*\n";
        assert!(g.len() < (1 << 20));
        let t = std::time::Instant::now();
        assert!(refused(&g).contains("repetition counts add up"));
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        let g = format!("root ::= {}\n", "(\"a\" [b-c]* x | ws) ".repeat(40_000)) + "x ::= \"x\"\nws ::= [ \\t]*\n";
        assert!(check(&g, "root").is_ok());
    }
}
