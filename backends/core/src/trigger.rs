//! The trigger search of a lazy grammar, in Rust: it watches the output until one of the
//! trigger patterns matches it (from its start, llama.cpp's semantics) and says where the
//! grammar takes over. Its cost per token must not grow with the output: every sequence of
//! the server shares one compute thread.
//!
//! llama.cpp's own search re-ran `std::regex_search` over the whole output after every
//! token (quadratic time; libstdc++ recurses per character, so it also needed a huge stack).
//! Here one lazy DFA of all the patterns (regex-automata's `hybrid` engine: linear, no
//! recursion, states built on demand into a bounded cache) keeps its state between tokens
//! and steps over each new token's bytes only. A match state means some pattern matches the
//! output so far; only then, once, the patterns run in order with captures over the output
//! to find where the grammar starts.

use llama_plugin_api::grammar_bounds::trigger_regex;
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::hybrid::LazyStateID;
use regex_automata::util::start;
use regex_automata::util::syntax;
use regex_automata::{nfa::thompson, Anchored};

/// Why the search cannot go on (the sequence fails with a grammar error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TriggerError(pub(crate) String);

pub(crate) struct TriggerSearch {
    /// All patterns, unanchored (a match may start anywhere; `^` still means the start).
    dfa: DFA,
    cache: Cache,
    /// The DFA's state after every byte of `text`.
    state: LazyStateID,
    /// The same patterns with captures, in order: run once, when the DFA reports a match.
    regexes: Vec<regex::bytes::Regex>,
    /// The output so far, as the grammar would see it (each token's piece, special tokens
    /// rendered). Needed whole: a `^`-anchored pattern's capture may start anywhere in it.
    /// Its size is bounded by the sequence's context (tokens × longest piece).
    text: Vec<u8>,
    /// Each token of `text` and where its piece ends, to replay them into the grammar.
    tokens: Vec<(i32, usize)>,
}

/// Where the grammar takes over, once a pattern matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fired {
    /// Byte offset in the output: the first non-empty capture group's start, else the
    /// match's (llama.cpp's `llama_grammar_trigger_pattern::find`).
    pub(crate) start: usize,
}

