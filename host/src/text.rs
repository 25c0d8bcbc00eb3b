//! Sampled tokens to the text a consumer sees, shared by sessions and the engine: UTF-8
//! assembled across token boundaries (`utf8.rs`), then stop strings held back and cut
//! (`stop.rs`).

use crate::stop::StopMatcher;
use crate::utf8::Utf8Stream;

pub struct TextOutput {
    utf8: Utf8Stream,
    stop: StopMatcher,
}

impl TextOutput {
    pub fn new(stops: &[String]) -> Self {
        TextOutput { utf8: Utf8Stream::default(), stop: StopMatcher::new(stops) }
    }

    /// One token's bytes. Returns the text safe to hand out now, and whether a stop string
    /// was completed (the text then ends before it; generation should end).
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        let text = self.utf8.push(bytes);
        self.stop.push(&text)
    }

    /// The stop string that ended the output, if one did.
    pub fn stopped_by(&self) -> Option<&str> {
        self.stop.matched()
    }

    /// Everything still held back, at the end of generation: an incomplete UTF-8 tail (as
    /// replacement characters) and text that could have begun a stop string but did not.
    pub fn flush(&mut self) -> String {
        let rest = self.utf8.finish();
        let (rest, _) = self.stop.push(&rest);
        rest + &self.stop.finish()
    }
}
