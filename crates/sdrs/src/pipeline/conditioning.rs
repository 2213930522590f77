//! The conditioner in front of the UNet: a run's prompts turned, once before sampling, into
//! what the UNet is conditioned on — for the prompt's AND parts with their prompt edits, and
//! for the negative prompt's edits.

use std::sync::Arc;

use candle_core::Tensor;

use super::{Generation, StableDiffusion};
use crate::embeddings::Embedding;
use crate::models::clip::ClipTextTransformer;
use crate::models::unet::{AddedCondition, UNet2DConditionModel};
use crate::prompt::{
    chunks, encode_batch, encode_blend, plan_with, EditClock, EditTimeline, EmbeddingFix, Encoded,
    EncoderOutput, PromptPlan, PromptSyntax,
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
    /// SDXL's pooled text and size ids; none for SD 1 and 2.
    pub added: Option<AddedCondition>,
}

impl UnetCondition {
    /// Whether `conditions` can go through the UNet as one batch (prompts of different chunk
    /// counts cannot).
    pub(super) fn batchable(conditions: &[&Self]) -> bool {
        conditions.windows(2).all(|w| {
            w[0].context.dims() == w[1].context.dims()
                && w[0].added.is_some() == w[1].added.is_some()
        })
    }

    /// `conditions` stacked along the batch, in order.
    pub(super) fn cat(conditions: &[&Self]) -> Result<Self> {
        let contexts: Vec<&Tensor> = conditions.iter().map(|c| &c.context).collect();
        let added: Option<Vec<&AddedCondition>> =
            conditions.iter().map(|c| c.added.as_ref()).collect();
        let added = match added {
            Some(added) => {
                let texts: Vec<&Tensor> = added.iter().map(|a| &a.text_embeds).collect();
                let ids: Vec<&Tensor> = added.iter().map(|a| &a.time_ids).collect();
                Some(AddedCondition {
                    text_embeds: Tensor::cat(&texts, 0)?,
                    time_ids: Tensor::cat(&ids, 0)?,
                })
            }
            None => None,
        };
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
            added,
        })
    }

    /// The UNet's output for `x` at timestep `t` under this condition.
    pub(super) fn forward(
        &self,
        unet: &UNet2DConditionModel,
        x: &Tensor,
        t: f64,
    ) -> Result<Tensor> {
        unet.forward_with(x, t, &self.context, self.added.as_ref())
    }
}

/// SDXL's micro-conditioning: the six size ids its UNet is told, in diffusers' order and
/// names. Families without them ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeIds {
    /// `[height, width]` the training image had.
    pub original_size: [usize; 2],
    /// `[top, left]` where it was cropped.
    pub crops_coords_top_left: [usize; 2],
    /// `[height, width]` to aim for.
    pub target_size: [usize; 2],
}

impl SizeIds {
    /// The ids A1111 (and diffusers by default) give an image of `width` × `height`: that size
    /// as original and target, cropped at the top left corner.
    pub fn of(width: usize, height: usize) -> Self {
        Self {
            original_size: [height, width],
            crops_coords_top_left: [0, 0],
            target_size: [height, width],
        }
    }

    /// The ids for a pass of `request` making `width` × `height`: the request's where it sets
    /// them, else [`SizeIds::of`].
    pub(super) fn for_pass(
        request: &super::GenerationRequest,
        width: usize,
        height: usize,
    ) -> Self {
        let image = Self::of(width, height);
        Self {
            original_size: request.original_size.unwrap_or(image.original_size),
            crops_coords_top_left: request.crops_coords_top_left,
            target_size: request.target_size.unwrap_or(image.target_size),
        }
    }

    /// `[1, 6]`: original, crop, target.
    fn tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let ids: Vec<f32> = [
            self.original_size,
            self.crops_coords_top_left,
            self.target_size,
        ]
        .iter()
        .flatten()
        .map(|&v| v as f32)
        .collect();
        Ok(Tensor::from_vec(ids, (1, 6), device)?)
    }
}

