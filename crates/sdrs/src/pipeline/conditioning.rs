//! The conditioner in front of the UNet: a run's prompts turned, once before sampling, into
//! what the UNet is conditioned on — for the prompt's AND parts with their prompt edits, and
//! for the negative prompt's edits.

use std::sync::Arc;

use candle_core::Tensor;

use super::{Generation, StableDiffusion};
use crate::embeddings::Embedding;
use crate::models::unet::UNet2DConditionModel;
use crate::prompt::{
    chunks, encode_batch, encode_blend, plan_with, EditClock, EditTimeline, EmbeddingFix,
    PromptPlan, PromptSyntax,
};
use crate::{Error, Result};

/// What the UNet is conditioned on for one prompt at one step, besides the noisy latent and
/// the timestep. SD 1.x and 2.x take the text encoder's context; a family whose
/// [`UnetInputs`](crate::weights::UnetInputs) ask for more (SDXL's pooled text and size ids,
/// inpainting's mask channels) adds its fields here, and the denoiser passes them on as they
/// are.
#[derive(Debug, Clone)]
pub struct UnetCondition {
    /// The cross-attention context, `[batch, tokens, width]`.
    pub context: Tensor,
}

impl UnetCondition {
    /// Whether `conditions` can go through the UNet as one batch (prompts of different chunk
    /// counts cannot).
    pub(super) fn batchable(conditions: &[&Self]) -> bool {
        conditions
            .windows(2)
            .all(|w| w[0].context.dims() == w[1].context.dims())
    }

    /// `conditions` stacked along the batch, in order.
    pub(super) fn cat(conditions: &[&Self]) -> Result<Self> {
        let contexts: Vec<&Tensor> = conditions.iter().map(|c| &c.context).collect();
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
        })
    }

    /// The UNet's output for `x` at timestep `t` under this condition.
    pub(super) fn forward(
        &self,
        unet: &UNet2DConditionModel,
        x: &Tensor,
        t: f64,
    ) -> Result<Tensor> {
        unet.forward(x, t, &self.context)
    }
}

/// One encoded prompt part: its AND weight and its condition for each stretch of steps.
pub struct EncodedPart {
    /// The part's AND weight (composable diffusion).
    pub weight: f32,
    /// `(until_step, condition)`: serves 0-based steps up to `until_step` (A1111's
    /// `end_at_step`).
    edits: Vec<(usize, UnetCondition)>,
}

impl EncodedPart {
    /// The condition for 0-based sampling step `step` (A1111's `reconstruct_cond_batch`).
    pub fn at(&self, step: usize) -> &UnetCondition {
        let found = self.edits.iter().find(|(until, _)| step <= *until);
        &found.unwrap_or(&self.edits[0]).1
    }
}

/// Everything the denoiser needs from the text.
pub struct Conditioning {
    /// The prompt's AND parts.
    pub parts: Vec<EncodedPart>,
    /// The negative prompt (the unconditional side of guidance).
    pub uncond: EncodedPart,
}

impl Conditioning {
    /// Whether the unconditional pass is skipped: one part of weight 1 at a scale of at most 1
    /// (diffusers' `guidance_scale > 1` test; SD-Turbo runs at 0), which halves the UNet work.
    pub fn unguided(&self, cfg_scale: f64) -> bool {
        cfg_scale <= 1.0 && self.parts.len() == 1 && self.parts[0].weight == 1.0
    }
}

