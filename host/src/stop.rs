//! Stop strings: text is held back while it could still be the start of a stop string, so
//! the output never contains a stop string, even one split across several tokens.

#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The stop string that ended the output, once one did.
    matched: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new(), matched: None }
    }

    /// Adds generated text. Returns the text safe to emit and whether a stop string was hit
    /// (then everything from the stop string on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        // The earliest match wins; at one position, the first stop given.
        if let Some((pos, i)) = self.stops.iter().enumerate().filter_map(|(i, s)| self.held.find(s.as_str()).map(|p| (p, i))).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            self.matched = Some(self.stops[i].clone());
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .filter(|&n| s.is_char_boundary(n) && self.held.is_char_boundary(self.held.len() - n))
                    .find(|&n| self.held.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The stop string that ended the output (Anthropic's `stop_sequence`), if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// The held-back text at the end of generation (it did not become a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_inside_one_piece_cuts_the_output() {
        assert_eq!(run(&["END"], &["hello END world"]), ("hello ".into(), true));
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_caught() {
        assert_eq!(run(&["\n\n"], &["one", "\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["Paris"], &["It is P", "ar", "is."]), ("It is ".into(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["Paris"], &["Par", "t one"]), ("Part one".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn the_matched_stop_is_remembered() {
        let stops = vec!["b".to_string(), "xa".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.matched(), None);
        assert_eq!(m.push("1x"), ("1".into(), false));
        assert_eq!(m.push("ab"), (String::new(), true));
        assert_eq!(m.matched(), Some("xa"));
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }
}