impl TriggerSearch {
    /// Compiles the patterns (already checked by `Grammar::validate` with the same syntax).
    pub(crate) fn new(patterns: &[&str]) -> Result<TriggerSearch, TriggerError> {
        let regexes = patterns
            .iter()
            .map(|p| trigger_regex(p).map_err(|e| TriggerError(format!("trigger pattern {p:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        // The same reading as `trigger_regex`: bytes, no Unicode classes.
        let dfa = DFA::builder()
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().utf8(false))
            .build_many(patterns)
            .map_err(|e| TriggerError(format!("cannot build the trigger search: {e}")))?;
        let mut cache = dfa.create_cache();
        let state = start_state(&dfa, &mut cache)?;
        Ok(TriggerSearch { dfa, cache, state, regexes, text: Vec::new(), tokens: Vec::new() })
    }

    /// Back to an empty output (a new generation on the same sampler).
    pub(crate) fn reset(&mut self) -> Result<(), TriggerError> {
        self.text.clear();
        self.tokens.clear();
        self.state = start_state(&self.dfa, &mut self.cache)?;
        Ok(())
    }

    /// The output so far and its tokens with their pieces' end offsets.
    pub(crate) fn text(&self) -> &[u8] {
        &self.text
    }
    pub(crate) fn tokens(&self) -> &[(i32, usize)] {
        &self.tokens
    }

    /// Appends one token's piece; `Some` when a pattern now matches the output.
    ///
    /// Cost: one DFA transition per byte of `piece` (plus one look at the end of input for
    /// `$` and `\b`), whatever the length of the output; the capture search over the output
    /// runs once, when the trigger fires.
    pub(crate) fn push(&mut self, token: i32, piece: &[u8]) -> Result<Option<Fired>, TriggerError> {
        self.text.extend_from_slice(piece);
        self.tokens.push((token, self.text.len()));
        if self.state.is_dead() {
            // No continuation can match any more (e.g. `^\s*\{` after prose).
            return Ok(None);
        }
        let mut matched = false;
        for &b in piece {
            self.state = self.dfa.next_state(&mut self.cache, self.state, b).map_err(cache_error)?;
            // regex-automata reports a match one byte late: this state says a match ended
            // before `b`. It ended in this piece, or the previous call would have seen it.
            if self.state.is_match() {
                matched = true;
                break;
            }
            if self.state.is_dead() || self.state.is_quit() {
                break;
            }
        }
        if !matched && !self.state.is_dead() {
            // Does a match end at the end of the output? (Not kept: more output follows.)
            let eoi = self.dfa.next_eoi_state(&mut self.cache, self.state).map_err(cache_error)?;
            matched = eoi.is_match();
        }
        if !matched {
            return Ok(None);
        }
        // Which pattern, and where its first group starts: the first pattern, in order, that
        // matches the output (llama.cpp tries them in order and stops at the first).
        for re in &self.regexes {
            if let Some(caps) = re.captures(&self.text) {
                let whole = caps.get(0).map_or(0, |m| m.start());
                let start = caps.iter().skip(1).flatten().find(|m| !m.is_empty()).map_or(whole, |m| m.start());
                return Ok(Some(Fired { start }));
            }
        }
        // The DFA saw a match that ends inside the output: some pattern's search finds it.
        Err(TriggerError("the trigger search and the pattern disagree (a bug)".into()))
    }
}

fn start_state(dfa: &DFA, cache: &mut Cache) -> Result<LazyStateID, TriggerError> {
    // The start of the output: no look-behind, so `^` matches here.
    dfa.start_state(cache, &start::Config::new().anchored(Anchored::No))
        .map_err(|e| TriggerError(format!("cannot start the trigger search: {e}")))
}

fn cache_error(e: regex_automata::hybrid::CacheError) -> TriggerError {
    // Only when a minimum cache-clear count is configured, which it is not.
    TriggerError(format!("the trigger search gave up: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const TOOL_CALL: &str = r"^[\s\S]*?(<tool_call>[\s\S]*)";

    fn feed(s: &mut TriggerSearch, pieces: &[&str]) -> Option<Fired> {
        for (i, p) in pieces.iter().enumerate() {
            if let Some(f) = s.push(i as i32, p.as_bytes()).unwrap() {
                return Some(f);
            }
        }
        None
    }

    #[test]
    fn a_trigger_split_across_tokens_fires_at_its_start() {
        let mut s = TriggerSearch::new(&[TOOL_CALL]).unwrap();
        let pieces = ["Let me ", "check.\n<", "tool", "_ca", "ll>{\"na"];
        assert_eq!(feed(&mut s, &pieces[..4]), None);
        let fired = s.push(4, pieces[4].as_bytes()).unwrap().expect("fires on the token that completes the marker");
        assert_eq!(&s.text()[fired.start..], b"<tool_call>{\"na");
        assert_eq!(s.tokens().len(), 5);
    }

    #[test]
    fn the_first_pattern_that_matches_decides_and_no_group_means_the_whole_match() {
        let mut s = TriggerSearch::new(&["<x>", r"^\s*(\{\s*\x22name\x22[\s\S]*)"]).unwrap();
        let fired = feed(&mut s, &["  {", " \"name\": 1"]).unwrap();
        assert_eq!(fired.start, 2);
        s.reset().unwrap();
        let fired = feed(&mut s, &["ab<", "x>cd"]).unwrap();
        assert_eq!(fired.start, 2, "no group: from the match's start");
        // After prose, the anchored JSON form can never match: a dead state, nothing fires.
        s.reset().unwrap();
        assert_eq!(feed(&mut s, &["Hello", " {\"name\""]), None);
    }

    #[test]
    fn end_anchors_and_reset() {
        let mut s = TriggerSearch::new(&["^done$"]).unwrap();
        assert_eq!(feed(&mut s, &["do", "ne"]), Some(Fired { start: 0 }));
        s.reset().unwrap();
        assert_eq!(feed(&mut s, &["done", "!"]).map(|f| f.start), Some(0), "fired at `done`, before `!` came");
        s.reset().unwrap();
        assert_eq!(feed(&mut s, &["undone"]), None);
    }

    #[test]
    fn bytes_not_characters() {
        // Any byte, valid UTF-8 or not, is one step of `[\s\S]`, as in std::regex.
        let mut s = TriggerSearch::new(&[TOOL_CALL]).unwrap();
        assert_eq!(s.push(0, b"\xE2\x80").unwrap(), None);
        assert_eq!(s.push(1, b"\xFF <tool_call>").unwrap(), Some(Fired { start: 4 }));
    }

    /// The per-token cost stays flat as the untriggered output grows (the old search was
    /// 6 ms per token at 1,000 characters and 1.7 s at 16,000). Prints the figures; asserts
    /// only behaviour (timings vary by machine).
    #[test]
    fn per_token_cost_does_not_grow_with_the_output() {
        let patterns = [TOOL_CALL, r#"^\s*(\{\s*"name"[\s\S]*)"#, r"^[\s\S]*?(<\|python_tag\|>[\s\S]*)"];
        let mut s = TriggerSearch::new(&patterns).unwrap();
        let piece = b" lorem ipsum"; // 12 bytes, a typical few-token span
        let mut fed = 0usize;
        let mut token = 0;
        for checkpoint in [1_000usize, 16_000, 50_000, 100_000, 200_000] {
            while fed < checkpoint {
                assert_eq!(s.push(token, piece).unwrap(), None);
                fed += piece.len();
                token += 1;
            }
            let n = 2_000;
            let t = Instant::now();
            for _ in 0..n {
                assert_eq!(s.push(token, piece).unwrap(), None);
                token += 1;
            }
            fed += n * piece.len();
            let per = t.elapsed() / n as u32;
            println!("trigger search: {per:?} per token at {checkpoint} bytes of untriggered output");
        }
        let t = Instant::now();
        let fired = s.push(token, b"<tool_call>").unwrap().expect("fires");
        println!("trigger fired after {} bytes; the capture search took {:?}", s.text().len(), t.elapsed());
        assert_eq!(&s.text()[fired.start..], b"<tool_call>");
    }
}
