//! CLIP text encoder (transformers' `CLIPTextModel`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::ops::{sigmoid, softmax_last_dim};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::models::layers::{join, Patch, Patchable, Visitor};
use crate::{Error, Result};

/// Architecture of a CLIP text encoder, as in transformers' `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipConfig {
    /// Rows of the token embedding (49408, CLIP's BPE vocabulary).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the token embeddings and of every layer's output: the context the UNet
    /// attends to (768 for SD 1.x, 1024 for SD 2.x).
    pub hidden_size: usize,
    /// Width of each layer's MLP.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Rows of the position embedding: the longest token sequence (77).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// The MLP activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    /// The ε of every LayerNorm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// The MLP activation of the encoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`, OpenAI CLIP's (SD 1.x).
    QuickGelu,
    /// The exact, erf GELU, OpenCLIP's (SD 2.x).
    Gelu,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> Activation {
    Activation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    /// OpenAI CLIP ViT-L/14's text encoder, the one SD 1.x uses.
    pub fn sd1() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// One self-attention block of the encoder: q/k/v/out projections, `num_attention_heads` heads.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let hidden = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(hidden, hidden, vb.pp("q_proj"))?,
            k_proj: linear(hidden, hidden, vb.pp("k_proj"))?,
            v_proj: linear(hidden, hidden, vb.pp("v_proj"))?,
            out_proj: linear(hidden, hidden, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: hidden / cfg.num_attention_heads,
        })
    }

    /// `[B,T,C]` → `[B*heads, T, head_dim]`, the layout batched matmul wants.
    fn split_heads(&self, x: Tensor, batch: usize, tokens: usize) -> Result<Tensor> {
        Ok(x.reshape((batch, tokens, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * self.num_heads, tokens, self.head_dim))?)
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        // Scaling q before the product, as transformers does, keeps the rounding the same.
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.split_heads((self.q_proj.forward(x)? * scale)?, batch, tokens)?;
        let k = self.split_heads(self.k_proj.forward(x)?, batch, tokens)?;
        let v = self.split_heads(self.v_proj.forward(x)?, batch, tokens)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let probs = softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .reshape((batch, self.num_heads, tokens, self.head_dim))?
            .transpose(1, 2)?
            .reshape((batch, tokens, hidden))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// The feed-forward part of an encoder layer.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = match self.activation {
            // OpenAI's approximation, which SD 1.x's encoder was trained with.
            Activation::QuickGelu => (&h * sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        Ok(self.fc2.forward(&h)?)
    }
}

/// A pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)).
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: layer_norm(cfg.hidden_size, eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: layer_norm(cfg.hidden_size, eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, causal_mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        Ok((x + h)?)
    }
}

/// CLIP's text transformer: token ids in, per-token hidden states out (the UNet's conditioning).
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    projection: Option<TextProjection>,
}

