//! Tokens in 75-token chunks with their emphasis, and their encoding: A1111's
//! `FrozenCLIPEmbedderWithCustomWords` (`tokenize_line`, `process_tokens`, "Original" emphasis)
//! and optimizedSD's blend of full encodings. Textual-inversion embeddings named in the text
//! take `vectors` positions of a chunk each, as [`EmbeddingFix`]es the encoder applies.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::emphasis::{parse_attention, Segment, BREAK_WEIGHT};
use super::PromptSyntax;
use crate::embeddings::{Embedding, Embeddings};
use crate::limits::{exceeded, MAX_PROMPT_CHUNKS};
use crate::tokenizer::{Tokenizer, BOS, EOS};
use crate::{Error, Result};

/// Prompt tokens per chunk; a chunk is these plus BOS and EOS.
pub const CHUNK_TOKENS: usize = 75;
/// How far back (in tokens) a comma may be for the words after it to move to the next chunk
/// (A1111's `comma_padding_backtrack` default).
const COMMA_BACKTRACK: usize = 20;
/// `,</w>`.
const COMMA: u32 = 267;

/// An embedding's vectors in a chunk (A1111's `PromptChunkFix`): they replace the token
/// embeddings of positions `offset + 1 ..` (after BOS) before the position embeddings are added.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingFix {
    /// Where the first vector goes, counted in the chunk's 75 tokens (BOS not counted).
    pub offset: usize,
    /// The embedding whose vectors go there.
    pub embedding: Arc<Embedding>,
}

/// One chunk for the text encoder: 77 ids (BOS, 75 tokens or padding, EOS), their emphasis,
/// and the embeddings whose vectors replace some of them.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChunk {
    /// BOS, tokens, EOS-padding, EOS; after the first EOS, `pad` when it is not EOS (SD 2).
    /// An embedding's positions hold id 0 until its vectors replace them.
    pub ids: Vec<u32>,
    /// Emphasis per id; 1.0 on BOS, EOS and padding.
    pub weights: Vec<f32>,
    /// The embeddings in the chunk.
    pub fixes: Vec<EmbeddingFix>,
}

impl WeightedChunk {
    /// A chunk of no tokens (A1111's `empty_chunk`).
    pub fn empty(pad: u32) -> Self {
        Self::close(Vec::new(), Vec::new(), Vec::new(), pad)
    }

    /// Pads 0..=75 tokens to a full chunk, then applies `pad` after the first EOS.
    fn close(
        mut tokens: Vec<u32>,
        mut weights: Vec<f32>,
        fixes: Vec<EmbeddingFix>,
        pad: u32,
    ) -> Self {
        tokens.resize(CHUNK_TOKENS, EOS);
        weights.resize(CHUNK_TOKENS, 1.0);
        let mut ids = Vec::with_capacity(CHUNK_TOKENS + 2);
        ids.push(BOS);
        ids.extend(tokens);
        ids.push(EOS);
        let mut w = Vec::with_capacity(CHUNK_TOKENS + 2);
        w.push(1.0);
        w.extend(weights);
        w.push(1.0);
        if let Some(first_eos) = ids.iter().position(|&id| id == EOS) {
            for id in &mut ids[first_eos + 1..] {
                *id = pad;
            }
        }
        Self {
            ids,
            weights: w,
            fixes,
        }
    }
}

/// The chunks of one text (no AND, no editing left): A1111 and Auto parse emphasis and BREAK;
/// Plain keeps the text as one unweighted piece; Optimized cuts it to one 77-token chunk as
/// optimizedSD's encoder does (and knows no embeddings). An empty text is one chunk.
pub fn chunks(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    text: &str,
    syntax: PromptSyntax,
    pad: u32,
) -> Result<Vec<WeightedChunk>> {
    let chunks = match syntax {
        PromptSyntax::Optimized => {
            let ids = tokenizer.encode_padded(text, CHUNK_TOKENS + 2, pad);
            let weights = vec![1.0; ids.len()];
            vec![WeightedChunk {
                ids,
                weights,
                fixes: Vec::new(),
            }]
        }
        PromptSyntax::Plain => {
            chunk_segments(tokenizer, embeddings, &[(text.to_string(), 1.0)], pad)
        }
        PromptSyntax::A1111 | PromptSyntax::Auto => {
            chunk_segments(tokenizer, embeddings, &parse_attention(text)?, pad)
        }
    };
    if chunks.len() > MAX_PROMPT_CHUNKS {
        return Err(exceeded(
            format!("the number of {CHUNK_TOKENS}-token chunks of a prompt"),
            chunks.len(),
            "MAX_PROMPT_CHUNKS",
            MAX_PROMPT_CHUNKS,
        ));
    }
    Ok(chunks)
}

