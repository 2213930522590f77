//! The prompt language: AUTOMATIC1111's syntax and optimizedSD's weighted sub-prompts, read by
//! one parser, without a model. [`plan`] says which texts the model must encode at which
//! sampling step and how to combine them; [`chunks()`] / [`encode`] / [`encode_blend`] turn one
//! text into conditioning with a caller-supplied text encoder; [`report()`] describes it all.
//!
//! # The two traditions
//! - **A1111**: emphasis `(x)` ×1.1, `((x))` ×1.21, `(x:1.3)`, `[x]` ÷1.1, escapes `\(` `\)` `\[`
//!   `\]` `\\`, unclosed brackets apply to the end; `BREAK` starts a new 75-token chunk; long
//!   prompts go in 75-token chunks, moving the words after a comma to the next chunk when the
//!   comma is at most 20 tokens back; `a AND b:0.5` composes noise predictions (composable
//!   diffusion), a trailing `:w` on each part is its weight; `[from:to:when]`, `[to:when]`,
//!   `[from::when]` edit the prompt at a step (`when` < 1 is a fraction of the steps, else a
//!   step number) and `[a|b]` alternates every step; both nest.
//! - **optimizedSD**: `"tabby cat:0.25 white duck:0.75 hybrid"` is the blend
//!   `Σ (w_i / Σw) · CLIP(sub_i)` of the sub-prompts `tabby cat` (0.25), `white duck` (0.75) and
//!   `hybrid` (1); negative weights are allowed, Σw = 0 is an error.
//!
//! # The rule of [`PromptSyntax::Auto`]
//! The traditions overlap only on `:`. Auto reads a prompt as follows:
//! 1. If it contains the word `AND`, it is A1111 throughout: each AND part's trailing `:w` is
//!    the part's weight and every other colon is A1111's (or plain text).
//! 2. Otherwise a `:` that is outside every bracket (an escaped bracket does not count) and is
//!    immediately followed by a plain decimal number (`0.5`, `-1`, `.25`, `2.`) that ends at a
//!    space or at the end of the prompt is an optimizedSD weight. If these colons cut the
//!    prompt into two or more sub-prompts (a tail of spaces does not count), the prompt is an
//!    optimizedSD blend whose sub-prompts are each read as A1111 syntax (emphasis, editing,
//!    BREAK, chunks).
//! 3. Otherwise it is A1111. This includes a single `text:w` (A1111's weight of the only
//!    composable part), colons inside brackets (`(x:1.3)`, `[a:b:5]`), and every other colon,
//!    which is plain text (`"cat:big dog"`, `"a cat : 2 dog"`, `"x:"`, `"time: 5:30"`).
//!
//! [`PromptSyntax::A1111`], [`PromptSyntax::Optimized`] (optimizedSD exactly, quirks included,
//! prompts cut at 77 tokens, no emphasis) and [`PromptSyntax::Plain`] (the text as written, in
//! 75-token chunks) force one reading.

mod blend;
mod chunks;
mod editing;
mod emphasis;
mod report;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::limits::{exceeded, MAX_PROMPT_BYTES, MAX_PROMPT_NESTING, MAX_PROMPT_PARTS, MAX_STEPS};
use crate::{Error, Result};

pub use blend::split_weighted_subprompts;
pub use chunks::{
    chunks, encode, encode_batch, encode_blend, ChunkEncoder, EmbeddingFix, Encoded, EncoderOutput,
    WeightedChunk, CHUNK_TOKENS,
};
pub use editing::{prompt_edits, prompt_edits_with, EditClock, EditTimeline};
pub use emphasis::{parse_attention, Segment};
pub use report::{
    report, ChunkReport, PartReport, PromptReport, StepReport, TextReport, TokenReport,
};

/// Which prompt language a prompt is read in (`--prompt-syntax`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// A1111, or an optimizedSD blend by the rule in the module docs.
    #[default]
    Auto,
    /// AUTOMATIC1111's syntax only.
    A1111,
    /// optimizedSD's `text:weight` blend only, exactly as the original scripts read it.
    Optimized,
    /// No syntax: the text goes to the text encoder as written.
    Plain,
}

