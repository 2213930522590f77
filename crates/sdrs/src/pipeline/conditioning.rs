//! The text conditioning of a run: the prompt's AND parts with their prompt edits, and the
//! negative prompt's edits, encoded once before sampling.

use candle_core::Tensor;

use super::{Generation, StableDiffusion};
use crate::prompt::{encode_batch, encode_blend, plan, PromptPlan, PromptSyntax};
use crate::{Error, Result};

/// One encoded prompt part: its AND weight and the conditioning for each stretch of steps.
pub struct EncodedPart {
    /// The part's AND weight (composable diffusion).
    pub weight: f32,
    /// `(until_step, context)`: serves 0-based steps up to `until_step` (A1111's `end_at_step`).
    edits: Vec<(usize, Tensor)>,
}

impl EncodedPart {
    /// The context for 0-based sampling step `step` (A1111's `reconstruct_cond_batch`).
    pub fn at(&self, step: usize) -> &Tensor {
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
    let mut encoder = |ids: &Tensor| text_encoder.forward(&ids.to_device(&sd.device)?, clip_skip);
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
                encode_batch(&sd.tokenizer, &texts, syntax, sd.pad_token, &mut encoder)?
            } else {
                part.edits
                    .iter()
                    .map(|s| {
                        encode_blend(&sd.tokenizer, &s.blend, syntax, sd.pad_token, &mut encoder)
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            Ok(EncodedPart {
                weight: part.weight,
                edits: part
                    .edits
                    .iter()
                    .map(|s| s.until_step)
                    .zip(contexts)
                    .collect(),
            })
        })
        .collect()
}

impl StableDiffusion {
    /// The conditioning of `gen`'s prompts for a pass of `steps` steps.
    pub(super) fn conditioning_for(&self, gen: &Generation, steps: usize) -> Result<Conditioning> {
        let req = &gen.request;
        self.conditioning(
            &req.prompt,
            &req.negative_prompt,
            req.prompt_syntax,
            steps,
            req.clip_skip,
        )
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
        let parts = encode_plan(self, &plan(prompt, syntax, steps)?, syntax, clip_skip)?;
        let negative = plan(negative_prompt, syntax, steps)?;
        if negative.parts.len() != 1 {
            return Err(Error::InvalidRequest(
                "AND (composable diffusion) is for the prompt; the negative prompt cannot use it"
                    .into(),
            ));
        }
        let uncond = encode_plan(self, &negative, syntax, clip_skip)?.remove(0);
        Ok(Conditioning { parts, uncond })
    }
}