/// A1111's `tokenize_line`: each segment is tokenized on its own; a chunk closes at 75 tokens,
/// first moving the tokens after a comma at most 20 back into the next chunk; BREAK closes the
/// current chunk even when it is empty. An embedding whose name's ids start at a token takes
/// its `vectors` positions at the segment's weight, in the next chunk when they would not fit
/// in this one.
fn chunk_segments(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    segments: &[Segment],
    pad: u32,
) -> Vec<WeightedChunk> {
    let mut out = Vec::new();
    let mut tokens: Vec<u32> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    let mut fixes: Vec<EmbeddingFix> = Vec::new();
    let mut last_comma: Option<usize> = None;
    // A1111's `next_chunk`: the chunk so far, padded, goes out; the next starts empty.
    let close = |out: &mut Vec<WeightedChunk>,
                 tokens: &mut Vec<u32>,
                 weights: &mut Vec<f32>,
                 fixes: &mut Vec<EmbeddingFix>| {
        out.push(WeightedChunk::close(
            std::mem::take(tokens),
            std::mem::take(weights),
            std::mem::take(fixes),
            pad,
        ));
    };
    for (text, weight) in segments {
        if text == "BREAK" && *weight == BREAK_WEIGHT {
            close(&mut out, &mut tokens, &mut weights, &mut fixes);
            last_comma = None;
            continue;
        }
        // Python floats become f32 when A1111 makes its multiplier tensor.
        let weight = *weight as f32;
        let ids = tokenizer.encode(text);
        let mut position = 0;
        while let Some(&token) = ids.get(position) {
            if token == COMMA {
                last_comma = Some(tokens.len());
            } else if let Some(comma) = last_comma
                .filter(|&c| tokens.len() == CHUNK_TOKENS && CHUNK_TOKENS - c <= COMMA_BACKTRACK)
            {
                let moved_tokens = tokens.split_off(comma + 1);
                let moved_weights = weights.split_off(comma + 1);
                // A1111 moves the tokens and weights but leaves the chunk's fixes behind: an
                // embedding after the comma is written over the old chunk's padding, and its
                // moved positions keep id 0. Kept, so that images match A1111's.
                close(&mut out, &mut tokens, &mut weights, &mut fixes);
                tokens = moved_tokens;
                weights = moved_weights;
                last_comma = None;
            }
            if tokens.len() == CHUNK_TOKENS {
                close(&mut out, &mut tokens, &mut weights, &mut fixes);
                last_comma = None;
            }
            let Some((embedding, name_tokens)) = embeddings.find_at(&ids, position) else {
                tokens.push(token);
                weights.push(weight);
                position += 1;
                continue;
            };
            let vectors = embedding.info.vectors;
            if tokens.len() + vectors > CHUNK_TOKENS {
                close(&mut out, &mut tokens, &mut weights, &mut fixes);
                last_comma = None;
            }
            fixes.push(EmbeddingFix {
                offset: tokens.len(),
                embedding: embedding.clone(),
            });
            tokens.extend(std::iter::repeat_n(0, vectors));
            weights.extend(std::iter::repeat_n(weight, vectors));
            position += name_tokens;
        }
    }
    if !tokens.is_empty() || out.is_empty() {
        close(&mut out, &mut tokens, &mut weights, &mut fixes);
    }
    out
}