impl ClipTextTransformer {
    /// Builds the encoder from weights named as in transformers, rooted at `text_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::InvalidConfig(format!(
                "CLIP hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let emb = vb.pp("embeddings");
        let token_embedding =
            embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            projection: None,
        })
    }

    /// transformers' `CLIPTextModelWithProjection` (SDXL's second encoder): the encoder and a
    /// `text_projection.weight` of `projection` rows beside its layers in `vb`.
    pub fn with_projection(vb: VarBuilder, cfg: &ClipConfig, projection: usize) -> Result<Self> {
        let mut model = Self::new(vb.clone(), cfg)?;
        model.projection = Some(TextProjection::new(
            vb.pp("text_projection"),
            cfg.hidden_size,
            projection,
        )?);
        Ok(model)
    }

    /// The number of encoder layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// The width of its token vectors (and of its hidden states).
    pub fn width(&self) -> usize {
        self.position_embedding.dims().get(1).copied().unwrap_or(0)
    }

    /// Whether the encoder has a text projection (its pooled output conditions SDXL's UNet).
    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    /// `pooled` through the text projection, when the encoder has one; else as it is.
    pub fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Some(p) => p.forward(pooled),
            None => Ok(pooled.clone()),
        }
    }

    /// Hidden states `[B,T,hidden]` for token ids `[B,T]` (u32): `clip_skip` 1 = last layer,
    /// 2 = penultimate (A1111's convention), always followed by final_layer_norm.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.forward_replacing(input_ids, &[], clip_skip)
    }

    /// [`forward`](Self::forward), with the token embeddings of every row from position
    /// `start` on replaced by the rows of `vectors` (`[n, hidden]`, any float dtype and device:
    /// textual inversion), cut at the last position, before the position embeddings are added.
    pub fn forward_replacing(
        &self,
        input_ids: &Tensor,
        replacements: &[(usize, &Tensor)],
        clip_skip: usize,
    ) -> Result<Tensor> {
        let n_layers = self.layers.len();
        if clip_skip == 0 || clip_skip > n_layers {
            return Err(Error::InvalidRequest(format!(
                "clip_skip must be between 1 and {n_layers} (the encoder's layer count), got {clip_skip}"
            )));
        }
        let x = self.layers_out(input_ids, replacements, n_layers + 1 - clip_skip)?;
        Ok(self.final_layer_norm.forward(&x)?)
    }

    /// The hidden states after the first `layers` encoder layers, without the final LayerNorm
    /// (transformers' `hidden_states[layers]`), with `replacements` as in
    /// [`forward_replacing`](Self::forward_replacing): SDXL conditions on the penultimate ones so.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        replacements: &[(usize, &Tensor)],
        layers: usize,
    ) -> Result<Tensor> {
        self.check_depth(layers)?;
        self.layers_out(input_ids, replacements, layers)
    }

    /// [`hidden_states`](Self::hidden_states) after `layers` layers, and the pooled output of
    /// the same pass (see [`pooled`](Self::pooled)), the encoder run once.
    pub fn hidden_and_pooled(
        &self,
        input_ids: &Tensor,
        replacements: &[(usize, &Tensor)],
        layers: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.check_depth(layers)?;
        let hidden = self.layers_out(input_ids, replacements, layers)?;
        let mut x = hidden.clone();
        let causal_mask = causal_mask(x.dim(1)?, x.dtype(), x.device())?;
        for layer in &self.layers[layers..] {
            x = layer.forward(&x, &causal_mask)?;
        }
        Ok((hidden, self.pool(input_ids, &x)?))
    }

    fn check_depth(&self, layers: usize) -> Result<()> {
        if layers > self.layers.len() {
            return Err(Error::InvalidRequest(format!(
                "{layers} layers asked of a text encoder of {}",
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// The pooled output `[B, hidden]`: the last layer's states after the final LayerNorm at
    /// each row's first EOS (transformers' `pooler_output` when `eos_token_id` is EOS).
    pub fn pooled(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = self.layers_out(input_ids, &[], self.layers.len())?;
        self.pool(input_ids, &x)
    }

    /// The final LayerNorm of the last layer's states `x`, at each row's first EOS.
    fn pool(&self, input_ids: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = self.final_layer_norm.forward(x)?;
        let rows = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(b, ids)| {
                let eos = ids.iter().position(|&id| id == crate::tokenizer::EOS);
                let at = eos.unwrap_or(ids.len().saturating_sub(1));
                Ok(x.get(b)?.get(at)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&picked, 0)?)
    }

    /// The token and position embeddings (with `replacements`) through the first `layers`
    /// encoder layers.
    fn layers_out(
        &self,
        input_ids: &Tensor,
        replacements: &[(usize, &Tensor)],
        layers: usize,
    ) -> Result<Tensor> {
        let (_, tokens) = input_ids.dims2()?;
        let max_tokens = self.position_embedding.dim(0)?;
        if tokens > max_tokens {
            return Err(Error::InvalidRequest(format!(
                "{tokens} tokens given to CLIP, which takes at most {max_tokens} per chunk"
            )));
        }
        let positions = self.position_embedding.narrow(0, 0, tokens)?;
        let mut x = self.token_embedding.forward(input_ids)?;
        for &(start, vectors) in replacements {
            x = replace_tokens(&x, start, vectors)?;
        }
        let mut x = x.broadcast_add(&positions)?;
        let causal_mask = causal_mask(tokens, x.dtype(), x.device())?;
        for layer in &self.layers[..layers] {
            x = layer.forward(&x, &causal_mask)?;
        }
        Ok(x)
    }
}

/// CLIP's text projection (transformers' `CLIPTextModelWithProjection.text_projection`,
/// OpenCLIP's `text_projection` transposed): the pooled output into the embedding SDXL's UNet
/// adds to its time embedding.
#[derive(Debug, Clone)]
pub struct TextProjection {
    weight: Tensor,
}

impl TextProjection {
    /// `weight` `[projection, hidden]` from `vb`, no bias.
    pub fn new(vb: VarBuilder, hidden: usize, projection: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((projection, hidden), "weight")?,
        })
    }

    /// `pooled` `[B, hidden]` → `[B, projection]`.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(pooled.dtype())?;
        Ok(pooled.matmul(&w.t()?)?)
    }
}

/// `x` (`[B,T,C]`) with positions `start..` of every row replaced by the rows of `vectors`
/// (`[n, C]`), as many as fit before `T` (A1111's `EmbeddingsWithFixes`).
fn replace_tokens(x: &Tensor, start: usize, vectors: &Tensor) -> Result<Tensor> {
    let (batch, tokens, width) = x.dims3()?;
    let (count, vector_width) = vectors.dims2()?;
    if vector_width != width {
        return Err(Error::InvalidRequest(format!(
            "an embedding of width {vector_width} given to a text encoder of width {width}"
        )));
    }
    let fit = count.min(tokens.saturating_sub(start));
    if fit == 0 {
        return Ok(x.clone());
    }
    let vectors = vectors
        .narrow(0, 0, fit)?
        .to_device(x.device())?
        .to_dtype(x.dtype())?
        .unsqueeze(0)?
        .broadcast_as((batch, fit, width))?
        .contiguous()?;
    let mut pieces = Vec::with_capacity(3);
    if start > 0 {
        pieces.push(x.narrow(1, 0, start)?);
    }
    pieces.push(vectors);
    if start + fit < tokens {
        pieces.push(x.narrow(1, start + fit, tokens - start - fit)?);
    }
    Ok(Tensor::cat(&pieces, 1)?)
}

/// `[T,T]` additive mask: 0 on and below the diagonal, −∞ above, so a token sees only earlier ones.
fn causal_mask(tokens: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (tokens, tokens), device)?.to_dtype(dtype)?)
}

impl Patch for ClipTextTransformer {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let layer_prefix = join(prefix, &format!("encoder.layers.{i}"));
            let attn = join(&layer_prefix, "self_attn");
            let a = &mut layer.self_attn;
            f(&join(&attn, "q_proj"), Patchable::Candle(&mut a.q_proj))?;
            f(&join(&attn, "k_proj"), Patchable::Candle(&mut a.k_proj))?;
            f(&join(&attn, "v_proj"), Patchable::Candle(&mut a.v_proj))?;
            f(&join(&attn, "out_proj"), Patchable::Candle(&mut a.out_proj))?;
            let mlp = join(&layer_prefix, "mlp");
            f(&join(&mlp, "fc1"), Patchable::Candle(&mut layer.mlp.fc1))?;
            f(&join(&mlp, "fc2"), Patchable::Candle(&mut layer.mlp.fc2))?;
        }
        Ok(())
    }
}
