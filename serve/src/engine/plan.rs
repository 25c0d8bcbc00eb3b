//! Batch planning: which slots contribute what to the next decode step. Pure functions of
//! the slots' states, so the scheduling rules are unit-tested without a model.

/// What the scheduler needs to know of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Idle,
    /// Prompt tokens still to decode.
    Prefill { remaining: usize },
    /// Generating; `ready` is false while its consumer has not taken the last text.
    Generate { ready: bool },
}

/// What one slot contributes to the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Its next generated token.
    Token,
    /// This many prompt tokens.
    Prompt(usize),
}

/// Plans one batch of at most `budget` tokens: the next token of every ready generating
/// slot first (they are latency-bound and cost one token each), then prompt chunks in
/// slot order `order` (oldest request first, so no request starves).
pub fn plan_batch(slots: &[SlotState], order: &[usize], budget: usize) -> Vec<(usize, Part)> {
    let mut plan = Vec::new();
    let mut left = budget;
    for (i, s) in slots.iter().enumerate() {
        if left > 0 && matches!(s, SlotState::Generate { ready: true }) {
            plan.push((i, Part::Token));
            left -= 1;
        }
    }
    for &i in order {
        if left == 0 {
            break;
        }
        if let Some(SlotState::Prefill { remaining }) = slots.get(i) {
            let n = (*remaining).min(left);
            if n > 0 {
                plan.push((i, Part::Prompt(n)));
                left -= n;
            }
        }
    }
    plan
}


/// The batch-invariant plan: a step is either the next token of every ready generating
/// slot, or one prompt (its next `budget` tokens), never both. Every token is then computed
/// by the same kernels as when its request runs alone: the padding token keeps every
/// matrix product at two or more rows, and attention never switches to its tiled path
/// for a generation token because a prompt shares its batch.
pub fn plan_invariant(slots: &[SlotState], order: &[usize], budget: usize) -> Vec<(usize, Part)> {
    let tokens: Vec<(usize, Part)> =
        slots.iter().enumerate().filter(|(_, s)| matches!(s, SlotState::Generate { ready: true })).map(|(i, _)| (i, Part::Token)).take(budget).collect();
    if !tokens.is_empty() {
        return tokens;
    }
    order
        .iter()
        .find_map(|&i| match slots.get(i) {
            Some(SlotState::Prefill { remaining }) if budget > 0 => Some(vec![(i, Part::Prompt((*remaining).min(budget)))]),
            _ => None,
        })
        .unwrap_or_default()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_invariant_plan_never_mixes_prompts_and_generation() {
        let slots = [SlotState::Prefill { remaining: 100 }, SlotState::Generate { ready: true }, SlotState::Generate { ready: false }];
        assert_eq!(plan_invariant(&slots, &[0], 64), vec![(1, Part::Token)]);
        let slots = [SlotState::Prefill { remaining: 100 }, SlotState::Prefill { remaining: 3 }];
        assert_eq!(plan_invariant(&slots, &[1, 0], 64), vec![(1, Part::Prompt(3))]);
        assert_eq!(plan_invariant(&slots, &[0, 1], 64), vec![(0, Part::Prompt(64))]);
    }

    #[test]
    fn generating_slots_go_first_then_prompts_oldest_first() {
        let slots = [
            SlotState::Prefill { remaining: 100 },
            SlotState::Generate { ready: true },
            SlotState::Idle,
            SlotState::Prefill { remaining: 10 },
            SlotState::Generate { ready: true },
        ];
        let plan = plan_batch(&slots, &[3, 0], 64);
        assert_eq!(plan, vec![(1, Part::Token), (4, Part::Token), (3, Part::Prompt(10)), (0, Part::Prompt(52))]);
    }

    #[test]
    fn a_paused_slot_is_left_out() {
        let slots = [SlotState::Generate { ready: false }, SlotState::Generate { ready: true }];
        assert_eq!(plan_batch(&slots, &[], 8), vec![(1, Part::Token)]);
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let slots = [SlotState::Generate { ready: true }, SlotState::Generate { ready: true }, SlotState::Prefill { remaining: 5 }];
        assert_eq!(plan_batch(&slots, &[2], 1), vec![(0, Part::Token)]);
        assert_eq!(plan_batch(&slots, &[2], 4), vec![(0, Part::Token), (1, Part::Token), (2, Part::Prompt(2))]);
        assert!(plan_batch(&slots, &[2], 0).is_empty());
    }

    #[test]
    fn an_idle_engine_plans_nothing() {
        assert!(plan_batch(&[SlotState::Idle, SlotState::Idle], &[], 512).is_empty());
    }
}

