//! Speculative decoding: where drafted tokens come from.
//!
//! A generation step can carry, after a sequence's next token, a few drafted tokens that
//! probably follow it. The backend decodes them in the same batch and verifies them in
//! order with the sequence's own sampler ([`crate::SampleRequest::n_draft`]): each is kept
//! only if the sampler, fed the same history, picks it, so the output is the one a
//! token-per-step generation gives; only the number of steps changes. On this hardware a
//! step is bound by reading the weights, so checking several tokens costs little more than
//! one.
//!
//! Two sources:
//! - **n-gram (prompt lookup)** ([`ngram_draft`]): the last `n` tokens of prompt plus
//!   output are looked up earlier in the same sequence, and what followed them there is
//!   proposed. No second model; edits, refactors, quotes and JSON rewrites repeat most of
//!   their prompt.
//! - **draft model** ([`Drafter`]): a small model with the same vocabulary proposes its
//!   greedy continuation, stopping where its confidence falls below `p_min`.

use crate::error::GenerateError;
use crate::ops::ContextOps;
use crate::types::{BackendError, ContextParams};
use crate::Model;

/// Most tokens drafted per step. A step decodes the drafts as one batch: past a few dozen
/// the verification costs more than the weights it saves reading.
pub const MAX_DRAFT: u32 = 64;
/// Longest n-gram looked up.
pub const MAX_NGRAM: u32 = 16;

/// Where drafts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecMode {
    /// Prompt lookup: the sequence's own earlier tokens.
    Ngram,
    /// A draft model (the engine's or session's, loaded with `--draft-model`).
    Draft,
}

impl SpecMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SpecMode::Ngram => "ngram",
            SpecMode::Draft => "draft",
        }
    }
}

impl std::str::FromStr for SpecMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ngram" => Ok(SpecMode::Ngram),
            "draft" => Ok(SpecMode::Draft),
            other => Err(format!("unknown speculation mode {other:?} (ngram, draft, or none)")),
        }
    }
}

/// How one generation speculates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecParams {
    pub mode: SpecMode,
    /// Most tokens drafted per step (`--draft-max`).
    pub draft_max: u32,
    /// Fewer drafted tokens than this are not verified at all (`--draft-min`): a short
    /// draft of a weak match costs a wider step for little gain.
    pub draft_min: u32,
    /// Draft model: stop drafting at a token whose probability is below this
    /// (`--draft-p-min`).
    pub p_min: f32,
    /// n-gram: tokens matched (`--spec-ngram-n`).
    pub ngram_n: u32,
}

impl SpecParams {
    /// The defaults for `mode` (measured on this project's workloads: see
    /// docs/ARCHITECTURE.md, "Speculative decoding").
    pub fn new(mode: SpecMode) -> SpecParams {
        match mode {
            SpecMode::Ngram => SpecParams { mode, draft_max: TILE_DRAFTS as u32, draft_min: 1, p_min: 0.0, ngram_n: 3 },
            SpecMode::Draft => SpecParams { mode, draft_max: 8, draft_min: 1, p_min: 0.5, ngram_n: 3 },
        }
    }

    /// Most tokens the next draft of a sequence may have, 0 when none is worth making:
    /// its cap (`draft_max` without one), `cells_after` (free context cells after the token
    /// about to be decoded; one stays for the token sampled after the drafts), `batch` (what
    /// the step's batch has left), `tokens_left` (tokens the generation may still produce:
    /// the last one of the limit is sampled, never drafted).
    pub fn room(&self, cap: Option<DraftCap>, cells_after: usize, batch: usize, tokens_left: Option<usize>) -> usize {
        let room = cells_after.saturating_sub(1).min(batch).min(cap.map_or(self.draft_max as usize, |c| c.limit()));
        let room = tokens_left.map_or(room, |l| room.min(l.saturating_sub(1)));
        if room < self.draft_min.max(1) as usize {
            0
        } else {
            room
        }
    }

    /// A draft as it will be verified: cut to an efficient step ([`fit_draft`]), then
    /// dropped when shorter than `draft_min`.
    pub fn usable(&self, draft: Vec<i32>) -> Vec<i32> {
        let draft = fit_draft(draft);
        if draft.len() < self.draft_min as usize {
            Vec::new()
        } else {
            draft
        }
    }

    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |field: &str, reason: String| Err(GenerateError::InvalidParam { field: field.into(), reason });
        if !(1..=MAX_DRAFT).contains(&self.draft_max) {
            return bad("draft-max", format!("{} is outside 1..={MAX_DRAFT}", self.draft_max));
        }
        if self.draft_min > self.draft_max {
            return bad("draft-min", format!("{} is above draft-max ({})", self.draft_min, self.draft_max));
        }
        if !(0.0..=1.0).contains(&self.p_min) {
            return bad("draft-p-min", format!("{} is outside 0..=1", self.p_min));
        }
        if !(1..=MAX_NGRAM).contains(&self.ngram_n) {
            return bad("spec-ngram-n", format!("{} is outside 1..={MAX_NGRAM}", self.ngram_n));
        }
        Ok(())
    }
}

