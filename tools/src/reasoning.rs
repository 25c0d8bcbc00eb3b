//! Reasoning ("thinking") output: which tags a model uses, and whether the prompt already
//! opened the block.

/// llama-server's `--reasoning-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningFormat {
    /// The think block stays in the content, tags and all.
    None,
    /// A think block at the start of the answer becomes `reasoning_content`.
    #[default]
    Auto,
    /// llama-server's older name for the same split; an alias of [`ReasoningFormat::Auto`].
    Deepseek,
}

impl ReasoningFormat {
    /// `none`, `auto`, `deepseek`.
    pub fn parse(s: &str) -> Option<ReasoningFormat> {
        match s {
            "none" => Some(ReasoningFormat::None),
            "auto" => Some(ReasoningFormat::Auto),
            "deepseek" => Some(ReasoningFormat::Deepseek),
            _ => None,
        }
    }

    pub(crate) fn splits(self) -> bool {
        !matches!(self, ReasoningFormat::None)
    }
}

/// A reasoning block's open and close tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkTags {
    pub open: &'static str,
    pub close: &'static str,
}

impl ThinkTags {
    /// DeepSeek R1, Qwen 3, QwQ and most others.
    pub const THINK: ThinkTags = ThinkTags { open: "<think>", close: "</think>" };
    /// Cohere Command R7B.
    pub const COMMAND_R7B: ThinkTags = ThinkTags { open: "<|START_THINKING|>", close: "<|END_THINKING|>" };

    /// The tags a template writes (or strips from history), if any.
    pub fn detect(template_source: &str) -> Option<ThinkTags> {
        if template_source.contains(Self::COMMAND_R7B.open) {
            Some(Self::COMMAND_R7B)
        } else if template_source.contains(Self::THINK.open) || template_source.contains(Self::THINK.close) {
            Some(Self::THINK)
        } else {
            None
        }
    }
}

impl Default for ThinkTags {
    fn default() -> Self {
        ThinkTags::THINK
    }
}

/// Whether the rendered prompt ends inside an open think block (Qwen 3 with thinking on,
/// DeepSeek R1's templates end the generation prompt with `<think>\n`): the answer then
/// starts with reasoning and no open tag.
pub fn thinking_forced_open(rendered_prompt: &str) -> bool {
    let end = rendered_prompt.trim_end();
    [ThinkTags::THINK, ThinkTags::COMMAND_R7B].iter().any(|t| end.ends_with(t.open))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_open_is_read_from_the_prompts_end() {
        assert!(thinking_forced_open("<|im_start|>assistant\n<think>\n"));
        assert!(thinking_forced_open("...<|START_THINKING|>"));
        assert!(!thinking_forced_open("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!thinking_forced_open("<|im_start|>assistant\n"));
    }

    #[test]
    fn tags_are_detected_from_templates() {
        assert_eq!(ThinkTags::detect("{{ '<think>\\n' }}"), Some(ThinkTags::THINK));
        assert_eq!(ThinkTags::detect("{% set c = c.split('</think>')[-1] %}"), Some(ThinkTags::THINK));
        assert_eq!(ThinkTags::detect("<|START_THINKING|>{{ x }}<|END_THINKING|>"), Some(ThinkTags::COMMAND_R7B));
        assert_eq!(ThinkTags::detect("{{ messages }}"), None);
        assert_eq!(ReasoningFormat::parse("deepseek"), Some(ReasoningFormat::Deepseek));
        assert_eq!(ReasoningFormat::parse("x"), None);
    }
}
