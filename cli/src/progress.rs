//! A load progress bar on stderr, only when stderr is a terminal.

use std::io::{IsTerminal, Write};

/// A progress callback for `Model::load_with_progress`; `None` when stderr is not a terminal.
pub fn bar(label: String) -> Option<impl FnMut(f32)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let mut last = -1i32;
    Some(move |p: f32| {
        let pct = (p.clamp(0.0, 1.0) * 100.0) as i32;
        if pct == last {
            return;
        }
        last = pct;
        let filled = (pct / 4) as usize;
        let mut err = std::io::stderr().lock();
        if pct >= 100 {
            // Erase the bar once loaded.
            let _ = write!(err, "\r\x1b[2K");
        } else {
            let _ = write!(err, "\rloading {label} [{}{}] {pct:3}%", "#".repeat(filled), ".".repeat(25 - filled));
        }
        let _ = err.flush();
    })
}
