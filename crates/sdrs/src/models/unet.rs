//! The conditional UNet (diffusers' `UNet2DConditionModel`, SD 1.x/2.x shapes).

mod blocks;
mod resnet;
mod transformer;

use candle_core::{DType, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::models::layers::{
    conv2d, group_norm, join, linear, Conv2d, GroupNorm, Linear, Patch, Patchable, Visitor,
};
use crate::models::ModelOptions;
use crate::{Error, Result};
use blocks::{has_cross_attention, DownBlock, LevelShape, MidBlock, UpBlock};

/// A value that diffusers configs give either once for all blocks or per block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// One value for every block.
    All(usize),
    /// A value per block, in down-block order.
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::All(v) => *v,
            PerBlock::Each(v) => v.get(i).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// What the UNet's output means: the noise (SD 1.x, SD 2.x base) or the velocity
/// `v = α·ε − σ·x₀` (SD 2.x 768-v, SD-Turbo's teacher), in diffusers' scheduler names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
pub enum Prediction {
    /// The noise ε (`eps`, diffusers' `epsilon`).
    #[default]
    #[serde(rename = "epsilon", alias = "eps")]
    Epsilon,
    /// The velocity (`v`, diffusers' `v_prediction`).
    #[serde(rename = "v_prediction", alias = "v")]
    V,
}

impl std::str::FromStr for Prediction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "eps" | "epsilon" => Ok(Prediction::Epsilon),
            "v" | "v_prediction" | "v-prediction" => Ok(Prediction::V),
            other => Err(Error::InvalidRequest(format!(
                "unknown prediction type {other:?}: use eps or v"
            ))),
        }
    }
}

/// Architecture of the UNet, as in diffusers' `unet/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNetConfig {
    /// Channels of the latent in (4; 9 for inpainting, which adds the mask and masked image).
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels of the prediction out (4).
    #[serde(default = "four")]
    pub out_channels: usize,
    /// diffusers' block class per level, top down (`CrossAttnDownBlock2D`, `DownBlock2D`).
    pub down_block_types: Vec<String>,
    /// diffusers' block class per level, bottom up (`UpBlock2D`, `CrossAttnUpBlock2D`).
    pub up_block_types: Vec<String>,
    /// Channels of each level, top down (`[320, 640, 1280, 1280]` in SD).
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (an up block has one more).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// In SD 1.x configs this is (misnamed) the number of heads; see diffusers.
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    /// Attention heads per block, when the config names them correctly (see [`Self::heads`]).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Width of the text context the cross-attention reads (768 for SD 1.x, 1024 for SD 2.x).
    pub cross_attention_dim: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// The ε of every GroupNorm.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Whether the timestep embedding puts the cosines first (true in SD).
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Shift of the timestep embedding's frequencies (0 in SD).
    #[serde(default)]
    pub freq_shift: usize,
    /// Whether the spatial transformers project in and out with linear layers (SD 2.x) rather
    /// than 1×1 convolutions (SD 1.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Transformer blocks in each spatial transformer (1 in SD).
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    /// Padding of the stride-2 downsampling convolutions (1 in SD).
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// `text_time` (SDXL): the time embedding gets the pooled text and the size ids added
    /// through `add_embedding`; none in SD 1.x and 2.x.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each size id (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Width into `add_embedding`: the pooled text's plus six size ids' embeddings (SDXL:
    /// 1280 + 6·256 = 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
}

impl UNetConfig {
    /// Number of attention heads of down block `i` (diffusers' rule: `num_attention_heads`
    /// when given, else the misnamed `attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// The SD 1.x UNet.
    pub fn sd1() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            cross_attention_dim: 768,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0,
            use_linear_projection: false,
            transformer_layers_per_block: PerBlock::All(1),
            downsample_padding: 1,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
        }
    }
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn eight() -> PerBlock {
    PerBlock::All(8)
}
fn one_per_block() -> PerBlock {
    PerBlock::All(1)
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// The sinusoidal timestep embedding, computed in float32 as diffusers' `get_timestep_embedding`.
fn timestep_embedding(
    t: f64,
    batch: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let row = sinusoid(t, dim, flip_sin_to_cos, freq_shift);
    let width = row.len();
    Ok(Tensor::from_vec(row, (1, width), device)?.repeat((batch, 1))?)
}

/// One value's sinusoidal embedding of `dim` (even) values.
fn sinusoid(t: f64, dim: usize, flip_sin_to_cos: bool, freq_shift: usize) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let divisor = half as f32 - freq_shift as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| (t as f32) * ((log_period * i as f32) / divisor).exp())
        .collect();
    let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
    if flip_sin_to_cos {
        [cos, sin].concat()
    } else {
        [sin, cos].concat()
    }
}