impl PromptSyntax {
    /// The names accepted by [`FromStr`].
    pub const NAMES: [&'static str; 4] = ["auto", "a1111", "optimized", "plain"];
}

impl FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "a1111" => Ok(Self::A1111),
            "optimized" => Ok(Self::Optimized),
            "plain" => Ok(Self::Plain),
            _ => Err(Error::InvalidRequest(format!(
                "unknown prompt syntax {s:?}; valid: {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for PromptSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Auto => "auto",
            Self::A1111 => "a1111",
            Self::Optimized => "optimized",
            Self::Plain => "plain",
        };
        f.write_str(name)
    }
}

/// What the model must be given for one prompt over a run of `steps` steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptPlan {
    /// The AND parts (one when the prompt has no AND); their noise predictions are combined.
    pub parts: Vec<PlanPart>,
}

/// One AND part: its composable-diffusion weight and the texts it takes over the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanPart {
    /// Multiplies this part's `cond − uncond` in CFG (A1111's composable diffusion).
    pub weight: f32,
    /// The texts the part is edited into, ordered by `until_step`; the last ends at `steps`.
    pub edits: Vec<Edit>,
}

/// The texts of a part, as prompt editing leaves them, up to a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edit {
    /// A1111's `end_at_step`: the entry serves every 0-based sampling step `s` with
    /// `s <= until_step` not served by an earlier entry (see [`PlanPart::at_step`]).
    pub until_step: usize,
    /// Texts (still with emphasis syntax) and weights to blend: one `(text, 1.0)` unless the
    /// prompt is an optimizedSD blend, whose weights are normalised to sum to 1.
    pub blend: Vec<(String, f32)>,
}

impl PlanPart {
    /// The entry to use at 0-based sampling step `step`, as A1111's `reconstruct_cond_batch`
    /// picks it: the first whose `until_step >= step`, else the first.
    pub fn at_step(&self, step: usize) -> &Edit {
        self.edits
            .iter()
            .find(|e| step <= e.until_step)
            .unwrap_or(&self.edits[0])
    }
}

/// Reads `text` in `syntax` for a run of `steps` sampling steps (on the current editing
/// timeline).
pub fn plan(text: &str, syntax: PromptSyntax, steps: usize) -> Result<PromptPlan> {
    plan_with(text, syntax, EditClock::new(steps, EditTimeline::Current))
}

/// Reads `text` in `syntax` for the pass `clock` describes.
pub fn plan_with(text: &str, syntax: PromptSyntax, clock: EditClock) -> Result<PromptPlan> {
    let steps = clock.span();
    if clock.steps == 0 || steps == 0 {
        return Err(Error::InvalidRequest(
            "a prompt plan needs at least 1 step".into(),
        ));
    }
    if steps.max(clock.steps) > MAX_STEPS {
        return Err(exceeded(
            "steps",
            steps.max(clock.steps),
            "MAX_STEPS",
            MAX_STEPS,
        ));
    }
    check_text("prompt", text)?;
    let single = |text: &str| PromptPlan {
        parts: vec![PlanPart {
            weight: 1.0,
            edits: vec![Edit {
                until_step: steps,
                blend: vec![(text.to_string(), 1.0)],
            }],
        }],
    };
    match syntax {
        PromptSyntax::Plain => Ok(single(text)),
        PromptSyntax::Optimized => {
            let subs = split_weighted_subprompts(text);
            check_parts(subs.len())?;
            // optimizedSD blends only from two sub-prompts on; one is encoded as typed.
            if subs.len() < 2 {
                return Ok(single(text));
            }
            let blend = normalise(&subs)?;
            Ok(PromptPlan {
                parts: vec![PlanPart {
                    weight: 1.0,
                    edits: vec![Edit {
                        until_step: steps,
                        blend,
                    }],
                }],
            })
        }
        PromptSyntax::A1111 => a1111_plan(text, clock),
        PromptSyntax::Auto => match reading(text) {
            Reading::Blend(subs) => blended_plan(&subs, clock),
            Reading::A1111 => a1111_plan(text, clock),
        },
    }
}

/// How Auto reads a prompt.
enum Reading {
    A1111,
    Blend(Vec<(String, f64)>),
}

fn reading(text: &str) -> Reading {
    if and_regex().is_match(text) {
        return Reading::A1111;
    }
    match blend::split_auto(text) {
        Some(subs) => Reading::Blend(subs),
        None => Reading::A1111,
    }
}