/// What the text encoders give for one chunk of 77 ids.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Each text encoder's hidden states `[1, 77, width]`, in role order; emphasis is applied
    /// to each on its own, as A1111 does per encoder, and they are then concatenated.
    pub states: Vec<Tensor>,
    /// The pooled (and projected) embedding `[1, width]` SDXL's UNet also takes, if any.
    pub pooled: Option<Tensor>,
}

impl From<Tensor> for EncoderOutput {
    /// One text encoder's hidden states, without a pooled embedding (SD 1 and 2).
    fn from(states: Tensor) -> Self {
        Self {
            states: vec![states],
            pooled: None,
        }
    }
}

/// One text encoded: its context, and the pooled embedding of its first chunk (A1111 takes
/// the pooled output of the first chunk).
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[1, 77·k, width]`: the encoders' states side by side, chunks one after another.
    pub context: Tensor,
    /// `[1, width]`, when the encoders give one.
    pub pooled: Option<Tensor>,
}

/// The callback that runs the text encoders on one chunk: `[1, 77]` u32 ids on the CPU (padded
/// with the first encoder's pad token) and the chunk's embeddings.
pub type ChunkEncoder<'a> = dyn FnMut(&Tensor, &[EmbeddingFix]) -> Result<EncoderOutput> + 'a;

/// Encodes one text: each chunk through `encoder`, emphasis applied to each encoder's states
/// as `z *= w`, then `z *= mean_before / mean_after`, the encoders' states concatenated on the
/// width and chunks on the token axis → `[1, 77·k, H]`, in the encoder's dtype.
pub fn encode(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    text: &str,
    syntax: PromptSyntax,
    pad: u32,
    encoder: &mut ChunkEncoder,
) -> Result<Encoded> {
    let mut out = encode_batch(tokenizer, embeddings, &[text], syntax, pad, encoder)?;
    out.pop()
        .ok_or_else(|| Error::InvalidRequest("no text to encode".into()))
}

/// Encodes several texts as A1111 encodes one part's scheduled texts together: texts with
/// fewer chunks get empty chunks so all come out `[1, 77·k, H]` with the same `k`, and the
/// emphasis means of chunk `i` are taken over chunk `i` of every text (this differs from
/// [`encode`] of each text only when a text uses emphasis).
pub fn encode_batch(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    texts: &[&str],
    syntax: PromptSyntax,
    pad: u32,
    encoder: &mut ChunkEncoder,
) -> Result<Vec<Encoded>> {
    let all = texts
        .iter()
        .map(|t| chunks(tokenizer, embeddings, t, syntax, pad))
        .collect::<Result<Vec<_>>>()?;
    let count = all.iter().map(Vec::len).max().unwrap_or(0);
    let empty = WeightedChunk::empty(pad);
    let mut per_text: Vec<Vec<Tensor>> = vec![Vec::with_capacity(count); texts.len()];
    let mut pooled: Vec<Option<Tensor>> = vec![None; texts.len()];
    for i in 0..count {
        let batch: Vec<&WeightedChunk> = all.iter().map(|c| c.get(i).unwrap_or(&empty)).collect();
        let mut outputs = Vec::with_capacity(batch.len());
        for chunk in &batch {
            let ids = Tensor::from_vec(chunk.ids.clone(), (1, chunk.ids.len()), &Device::Cpu)?;
            outputs.push(encoder(&ids, &chunk.fixes)?);
        }
        let encoders = outputs.first().map_or(0, |o| o.states.len());
        if encoders == 0 || outputs.iter().any(|o| o.states.len() != encoders) {
            return Err(Error::InvalidConfig(
                "the text encoders gave no states, or a different number per chunk".into(),
            ));
        }
        let weights: Vec<f32> = batch
            .iter()
            .flat_map(|c| c.weights.iter().copied())
            .collect();
        let weights = Tensor::from_vec(weights, (batch.len(), CHUNK_TOKENS + 2, 1), &Device::Cpu)?;
        let mut emphasised = Vec::with_capacity(encoders);
        for e in 0..encoders {
            let zs: Vec<&Tensor> = outputs.iter().map(|o| &o.states[e]).collect();
            let z = Tensor::cat(&zs, 0)?;
            emphasised.push(emphasis(&z, &weights.to_device(z.device())?)?);
        }
        let z = Tensor::cat(&emphasised, 2)?;
        for (t, out) in per_text.iter_mut().enumerate() {
            out.push(z.narrow(0, t, 1)?);
        }
        if i == 0 {
            for (slot, output) in pooled.iter_mut().zip(&mut outputs) {
                *slot = output.pooled.take();
            }
        }
    }
    per_text
        .into_iter()
        .zip(pooled)
        .map(|(zs, pooled)| {
            Ok(Encoded {
                context: Tensor::cat(&zs, 1)?,
                pooled,
            })
        })
        .collect()
}

/// A1111's "Original" emphasis on one encoder's states `z` `[B, 77, H]` with `weights`
/// `[B, 77, 1]`: `z · w`, rescaled to the mean `z` had, in `z`'s dtype.
fn emphasis(z: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let before = mean(&z)?;
    let z = z.broadcast_mul(weights)?;
    let after = mean(&z)?;
    Ok((z * (before / after) as f32 as f64)?.to_dtype(dtype)?)
}

/// The optimizedSD blend `Σ w_i · encode(text_i)` (weights as given; [`super::plan`] has
/// normalised them), pooled embeddings blended alike. Each text is encoded on its own;
/// shorter encodings are extended with the encoding of an empty chunk, as A1111 extends a
/// batch. One text of weight 1 is just encoded.
pub fn encode_blend(
    tokenizer: &Tokenizer,
    embeddings: &Embeddings,
    blend: &[(String, f32)],
    syntax: PromptSyntax,
    pad: u32,
    encoder: &mut ChunkEncoder,
) -> Result<Encoded> {
    if let [(text, w)] = blend {
        if *w == 1.0 {
            return encode(tokenizer, embeddings, text, syntax, pad, encoder);
        }
    }
    let encoded = blend
        .iter()
        .map(|(text, _)| encode(tokenizer, embeddings, text, syntax, pad, encoder))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = encoded.first() else {
        return Err(Error::InvalidRequest("a blend of no sub-prompts".into()));
    };
    let dtype = first.context.dtype();
    let lengths = encoded
        .iter()
        .map(|e| e.context.dim(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let longest = lengths.into_iter().max().unwrap_or(0);
    let mut empty: Option<Tensor> = None;
    let mut sum: Option<Tensor> = None;
    let mut pooled_sum: Option<Tensor> = None;
    for (e, (_, w)) in encoded.iter().zip(blend) {
        let mut z = e.context.to_dtype(DType::F32)?;
        let missing = (longest - z.dim(1)?) / (CHUNK_TOKENS + 2);
        if missing > 0 {
            let e = match &empty {
                Some(e) => e.clone(),
                None => {
                    let e = encode(tokenizer, embeddings, "", PromptSyntax::Plain, pad, encoder)?;
                    empty.insert(e.context.to_dtype(DType::F32)?).clone()
                }
            };
            let mut pieces = vec![z];
            pieces.extend(std::iter::repeat_n(e, missing));
            z = Tensor::cat(&pieces, 1)?;
        }
        // optimizedSD starts from zeros and adds `alpha · z` sub-prompt by sub-prompt.
        sum = Some(weighted_add(sum, &z, *w)?);
        if let Some(p) = &e.pooled {
            pooled_sum = Some(weighted_add(pooled_sum, &p.to_dtype(DType::F32)?, *w)?);
        }
    }
    let sum = sum.ok_or_else(|| Error::InvalidRequest("a blend of no sub-prompts".into()))?;
    Ok(Encoded {
        context: sum.to_dtype(dtype)?,
        pooled: pooled_sum.map(|p| p.to_dtype(dtype)).transpose()?,
    })
}

/// `acc + w · z`, starting from zeros.
fn weighted_add(acc: Option<Tensor>, z: &Tensor, w: f32) -> Result<Tensor> {
    let acc = match acc {
        Some(acc) => acc,
        None => z.zeros_like()?,
    };
    Ok((acc + (z * w as f64)?)?)
}

/// Mean of all elements, summed in f64.
fn mean(z: &Tensor) -> Result<f64> {
    Ok(z.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}
