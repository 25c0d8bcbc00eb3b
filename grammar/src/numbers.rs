//! Integer ranges as digit patterns, the way llama.cpp's converter builds them: a range
//! such as [15, 300] becomes alternatives over digit counts and leading digits, so the
//! grammar admits exactly the integers in range (written without leading zeros).
//! Bounds are limited to 15 digits, so every recursion here is at most ~16 deep.

/// Largest absolute bound accepted; with 16-digit integers in the unbounded case the
/// digit counts below stay consistent.
pub(crate) const MAX_ABS_BOUND: i64 = 999_999_999_999_999;

fn digit_range(out: &mut String, from: u8, to: u8) {
    out.push('[');
    out.push(from as char);
    if from != to {
        out.push('-');
        out.push(to as char);
    }
    out.push(']');
}

/// `[0-9]{min,max}`; `max == None` is unbounded.
fn more_digits(out: &mut String, min: usize, max: Option<usize>) {
    out.push_str("[0-9]");
    if min == 1 && max == Some(1) {
        return;
    }
    out.push('{');
    out.push_str(&min.to_string());
    if max != Some(min) {
        out.push(',');
        if let Some(m) = max {
            out.push_str(&m.to_string());
        }
    }
    out.push('}');
}

/// All digit strings of `from.len()` digits between `from` and `to` (same length).
fn uniform_range(out: &mut String, from: &[u8], to: &[u8]) {
    let mut i = 0;
    while i < from.len() && i < to.len() && from[i] == to[i] {
        i += 1;
    }
    if i > 0 {
        out.push('"');
        out.push_str(std::str::from_utf8(&from[..i]).unwrap_or_default());
        out.push('"');
    }
    if i >= from.len() || i >= to.len() {
        return;
    }
    if i > 0 {
        out.push(' ');
    }
    let rest = from.len() - i - 1;
    if rest == 0 {
        digit_range(out, from[i], to[i]);
        return;
    }
    let (from_sub, to_sub) = (&from[i + 1..], &to[i + 1..]);
    let zeros = vec![b'0'; rest];
    let nines = vec![b'9'; rest];
    let mut to_reached = false;
    out.push('(');
    if from_sub == zeros.as_slice() {
        digit_range(out, from[i], to[i] - 1);
        out.push(' ');
        more_digits(out, rest, Some(rest));
    } else {
        out.push('[');
        out.push(from[i] as char);
        out.push_str("] (");
        uniform_range(out, from_sub, &nines);
        out.push(')');
        if from[i] + 1 < to[i] {
            out.push_str(" | ");
            if to_sub == nines.as_slice() {
                digit_range(out, from[i] + 1, to[i]);
                to_reached = true;
            } else {
                digit_range(out, from[i] + 1, to[i] - 1);
            }
            out.push(' ');
            more_digits(out, rest, Some(rest));
        }
    }
    if !to_reached {
        out.push_str(" | ");
        digit_range(out, to[i], to[i]);
        out.push(' ');
        uniform_range(out, &zeros, to_sub);
    }
    out.push(')');
}

/// Appends GBNF alternatives matching exactly the integers in [min, max] (`None` =
/// unbounded on that side; at least one side is bounded). Callers keep |bounds| ≤
/// [`MAX_ABS_BOUND`] and min ≤ max. `top` is false inside a recursion that continues
/// after a leading digit, where a leading zero is fine and no sign is written.
pub(crate) fn int_range(out: &mut String, min: Option<i64>, max: Option<i64>, decimals: usize, top: bool) {
    let less = decimals.saturating_sub(1).max(1);
    match (min, max) {
        (Some(lo), Some(hi)) => {
            if lo < 0 && hi < 0 {
                out.push_str("\"-\" (");
                int_range(out, Some(-hi), Some(-lo), decimals, true);
                out.push(')');
                return;
            }
            let mut lo = lo;
            if lo < 0 {
                out.push_str("\"-\" (");
                int_range(out, Some(0), Some(-lo), decimals, true);
                out.push_str(") | ");
                lo = 0;
            }
            let mut lo_s = lo.to_string().into_bytes();
            let hi_s = hi.to_string().into_bytes();
            for digits in lo_s.len()..hi_s.len() {
                uniform_range(out, &lo_s.clone(), &vec![b'9'; digits]);
                lo_s = format!("1{}", "0".repeat(digits)).into_bytes();
                out.push_str(" | ");
            }
            uniform_range(out, &lo_s, &hi_s);
        }
        (Some(lo), None) => {
            if lo < 0 {
                out.push_str("\"-\" (");
                int_range(out, None, Some(-lo), decimals, false);
                out.push_str(") | [0] | [1-9] ");
                more_digits(out, 0, Some(decimals - 1));
            } else if lo == 0 {
                if top {
                    out.push_str("[0] | [1-9] ");
                    more_digits(out, 0, Some(less));
                } else {
                    more_digits(out, 1, Some(decimals));
                }
            } else if lo <= 9 {
                let c = b'0' + lo as u8;
                let start = if top { b'1' } else { b'0' };
                if c > start {
                    digit_range(out, start, c - 1);
                    out.push(' ');
                    more_digits(out, 1, Some(less));
                    out.push_str(" | ");
                }
                digit_range(out, c, b'9');
                out.push(' ');
                more_digits(out, 0, Some(less));
            } else {
                let s = lo.to_string().into_bytes();
                let (len, c) = (s.len(), s[0]);
                if c > b'1' {
                    digit_range(out, if top { b'1' } else { b'0' }, c - 1);
                    out.push(' ');
                    more_digits(out, len, Some(less));
                    out.push_str(" | ");
                }
                digit_range(out, c, c);
                out.push_str(" (");
                let rest: i64 = std::str::from_utf8(&s[1..]).ok().and_then(|r| r.parse().ok()).unwrap_or(0);
                int_range(out, Some(rest), None, less, false);
                out.push(')');
                if c < b'9' {
                    out.push_str(" | ");
                    digit_range(out, c + 1, b'9');
                    out.push(' ');
                    more_digits(out, len - 1, Some(less));
                }
            }
        }
        (None, Some(hi)) => {
            if hi >= 0 {
                if top {
                    out.push_str("\"-\" [1-9] ");
                    more_digits(out, 0, Some(less));
                    out.push_str(" | ");
                }
                int_range(out, Some(0), Some(hi), decimals, true);
            } else {
                out.push_str("\"-\" (");
                int_range(out, Some(-hi), None, decimals, false);
                out.push(')');
            }
        }
        (None, None) => out.push_str("integer"),
    }
}
