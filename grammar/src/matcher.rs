//! Test-only GBNF matcher: does the grammar's `root` derive exactly this string?
//! Computes, for a rule at a position, the set of positions where it can end (memoized).
//! Terminates because `finish` rejects left recursion.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::gbnf::{parse_grammar, Alts, Atom, Term};

pub(crate) struct Matcher {
    rules: BTreeMap<String, Alts>,
}

impl Matcher {
    pub(crate) fn new(grammar: &str) -> Matcher {
        Matcher { rules: parse_grammar(grammar).expect("grammar parses") }
    }

    pub(crate) fn accepts(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let mut memo = HashMap::new();
        self.rule("root", 0, &chars, &mut memo).contains(&chars.len())
    }

    fn rule(&self, name: &str, pos: usize, s: &[char], memo: &mut HashMap<(String, usize), BTreeSet<usize>>) -> BTreeSet<usize> {
        if let Some(r) = memo.get(&(name.to_string(), pos)) {
            return r.clone();
        }
        let r = self.alts(&self.rules[name], pos, s, memo);
        memo.insert((name.to_string(), pos), r.clone());
        r
    }

    fn alts(&self, alts: &Alts, pos: usize, s: &[char], memo: &mut HashMap<(String, usize), BTreeSet<usize>>) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        for seq in alts {
            let mut cur = BTreeSet::from([pos]);
            for t in seq {
                cur = self.term(t, &cur, s, memo);
                if cur.is_empty() {
                    break;
                }
            }
            out.extend(cur);
        }
        out
    }

    fn term(&self, t: &Term, starts: &BTreeSet<usize>, s: &[char], memo: &mut HashMap<(String, usize), BTreeSet<usize>>) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let mut frontier = starts.clone();
        let mut seen = BTreeSet::new();
        let mut n = 0u32;
        loop {
            if n >= t.min {
                out.extend(frontier.iter().copied());
            }
            if t.max.is_some_and(|m| n >= m) || frontier.is_empty() {
                break;
            }
            let mut next = BTreeSet::new();
            for &p in &frontier {
                next.extend(self.atom(&t.atom, p, s, memo));
            }
            n += 1;
            if t.max.is_none() && n >= t.min {
                // Unbounded tail: only new positions matter.
                next.retain(|p| seen.insert(*p));
            }
            frontier = next;
        }
        out
    }

    fn atom(&self, a: &Atom, pos: usize, s: &[char], memo: &mut HashMap<(String, usize), BTreeSet<usize>>) -> BTreeSet<usize> {
        match a {
            Atom::Lit(l) => {
                if s.len() >= pos + l.len() && &s[pos..pos + l.len()] == l.as_slice() {
                    BTreeSet::from([pos + l.len()])
                } else {
                    BTreeSet::new()
                }
            }
            Atom::Class { negated, ranges } => match s.get(pos) {
                Some(&c) if ranges.iter().any(|&(a, b)| a <= c && c <= b) != *negated => BTreeSet::from([pos + 1]),
                _ => BTreeSet::new(),
            },
            Atom::Any => {
                if pos < s.len() {
                    BTreeSet::from([pos + 1])
                } else {
                    BTreeSet::new()
                }
            }
            Atom::Ref(r) => self.rule(r, pos, s, memo),
            Atom::Group(g) => self.alts(g, pos, s, memo),
        }
    }
}