/// What SDXL's UNet adds to its time embedding: the pooled, projected text and the six size
/// ids (original height and width, crop top and left, target height and width).
#[derive(Debug, Clone)]
pub struct AddedCondition {
    /// `[B, projection]`.
    pub text_embeds: Tensor,
    /// `[B, 6]`.
    pub time_ids: Tensor,
}

/// `add_embedding` ("text_time"): the size ids' sinusoids after the pooled text, through two
/// linear layers, added to the time embedding.
#[derive(Debug, Clone)]
struct AddEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    time_dim: usize,
}

/// The noise-predicting UNet: latent, timestep and text conditioning in, ε (or v) out.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    add_embedding: Option<AddEmbedding>,
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: usize,
}

impl UNet2DConditionModel {
    /// Builds the UNet the config describes from weights under diffusers' names.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        Self::new_with(vb, cfg, ModelOptions::default())
    }

    /// Builds the UNet with explicit kernel and weight-residency options.
    pub fn new_with(vb: VarBuilder, cfg: &UNetConfig, opts: ModelOptions) -> Result<Self> {
        let vb = opts.weights(vb);
        let levels = cfg.block_out_channels.len();
        if levels == 0 || cfg.down_block_types.len() != levels || cfg.up_block_types.len() != levels
        {
            return Err(Error::InvalidConfig(
                "the UNet needs one down and one up block per entry of block_out_channels".into(),
            ));
        }
        let boc = &cfg.block_out_channels;
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let time_proj_dim = boc[0];
        let temb = boc[0] * 4;
        let mut down = Vec::with_capacity(levels);
        for i in 0..levels {
            let shape = LevelShape {
                in_channels: if i == 0 { boc[0] } else { boc[i - 1] },
                out_channels: boc[i],
                temb_channels: temb,
                cross_attention: has_cross_attention(&cfg.down_block_types[i])?,
                heads: cfg.heads(i),
                depth: cfg.transformer_layers_per_block.get(i),
            };
            down.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                cfg,
                &shape,
                i + 1 < levels,
            )?);
        }
        let last = levels - 1;
        let mid = MidBlock::new(
            vb.pp("mid_block"),
            cfg,
            boc[last],
            temb,
            cfg.heads(last),
            cfg.transformer_layers_per_block.get(last),
        )?;
        let mut up = Vec::with_capacity(levels);
        let mut prev_out = boc[last];
        for i in 0..levels {
            let level = last - i;
            let out = boc[level];
            let input = boc[level.saturating_sub(1)];
            let layers = cfg.layers_per_block + 1;
            let skips: Vec<usize> = (0..layers)
                .map(|j| if j + 1 == layers { input } else { out })
                .collect();
            let shape = LevelShape {
                in_channels: prev_out,
                out_channels: out,
                temb_channels: temb,
                cross_attention: has_cross_attention(&cfg.up_block_types[i])?,
                heads: cfg.heads(level),
                depth: cfg.transformer_layers_per_block.get(level),
            };
            up.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                cfg,
                &shape,
                &skips,
                i < last,
            )?);
            prev_out = out;
        }
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, boc[0], 3, same, vb.pp("conv_in"))?,
            time_linear_1: linear(time_proj_dim, temb, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            down,
            mid,
            up,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                boc[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(boc[0], cfg.out_channels, 3, same, vb.pp("conv_out"))?,
            add_embedding: match cfg.addition_embed_type.as_deref() {
                None => None,
                Some("text_time") => {
                    let (Some(time_dim), Some(input)) = (
                        cfg.addition_time_embed_dim,
                        cfg.projection_class_embeddings_input_dim,
                    ) else {
                        return Err(Error::InvalidConfig(
                            "a text_time UNet needs addition_time_embed_dim and \
                             projection_class_embeddings_input_dim"
                                .into(),
                        ));
                    };
                    let vb = vb.pp("add_embedding");
                    Some(AddEmbedding {
                        linear_1: linear(input, temb, vb.pp("linear_1"))?,
                        linear_2: linear(temb, temb, vb.pp("linear_2"))?,
                        time_dim,
                    })
                }
                Some(other) => {
                    return Err(Error::InvalidConfig(format!(
                        "UNet addition_embed_type {other:?} is not supported"
                    )))
                }
            },
            time_proj_dim,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
        })
    }

    /// ε (or v) prediction for `sample` `[B, C, H, W]` at one, possibly fractional, timestep
    /// shared by the batch; `encoder_hidden_states` is `[B, tokens, context_dim]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(sample, timestep, encoder_hidden_states, None)
    }

    /// [`forward`](Self::forward) for a UNet that takes more than the text context (SDXL's
    /// `text_time`: `added`, required exactly when the config has `addition_embed_type`).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCondition>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let context = encoder_hidden_states.to_dtype(sample.dtype())?;
        let t_emb = timestep_embedding(
            timestep,
            batch,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            sample.device(),
        )?
        .to_dtype(sample.dtype())?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        let emb = match (&self.add_embedding, added) {
            (None, None) => emb,
            (Some(add), Some(added)) => {
                let ids = added.time_ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let mut rows = Vec::with_capacity(ids.len() * ids.first().map_or(0, Vec::len));
                for row in &ids {
                    for &id in row {
                        rows.extend(sinusoid(
                            id as f64,
                            add.time_dim,
                            self.flip_sin_to_cos,
                            self.freq_shift,
                        ));
                    }
                }
                let width = rows.len() / ids.len().max(1);
                let times = Tensor::from_vec(rows, (ids.len(), width), sample.device())?;
                let text = added.text_embeds.to_dtype(sample.dtype())?;
                let input = Tensor::cat(&[&text, &times.to_dtype(sample.dtype())?], 1)?;
                let aug = add
                    .linear_2
                    .forward(&add.linear_1.forward(&input)?.silu()?)?;
                (emb + aug)?
            }
            (Some(_), None) => {
                return Err(Error::InvalidConfig(
                    "this UNet (SDXL's text_time) needs the pooled text and the size ids".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidConfig(
                    "this UNet takes no pooled text or size ids".into(),
                ))
            }
        };
        let emb_silu = emb.silu()?;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            x = block.forward(x, &emb_silu, &context, &mut skips)?;
        }
        x = self.mid.forward(&x, &emb_silu, &context)?;
        for block in &self.up {
            x = block.forward(x, &emb_silu, &context, &mut skips)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

impl Patch for UNet2DConditionModel {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        f(&join(prefix, "conv_in"), Patchable::Conv(&mut self.conv_in))?;
        let time = join(prefix, "time_embedding");
        f(
            &join(&time, "linear_1"),
            Patchable::Linear(&mut self.time_linear_1),
        )?;
        f(
            &join(&time, "linear_2"),
            Patchable::Linear(&mut self.time_linear_2),
        )?;
        if let Some(add) = &mut self.add_embedding {
            let add_prefix = join(prefix, "add_embedding");
            f(
                &join(&add_prefix, "linear_1"),
                Patchable::Linear(&mut add.linear_1),
            )?;
            f(
                &join(&add_prefix, "linear_2"),
                Patchable::Linear(&mut add.linear_2),
            )?;
        }
        for (i, block) in self.down.iter_mut().enumerate() {
            block.patch_each(&join(prefix, &format!("down_blocks.{i}")), f)?;
        }
        self.mid.patch_each(&join(prefix, "mid_block"), f)?;
        for (i, block) in self.up.iter_mut().enumerate() {
            block.patch_each(&join(prefix, &format!("up_blocks.{i}")), f)?;
        }
        f(
            &join(prefix, "conv_out"),
            Patchable::Conv(&mut self.conv_out),
        )
    }
}
