//! The prompt language: arbitrary text read in every syntax (A1111 emphasis, editing and
//! alternation, AND, BREAK; optimizedSD blends; Auto's choice between them), then cut into
//! 75-token chunks with the real tokenizer; the `<lora:…>` tags are taken out of it (split at
//! the first NUL into a prompt and a negative prompt). The first byte picks the step count. A
//! crash, a hang, deep recursion or an allocation past libFuzzer's limit is a finding.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdrs::embeddings::Embeddings;
use sdrs::lora::strip_tags;
use sdrs::prompt::{
    chunks, parse_attention, plan, prompt_edits, prompt_edits_with, EditClock, EditTimeline,
    PromptSyntax,
};
use sdrs::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::new().expect("the embedded vocabulary"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let steps = 1 + first as usize % 40;
    // The extra-network tags, taken out of a prompt and a negative prompt (split at the first
    // NUL) as a request's validation takes them out.
    let (prompt, negative) = text.split_once('\0').unwrap_or((text, ""));
    for (what, part) in [("prompt", prompt), ("negative prompt", negative)] {
        if let Ok(stripped) = strip_tags(what, part) {
            assert!(stripped.text.len() <= part.len());
            assert!(stripped.loras.len() <= sdrs::limits::MAX_LORAS);
        }
    }
    let _ = parse_attention(text);
    let _ = prompt_edits(text, steps);
    // Both timelines, and the hires fix's second pass on each.
    for timeline in [EditTimeline::Current, EditTimeline::Old] {
        let _ = prompt_edits_with(text, EditClock::new(steps, timeline));
        let _ = prompt_edits_with(text, EditClock::second_pass(steps, 1 + steps / 2, timeline));
    }
    for syntax in [
        PromptSyntax::Auto,
        PromptSyntax::A1111,
        PromptSyntax::Optimized,
        PromptSyntax::Plain,
    ] {
        let Ok(plan) = plan(text, syntax, steps) else {
            continue;
        };
        for part in &plan.parts {
            for edit in &part.edits {
                for (sub, _) in &edit.blend {
                    let _ = chunks(tokenizer(), &Embeddings::default(), sub, syntax, 0);
                }
            }
        }
    }
});