fn encode_plan(
    sd: &StableDiffusion,
    plan: &PromptPlan,
    syntax: PromptSyntax,
    clip_skip: usize,
) -> Result<Vec<EncodedPart>> {
    let text_encoder = sd.text_encoder()?;
    let embeddings = sd.embeddings();
    let mut encoder = |ids: &Tensor, fixes: &[EmbeddingFix]| {
        // A fix's offset does not count BOS.
        let replacements: Vec<(usize, &Tensor)> = fixes
            .iter()
            .map(|f| (f.offset + 1, &f.embedding.vectors))
            .collect();
        text_encoder.forward_replacing(&ids.to_device(&sd.device)?, &replacements, clip_skip)
    };
    plan.parts
        .iter()
        .map(|part| {
            let plain = part
                .edits
                .iter()
                .all(|s| matches!(s.blend.as_slice(), [(_, w)] if *w == 1.0));
            let contexts = if plain {
                // A1111 encodes one part's edited texts as a batch (shared emphasis means).
                let texts: Vec<&str> = part.edits.iter().map(|s| s.blend[0].0.as_str()).collect();
                encode_batch(
                    &sd.tokenizer,
                    &embeddings,
                    &texts,
                    syntax,
                    sd.pad_token,
                    &mut encoder,
                )?
            } else {
                part.edits
                    .iter()
                    .map(|s| {
                        encode_blend(
                            &sd.tokenizer,
                            &embeddings,
                            &s.blend,
                            syntax,
                            sd.pad_token,
                            &mut encoder,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            Ok(EncodedPart {
                weight: part.weight,
                edits: part
                    .edits
                    .iter()
                    .map(|s| s.until_step)
                    .zip(
                        contexts
                            .into_iter()
                            .map(|context| UnetCondition { context }),
                    )
                    .collect(),
            })
        })
        .collect()
}

impl StableDiffusion {
    /// The conditioning of `gen`'s prompts for the pass `clock` describes.
    pub(super) fn conditioning_for(
        &self,
        gen: &Generation,
        clock: EditClock,
    ) -> Result<Conditioning> {
        let req = &gen.request;
        self.apply_loras(gen)?;
        let (prompt, negative) = &gen.texts;
        self.conditioning_with(prompt, negative, req.prompt_syntax, clock, req.clip_skip)
    }

    /// Parses and encodes a prompt and its negative for a run of `steps` steps.
    pub fn conditioning(
        &self,
        prompt: &str,
        negative_prompt: &str,
        syntax: PromptSyntax,
        steps: usize,
        clip_skip: usize,
    ) -> Result<Conditioning> {
        let clock = EditClock::new(steps, EditTimeline::Current);
        self.conditioning_with(prompt, negative_prompt, syntax, clock, clip_skip)
    }

    /// Parses and encodes a prompt and its negative for the pass `clock` describes.
    pub fn conditioning_with(
        &self,
        prompt: &str,
        negative_prompt: &str,
        syntax: PromptSyntax,
        clock: EditClock,
        clip_skip: usize,
    ) -> Result<Conditioning> {
        let parts = encode_plan(self, &plan_with(prompt, syntax, clock)?, syntax, clip_skip)?;
        let negative = plan_with(negative_prompt, syntax, clock)?;
        if negative.parts.len() != 1 {
            return Err(Error::InvalidRequest(
                "AND (composable diffusion) is for the prompt; the negative prompt cannot use it"
                    .into(),
            ));
        }
        let uncond = encode_plan(self, &negative, syntax, clip_skip)?.remove(0);
        Ok(Conditioning { parts, uncond })
    }

    /// The embeddings `prompt` and `negative_prompt` name, each once, the prompt's first, in
    /// the order they first appear, for the pass `clock` describes.
    pub fn embeddings_used(
        &self,
        prompt: &str,
        negative_prompt: &str,
        syntax: PromptSyntax,
        clock: EditClock,
    ) -> Result<Vec<Arc<Embedding>>> {
        let embeddings = self.embeddings();
        let mut used: Vec<Arc<Embedding>> = Vec::new();
        if embeddings.is_empty() {
            return Ok(used);
        }
        for text in [prompt, negative_prompt] {
            for part in plan_with(text, syntax, clock)?.parts {
                for edit in part.edits {
                    for (sub, _) in edit.blend {
                        for chunk in chunks(&self.tokenizer, &embeddings, &sub, syntax, 0)? {
                            for fix in chunk.fixes {
                                if !used.iter().any(|e| e.info.name == fix.embedding.info.name) {
                                    used.push(fix.embedding);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(used)
    }

    /// `(name, short hash)` of the embeddings `gen`'s prompts name, for the infotext's
    /// `TI hashes` (A1111 leaves out embeddings without a hash).
    pub(super) fn ti_hashes(&self, gen: &Generation) -> Result<Vec<(String, String)>> {
        let req = &gen.request;
        let clock = EditClock::new(req.steps, req.edit_timeline);
        let (prompt, negative) = &gen.texts;
        Ok(self
            .embeddings_used(prompt, negative, req.prompt_syntax, clock)?
            .iter()
            .filter_map(|e| Some((e.info.name.clone(), e.info.shorthash()?.to_string())))
            .collect())
    }
}