/// Longest suffix of the history prompt lookup compares: a longer match is better evidence
/// of where in an earlier passage the output is (`self.rows` occurs in many lines of a
/// file; the eight tokens before it, in one).
pub const NGRAM_LONGEST: usize = 12;

/// Prompt lookup: the tokens that followed the earlier occurrence of the longest suffix of
/// `history` (at least `n` tokens, at most [`NGRAM_LONGEST`]), the newest of equally long
/// ones, at most `max`. Empty when no earlier occurrence of the last `n` tokens exists.
///
/// One backward scan: each earlier position holding the last token is extended backwards
/// while it matches, O(history × match length), microseconds for a full context.
pub fn ngram_draft(history: &[i32], n: usize, max: usize) -> Vec<i32> {
    let len = history.len();
    if n == 0 || max == 0 || len <= n {
        return Vec::new();
    }
    let longest = NGRAM_LONGEST.max(n);
    let last = history[len - 1];
    // (match length, end of the match): the continuation starts at `end`.
    let mut best: Option<(usize, usize)> = None;
    // `end` is one past a candidate occurrence's last token; it leaves at least one token
    // after it, and the occurrence ends before the suffix itself does.
    for end in (1..len).rev() {
        if history[end - 1] != last {
            continue;
        }
        let matched = (1..=longest.min(end)).take_while(|&k| history[end - k] == history[len - k]).count();
        if matched >= n && best.is_none_or(|(m, _)| matched > m) {
            best = Some((matched, end));
            if matched == longest {
                break;
            }
        }
    }
    match best {
        Some((_, end)) => history[end..(end + max).min(len)].to_vec(),
        None => Vec::new(),
    }
}

/// Whether `draft` can draft for `target`: the same vocabulary, token for token (the drafts
/// are token ids the target verifies). The error names both models.
pub fn check_vocab(target: &Model, draft: &Model) -> Result<(), GenerateError> {
    let mismatch = |reason: String| {
        Err(GenerateError::InvalidParam {
            field: "draft-model".into(),
            reason: format!(
                "{} cannot draft for {}: {reason}; a draft model must share the target's vocabulary",
                draft.path().display(),
                target.path().display()
            ),
        })
    };
    let (t, d) = (target.info(), draft.info());
    if t.n_vocab != d.n_vocab {
        return mismatch(format!("its vocabulary has {} tokens, the target's {}", d.n_vocab, t.n_vocab));
    }
    if t.bos != d.bos {
        return mismatch(format!("its beginning-of-sequence token is {}, the target's {}", d.bos, t.bos));
    }
    for token in 0..t.n_vocab {
        let (a, b) = (target.token_bytes(token, true)?, draft.token_bytes(token, true)?);
        if a != b {
            return mismatch(format!(
                "token {token} is {:?} in the target and {:?} in the draft model",
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b)
            ));
        }
    }
    Ok(())
}

/// Most tokens one `Drafter::draft` call decodes to catch a sequence up (a new prompt): a
/// draft runs inside a step every sequence shares, so a long prompt is caught up over
/// several steps (drafting nothing meanwhile), as the target model's prompt is chunked.
pub const CATCH_UP: usize = 256;

/// A draft model's context with what each of its sequences holds, so a sequence's next
/// draft decodes only the tokens its history gained since the last one.
pub struct Drafter {
    ctx: Box<dyn ContextOps>,
    /// Per sequence: the tokens the draft context holds.
    held: Vec<Vec<i32>>,
}

impl Drafter {
    /// A context of `draft` shaped like the target's (`params`: the same length, sequences
    /// and layout), after checking the vocabularies match.
    pub fn new(target: &Model, draft: &Model, params: &ContextParams) -> Result<Drafter, GenerateError> {
        check_vocab(target, draft)?;
        let ctx = draft.new_context(params).map_err(|e| match e {
            crate::SessionError::InvalidParam { field, reason } => GenerateError::InvalidParam { field, reason },
            crate::SessionError::Backend(b) => GenerateError::Backend(b),
        })?;
        let held = vec![Vec::new(); ctx.n_seq_max() as usize];
        Ok(Drafter { ctx, held })
    }