/// Chunk ids padded with another token after their first EOS (SDXL's second encoder pads
/// with 0, its first with EOS).
fn repad(ids: &Tensor, pad: u32) -> Result<Tensor> {
    let mut rows = ids.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?;
    for row in &mut rows {
        if let Some(eos) = row.iter().position(|&id| id == crate::tokenizer::EOS) {
            for id in &mut row[eos + 1..] {
                *id = pad;
            }
        }
    }
    let (batch, tokens) = ids.dims2()?;
    let flat: Vec<u32> = rows.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (batch, tokens), ids.device())?)
}

/// Runs a family's text encoders on one chunk. One encoder (SD 1, 2): its states at the clip
/// skip, after the final LayerNorm. Several (SDXL, as A1111 and diffusers run them): each
/// one's penultimate states without the final LayerNorm, clip skip not applying, and the
/// projected pooled output of the one with a projection.
fn run_encoders(
    encoders: &[(Arc<ClipTextTransformer>, u32)],
    ids: &Tensor,
    fixes: &[EmbeddingFix],
    clip_skip: usize,
    device: &candle_core::Device,
) -> Result<EncoderOutput> {
    // A fix's offset does not count BOS.
    let replacements: Vec<(usize, &Tensor)> = fixes
        .iter()
        .map(|f| (f.offset + 1, &f.embedding.vectors))
        .collect();
    if let [(encoder, _)] = encoders {
        let ids = ids.to_device(device)?;
        return Ok(encoder
            .forward_replacing(&ids, &replacements, clip_skip)?
            .into());
    }
    let mut out = EncoderOutput {
        states: Vec::with_capacity(encoders.len()),
        pooled: None,
    };
    // An embedding's vectors hold every encoder's columns side by side, in role order
    // (SDXL's: `clip_l`, then `clip_g`).
    let mut column = 0;
    for (encoder, pad) in encoders {
        let ids = repad(ids, *pad)?.to_device(device)?;
        let width = encoder.width();
        let own: Vec<Tensor> = fixes
            .iter()
            .map(|f| f.embedding.vectors.narrow(1, column, width))
            .collect::<candle_core::Result<_>>()?;
        column += width;
        let replacements: Vec<(usize, &Tensor)> = fixes
            .iter()
            .zip(&own)
            .map(|(f, v)| (f.offset + 1, v))
            .collect();
        let penultimate = encoder.layer_count().saturating_sub(1);
        if encoder.has_projection() {
            let (states, pooled) = encoder.hidden_and_pooled(&ids, &replacements, penultimate)?;
            out.states.push(states);
            out.pooled = Some(encoder.project(&pooled)?);
        } else {
            out.states
                .push(encoder.hidden_states(&ids, &replacements, penultimate)?);
        }
    }
    Ok(out)
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
    size: SizeIds,
) -> Result<Vec<EncodedPart>> {
    let encoders = sd
        .pad_tokens
        .iter()
        .enumerate()
        .map(|(i, &pad)| Ok((sd.text_encoder_at(i)?, pad)))
        .collect::<Result<Vec<_>>>()?;
    let embeddings = sd.embeddings();
    let mut encoder = |ids: &Tensor, fixes: &[EmbeddingFix]| {
        run_encoders(&encoders, ids, fixes, clip_skip, &sd.device)
    };
    let pad = sd.pad_token;
    plan.parts
        .iter()
        .map(|part| {
            let plain = part
                .edits
                .iter()
                .all(|s| matches!(s.blend.as_slice(), [(_, w)] if *w == 1.0));
            let encoded = if plain {
                // A1111 encodes one part's edited texts as a batch (shared emphasis means).
                let texts: Vec<&str> = part.edits.iter().map(|s| s.blend[0].0.as_str()).collect();
                encode_batch(
                    &sd.tokenizer,
                    &embeddings,
                    &texts,
                    syntax,
                    pad,
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
                            pad,
                            &mut encoder,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let edits = part
                .edits
                .iter()
                .zip(encoded)
                .map(|(s, e)| Ok((s.until_step, condition(e, size, &sd.device)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(EncodedPart {
                weight: part.weight,
                edits,
            })
        })
        .collect()
}

/// The UNet condition of an encoded text: the size ids go with a pooled embedding.
fn condition(
    encoded: Encoded,
    size: SizeIds,
    device: &candle_core::Device,
) -> Result<UnetCondition> {
    let added = match encoded.pooled {
        Some(text_embeds) => Some(AddedCondition {
            text_embeds,
            time_ids: size.tensor(device)?,
        }),
        None => None,
    };
    Ok(UnetCondition {
        context: encoded.context,
        added,
    })
}

/// `part` with every condition's text zeroed, its size ids kept: what A1111's SDXL
/// conditioner (`force_zero_embeddings`) gives an empty negative prompt.
fn zeroed(part: EncodedPart) -> Result<EncodedPart> {
    let edits = part
        .edits
        .into_iter()
        .map(|(until, c)| {
            let added = match c.added {
                Some(a) => Some(AddedCondition {
                    text_embeds: a.text_embeds.zeros_like()?,
                    time_ids: a.time_ids,
                }),
                None => None,
            };
            Ok((
                until,
                UnetCondition {
                    context: c.context.zeros_like()?,
                    added,
                },
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EncodedPart {
        weight: part.weight,
        edits,
    })
}

impl StableDiffusion {
    /// The conditioning of `gen`'s prompts for the pass `clock` describes, which makes an
    /// image of `(width, height)` pixels.
    pub(super) fn conditioning_for(
        &self,
        gen: &Generation,
        clock: EditClock,
        (width, height): (usize, usize),
    ) -> Result<Conditioning> {
        let req = &gen.request;
        self.apply_loras(gen)?;
        let (prompt, negative) = &gen.texts;
        let size = SizeIds::for_pass(req, width, height);
        self.conditioning_with(
            prompt,
            negative,
            req.prompt_syntax,
            clock,
            req.clip_skip,
            size,
        )
    }

    /// Parses and encodes a prompt and its negative for a run of `steps` steps, with the size
    /// ids SDXL's UNet is told.
    pub fn conditioning(
        &self,
        prompt: &str,
        negative_prompt: &str,
        syntax: PromptSyntax,
        steps: usize,
        clip_skip: usize,
        size: SizeIds,
    ) -> Result<Conditioning> {
        let clock = EditClock::new(steps, EditTimeline::Current);
        self.conditioning_with(prompt, negative_prompt, syntax, clock, clip_skip, size)
    }

    /// Parses and encodes a prompt and its negative for the pass `clock` describes, with the
    /// size ids SDXL's UNet is told. For SDXL an empty negative prompt is zeros
    /// (text and pooled text, not the size ids), as A1111 conditions it; diffusers does the
    /// same for `negative_prompt=None`, and encodes `""` only when given it.
    pub fn conditioning_with(
        &self,
        prompt: &str,
        negative_prompt: &str,
        syntax: PromptSyntax,
        clock: EditClock,
        clip_skip: usize,
        size: SizeIds,
    ) -> Result<Conditioning> {
        let plan = plan_with(prompt, syntax, clock)?;
        let parts = encode_plan(self, &plan, syntax, clip_skip, size)?;
        let negative = plan_with(negative_prompt, syntax, clock)?;
        if negative.parts.len() != 1 {
            return Err(Error::InvalidRequest(
                "AND (composable diffusion) is for the prompt; the negative prompt cannot use it"
                    .into(),
            ));
        }
        let empty = negative.parts[0]
            .edits
            .iter()
            .all(|e| e.blend.iter().all(|(text, _)| text.is_empty()));
        let uncond = encode_plan(self, &negative, syntax, clip_skip, size)?.remove(0);
        let uncond = if empty && self.unet_inputs.pooled_text_and_size {
            zeroed(uncond)?
        } else {
            uncond
        };
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