/// `a:0.3 AND b` → parts with A1111's prompt editing.
fn a1111_plan(text: &str, clock: EditClock) -> Result<PromptPlan> {
    let texts: Vec<&str> = and_regex().split(text).collect();
    check_parts(texts.len())?;
    let parts = texts
        .into_iter()
        .map(|part| {
            let (text, weight) = and_part_weight(part);
            Ok(PlanPart {
                weight: weight as f32,
                edits: prompt_edits_with(text, clock)?
                    .into_iter()
                    .map(|(until_step, text)| Edit {
                        until_step,
                        blend: vec![(text, 1.0)],
                    })
                    .collect(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(PromptPlan { parts })
}

/// An optimizedSD blend whose sub-prompts may use A1111 editing: one list of edits whose steps
/// are the union of the sub-prompts' steps.
fn blended_plan(subs: &[(String, f64)], clock: EditClock) -> Result<PromptPlan> {
    check_parts(subs.len())?;
    let weights = normalise(subs)?;
    let sub_edits = subs
        .iter()
        .map(|(t, _)| prompt_edits_with(t, clock))
        .collect::<Result<Vec<_>>>()?;
    let mut ends: Vec<usize> = sub_edits.iter().flatten().map(|(s, _)| *s).collect();
    ends.sort_unstable();
    ends.dedup();
    let edits = ends
        .into_iter()
        .map(|end| Edit {
            until_step: end,
            blend: sub_edits
                .iter()
                .zip(&weights)
                .map(|(edits, (_, w))| {
                    let text = edits
                        .iter()
                        .find(|(s, _)| *s >= end)
                        .map_or("", |(_, t)| t.as_str());
                    (text.to_string(), *w)
                })
                .collect(),
        })
        .collect();
    Ok(PromptPlan {
        parts: vec![PlanPart { weight: 1.0, edits }],
    })
}

/// Refuses more AND parts or sub-prompts than [`MAX_PROMPT_PARTS`].
fn check_parts(count: usize) -> Result<()> {
    if count > MAX_PROMPT_PARTS {
        return Err(exceeded(
            "the number of AND parts or weighted sub-prompts",
            count,
            "MAX_PROMPT_PARTS",
            MAX_PROMPT_PARTS,
        ));
    }
    Ok(())
}

/// Refuses a prompt (`what`: "prompt", "negative prompt") longer than [`MAX_PROMPT_BYTES`] or
/// nested deeper than [`MAX_PROMPT_NESTING`]: what a request's validation and every plan check
/// before any parsing.
pub(crate) fn check_text(what: &str, text: &str) -> Result<()> {
    if text.len() > MAX_PROMPT_BYTES {
        return Err(exceeded(
            format!("the {what}'s length in bytes"),
            text.len(),
            "MAX_PROMPT_BYTES",
            MAX_PROMPT_BYTES,
        ));
    }
    check_nesting(text)
}

/// Refuses a prompt whose brackets nest deeper than [`MAX_PROMPT_NESTING`], before either
/// parser sees it: the editing parser recurses once per level and the emphasis parser
/// multiplies every segment once per open bracket, so the depth bounds both. The count is the
/// deepest run of unescaped openers not yet closed by any closer, which no parser exceeds.
pub(crate) fn check_nesting(text: &str) -> Result<()> {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '(' | '[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_PROMPT_NESTING {
        return Err(exceeded(
            "the prompt's bracket nesting",
            deepest,
            "MAX_PROMPT_NESTING",
            MAX_PROMPT_NESTING,
        ));
    }
    Ok(())
}

/// `w_i / Σw`; a zero or non-finite total is an error (optimizedSD divides by zero).
fn normalise(subs: &[(String, f64)]) -> Result<Vec<(String, f32)>> {
    let total: f64 = subs.iter().map(|(_, w)| w).sum();
    if total == 0.0 || !total.is_finite() {
        let listed: Vec<String> = subs.iter().map(|(t, w)| format!("{t:?}:{w}")).collect();
        return Err(Error::InvalidRequest(format!(
            "the sub-prompt weights sum to {total}, so they cannot be normalised ({})",
            listed.join(" ")
        )));
    }
    Ok(subs
        .iter()
        .map(|(t, w)| (t.clone(), (w / total) as f32))
        .collect())
}

/// A1111's `re_weight`: an AND part's trailing `:w` (spaces allowed around the colon).
fn and_part_weight(part: &str) -> (&str, f64) {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"(?s)^(.*?)(?:\s*:\s*([-+]?(?:[0-9]+\.?|[0-9]*\.[0-9]+)))?\s*$")
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let Some(caps) = re.captures(part) else {
        return (part, 1.0);
    };
    let text = caps.get(1).map_or(part, |m| m.as_str());
    let weight = caps
        .get(2)
        .and_then(|m| m.as_str().parse().ok())
        .unwrap_or(1.0);
    (text, weight)
}

/// A1111's `\bAND\b`.
fn and_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\bAND\b").unwrap_or_else(|e| panic!("{e}")))
}

#[cfg(test)]
mod tests;
