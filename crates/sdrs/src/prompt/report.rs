//! A description of how a prompt is read, for `sdrs tokenize` to print.

use serde::Serialize;

use super::chunks::chunks;
use super::emphasis::parse_attention;
use super::{plan_with, reading, EditClock, PromptSyntax, Reading};
use crate::embeddings::Embeddings;
use crate::tokenizer::{Tokenizer, EOS};
use crate::Result;

/// How a prompt is read: which tradition, its parts, and per step what the model gets.
#[derive(Debug, Clone, Serialize)]
pub struct PromptReport {
    /// The syntax asked for.
    pub syntax: PromptSyntax,
    /// The reading taken, in words (`"a1111"`, `"optimizedSD blend (A1111 inside each
    /// sub-prompt)"`, …).
    pub reading: String,
    /// Sampling steps the edits cover.
    pub steps: usize,
    /// AND parts (one when the prompt has no AND).
    pub parts: Vec<PartReport>,
}

/// One AND part.
#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    /// Its composable-diffusion weight.
    pub weight: f32,
    /// Its texts over the run, in order. Serialized as `schedule`, the key `sdrs tokenize`
    /// has always printed.
    #[serde(rename = "schedule")]
    pub edits: Vec<StepReport>,
}

/// The texts of a part up to a step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// A1111's `end_at_step` (see [`Edit::until_step`](super::Edit::until_step)).
    pub until_step: usize,
    /// The blended texts (one unless optimizedSD blend).
    pub texts: Vec<TextReport>,
}

/// One text as the text encoder gets it.
#[derive(Debug, Clone, Serialize)]
pub struct TextReport {
    /// The text, emphasis syntax included.
    pub text: String,
    /// Its blend weight (normalised).
    pub weight: f32,
    /// Emphasis segments: text and multiplier (`("BREAK", -1)` marks a break).
    pub segments: Vec<(String, f64)>,
    /// The 77-token chunks.
    pub chunks: Vec<ChunkReport>,
}

/// One chunk: its prompt tokens (BOS, EOS and padding left out).
#[derive(Debug, Clone, Serialize)]
pub struct ChunkReport {
    /// The tokens with their emphasis.
    pub tokens: Vec<TokenReport>,
    /// How many of the 75 places are padding.
    pub padding: usize,
}

/// One token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenReport {
    /// Token id.
    pub id: u32,
    /// BPE text (`"photo</w>"`).
    pub token: String,
    /// Emphasis multiplier.
    pub weight: f32,
}

/// Describes how `text` is read in `syntax` for the pass `clock` describes (`pad`: 49407 for
/// SD 1, 0 for SD 2); an embedding's positions show as `<name> i/n`.
pub fn report(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    text: &str,
    syntax: PromptSyntax,
    clock: EditClock,
    pad: u32,
) -> Result<PromptReport> {
    let plan = plan_with(text, syntax, clock)?;
    let reading = match syntax {
        PromptSyntax::Auto => match reading(text) {
            Reading::Blend(_) => "optimizedSD blend (A1111 syntax inside each sub-prompt)",
            Reading::A1111 => "a1111",
        },
        PromptSyntax::A1111 => "a1111",
        PromptSyntax::Optimized if plan.parts[0].edits[0].blend.len() > 1 => "optimizedSD blend",
        PromptSyntax::Optimized => "optimizedSD (a single sub-prompt is encoded as typed)",
        PromptSyntax::Plain => "plain",
    };
    let mut parts = Vec::with_capacity(plan.parts.len());
    for part in &plan.parts {
        let mut edits = Vec::with_capacity(part.edits.len());
        for edit in &part.edits {
            let texts = edit
                .blend
                .iter()
                .map(|(text, weight)| {
                    text_report(tokenizer, embeddings, text, *weight, syntax, pad)
                })
                .collect::<Result<Vec<_>>>()?;
            edits.push(StepReport {
                until_step: edit.until_step,
                texts,
            });
        }
        parts.push(PartReport {
            weight: part.weight,
            edits,
        });
    }
    Ok(PromptReport {
        syntax,
        reading: reading.to_string(),
        steps: clock.span(),
        parts,
    })
}

fn text_report(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    text: &str,
    weight: f32,
    syntax: PromptSyntax,
    pad: u32,
) -> Result<TextReport> {
    let segments = match syntax {
        PromptSyntax::A1111 | PromptSyntax::Auto => parse_attention(text)?,
        PromptSyntax::Optimized | PromptSyntax::Plain => vec![(text.to_string(), 1.0)],
    };
    let chunks = chunks(tokenizer, embeddings, text, syntax, pad)?
        .into_iter()
        .map(|chunk| {
            // The prompt tokens sit between BOS and the closing EOS; padding is EOS or `pad`.
            let inner = &chunk.ids[1..chunk.ids.len() - 1];
            // An embedding's positions hold id 0, SD 2's pad: they count as used.
            let used = inner
                .iter()
                .rposition(|&id| id != EOS && id != pad)
                .map_or(0, |i| i + 1)
                .max(
                    chunk
                        .fixes
                        .iter()
                        .map(|f| (f.offset + f.embedding.info.vectors).min(inner.len()))
                        .max()
                        .unwrap_or(0),
                );
            let embedding_at = |i: usize| {
                chunk.fixes.iter().find_map(|f| {
                    let n = f.embedding.info.vectors;
                    (f.offset..f.offset + n)
                        .contains(&i)
                        .then(|| format!("<{}> {}/{n}", f.embedding.info.name, i - f.offset + 1))
                })
            };
            let tokens = inner[..used]
                .iter()
                .zip(&chunk.weights[1..])
                .enumerate()
                .map(|(i, (&id, &weight))| TokenReport {
                    id,
                    token: embedding_at(i)
                        .unwrap_or_else(|| tokenizer.token(id).unwrap_or("?").to_string()),
                    weight,
                })
                .collect();
            ChunkReport {
                tokens,
                padding: inner.len() - used,
            }
        })
        .collect();
    Ok(TextReport {
        text: text.to_string(),
        weight,
        segments,
        chunks,
    })
}