    /// Up to `n_max` drafted tokens to follow `history` (all of the sequence's tokens: the
    /// prompt, the output, and the token about to be decoded) in sequence `seq`.
    pub fn draft(&mut self, seq: i32, history: &[i32], n_max: u32, p_min: f32) -> Result<Vec<i32>, BackendError> {
        let Some(held) = self.held.get_mut(seq as usize) else { return Ok(Vec::new()) };
        if history.is_empty() || n_max == 0 {
            return Ok(Vec::new());
        }
        let common = held.iter().zip(history).take_while(|(a, b)| a == b).count();
        // At least one token is decoded, for logits to draft from.
        let mut keep = common.min(history.len() - 1);
        if !self.ctx.seq_can_continue(seq, keep as i32) {
            keep = 0;
        }
        held.truncate(keep);
        // Far behind (a new prompt): catch up by a bounded chunk, drafting nothing yet.
        let (upto, n_max) = if history.len() - keep > CATCH_UP { (keep + CATCH_UP, 0) } else { (history.len(), n_max) };
        let drafts = self.ctx.draft(seq, &history[keep..upto], keep as i32, n_max, p_min);
        match &drafts {
            Ok(_) => held.extend_from_slice(&history[keep..upto]),
            // What the context holds after a failure is unknown: start the sequence over.
            Err(_) => {
                held.clear();
                self.ctx.seq_remove(seq, 0, -1);
            }
        }
        drafts
    }

    /// Forgets sequence `seq` (its request ended and its cells may be reused).
    pub fn forget(&mut self, seq: i32) {
        if let Some(held) = self.held.get_mut(seq as usize) {
            held.clear();
            self.ctx.seq_remove(seq, 0, -1);
        }
    }
}

/// How many tokens the next draft of one sequence may have: adapted to how its drafts fare.
///
/// A verification step costs more with every draft (on a CPU a step of 17 tokens costs
/// about five single-token steps), so a long draft pays only when most of it is accepted.
/// The cap starts small (4) and doubles after a fully accepted full-length draft; from 4 a
/// fully accepted one (a passage being copied) lifts it to `draft_max` (a tiled step, see
/// [`TILE_DRAFTS`]); after a rejection it drops to one more than what was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftCap {
    cap: u32,
    max: u32,
}

/// The first draft's cap (at most `draft_max`).
const FIRST_CAP: u32 = 4;

/// Drafts in a verification step of 64 tokens: from 64 queries on, llama.cpp's CPU flash
/// attention takes its tiled path (`GGML_FA_TILE_Q`), which at 800 tokens of context
/// computes 64 queries in about a third of the time it takes for 63 (SmolLM2, 2 threads:
/// 193 against 69 tokens/s). Between the short drafts and this, a step costs about half a
/// one-token step per draft.
pub const TILE_DRAFTS: usize = 63;
/// The longest draft worth verifying below [`TILE_DRAFTS`].
pub const SHORT_DRAFT: usize = 16;

/// A draft cut to a step llama.cpp computes efficiently: a draft longer than
/// [`SHORT_DRAFT`] but shorter than [`TILE_DRAFTS`] is cut to [`SHORT_DRAFT`].
pub fn fit_draft(mut draft: Vec<i32>) -> Vec<i32> {
    if draft.len() > SHORT_DRAFT && draft.len() < TILE_DRAFTS {
        draft.truncate(SHORT_DRAFT);
    }
    draft
}

impl DraftCap {
    pub fn new(p: &SpecParams) -> DraftCap {
        DraftCap { cap: FIRST_CAP.min(p.draft_max), max: p.draft_max }
    }

    /// Most tokens the next draft may have.
    pub fn limit(&self) -> usize {
        self.cap as usize
    }

    /// After a verification of `drafted` tokens of which `accepted` were kept.
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.cap = if accepted < drafted {
            (accepted as u32 + 1).min(self.max)
        } else if drafted < self.cap as usize {
            // All accepted, but the lookup had no more: no evidence for a longer one.
            self.cap
        } else if self.cap >= FIRST_CAP {
            // A passage is being copied: the next draft may fill a tiled step.
            self.max
        } else {
            self.cap.saturating_mul(2).min(self.max)
        };
    }
}

/// Counts of one generation's speculation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecStats {
    /// Drafted tokens sent for verification.
    pub drafted: usize,
    /// Of those, the ones accepted.
    pub accepted: usize,
}

impl SpecStats {
    /// Accepted / drafted, or `None` before any draft.
    pub fn acceptance(&self) -> Option<f64> {
        (self.drafted > 0).then(|| self.accepted as f64 / self.drafted as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_match_wins_over_a_newer_shorter_one() {
        // "9 1 2 3" → 4 (older, longer match); "1 2 3" → 7 (newer, shorter).
        let h = [9, 1, 2, 3, 4, 0, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(ngram_draft(&h, 3, 2), vec![4, 0]);
    }

    #[test]
    fn the_newest_earlier_occurrence_is_followed() {
        // "a b c d | a b c e | a b c" → the newest earlier "a b c" was followed by "e ...".
        let h = [1, 2, 3, 4, 1, 2, 3, 5, 6, 1, 2, 3];
        assert_eq!(ngram_draft(&h, 3, 2), vec![5, 6]);
        assert_eq!(ngram_draft(&h, 3, 10), vec![5, 6, 1, 2, 3]);
    }

    #[test]
    fn no_match_or_too_short_drafts_nothing() {
        assert!(ngram_draft(&[1, 2, 3, 4], 2, 5).is_empty());
        assert!(ngram_draft(&[1, 2], 2, 5).is_empty());
        assert!(ngram_draft(&[1, 1], 1, 5) == vec![1]);
        assert!(ngram_draft(&[1, 2, 1], 1, 0).is_empty());
        assert!(ngram_draft(&[], 1, 4).is_empty());
    }

    #[test]
    fn a_repeat_drafts_up_to_the_end_of_the_history() {
        // A run of one token: the match one back proposes the single token after it.
        assert_eq!(ngram_draft(&[7, 7, 7, 7], 2, 8), vec![7]);
    }

    #[test]
    fn the_draft_cap_grows_on_full_acceptance_and_shrinks_on_rejection() {
        let mut c = DraftCap::new(&SpecParams::new(SpecMode::Ngram));
        assert_eq!(c.limit(), 4);
        c.update(2, 2);
        assert_eq!(c.limit(), 4, "no change: the draft was shorter than the cap");
        c.update(4, 4);
        assert_eq!(c.limit(), TILE_DRAFTS, "from a full short draft to a tiled one");
        c.update(63, 63);
        assert_eq!(c.limit(), TILE_DRAFTS, "never past draft_max");
        c.update(16, 2);
        assert_eq!(c.limit(), 3);
        c.update(3, 0);
        assert_eq!(c.limit(), 1);
        c.update(0, 0);
        assert_eq!(c.limit(), 1, "a step without a draft changes nothing");
    }

    #[test]
    fn room_keeps_a_cell_and_the_limit_s_last_token_and_usable_fits_before_the_minimum() {
        let p = SpecParams::new(SpecMode::Ngram);
        assert_eq!(p.room(None, 100, 500, None), 63, "draft_max without a cap");
        assert_eq!(p.room(Some(DraftCap::new(&p)), 100, 500, None), 4, "the cap");
        assert_eq!(p.room(None, 10, 500, None), 9, "one cell stays free");
        assert_eq!(p.room(None, 100, 5, None), 5, "the batch");
        assert_eq!(p.room(None, 100, 500, Some(7)), 6, "the limit's last token is sampled");
        assert_eq!(p.room(None, 100, 500, Some(1)), 0);
        let strict = SpecParams { draft_min: 20, ..p };
        assert_eq!(strict.room(None, 100, 19, None), 0, "below draft_min: no draft");
        assert!(strict.usable(vec![1; 40]).is_empty(), "cut to 16, then under draft_min");
        assert_eq!(p.usable(vec![1; 40]).len(), SHORT_DRAFT);
    }

    #[test]
    fn mid_size_drafts_are_cut_to_short_ones() {
        assert_eq!(fit_draft(vec![1; 10]).len(), 10);
        assert_eq!(fit_draft(vec![1; 40]).len(), SHORT_DRAFT);
        assert_eq!(fit_draft(vec![1; TILE_DRAFTS]).len(), TILE_DRAFTS);
    }

    #[test]
    fn params_are_bounded_and_named() {
        let ok = SpecParams::new(SpecMode::Ngram);
        assert!(ok.validate().is_ok());
        for (p, field) in [
            (SpecParams { draft_max: 0, ..ok }, "draft-max"),
            (SpecParams { draft_max: MAX_DRAFT + 1, ..ok }, "draft-max"),
            (SpecParams { draft_min: 64, ..ok }, "draft-min"),
            (SpecParams { p_min: 1.5, ..ok }, "draft-p-min"),
            (SpecParams { p_min: f32::NAN, ..ok }, "draft-p-min"),
            (SpecParams { ngram_n: 0, ..ok }, "spec-ngram-n"),
        ] {
            match p.validate() {
                Err(GenerateError::InvalidParam { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{p:?}: {other:?}"),
            }
        }
    }
}
