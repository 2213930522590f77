//! The UNet's levels: down blocks, the middle block, up blocks.

use candle_core::Tensor;
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::layers::{conv2d, join, Conv2d, Patch, Patchable, Visitor};

use super::resnet::ResnetBlock;
use super::transformer::{SpatialTransformer, TransformerShape};
use super::UNetConfig;
use crate::{Error, Result};

/// What the blocks of one level share.
pub struct LevelShape {
    /// Channels coming into the level's first resnet.
    pub in_channels: usize,
    /// Channels of the level's resnets and transformers.
    pub out_channels: usize,
    /// Width of the timestep embedding the resnets add.
    pub temb_channels: usize,
    /// Whether a spatial transformer follows each resnet.
    pub cross_attention: bool,
    /// Attention heads of those transformers.
    pub heads: usize,
    /// Transformer blocks in each of them.
    pub depth: usize,
}

fn transformer(
    vb: VarBuilder,
    cfg: &UNetConfig,
    channels: usize,
    heads: usize,
    depth: usize,
) -> Result<SpatialTransformer> {
    if heads == 0 || !channels.is_multiple_of(heads) {
        return Err(Error::InvalidConfig(format!(
            "{heads} attention heads do not divide {channels} channels"
        )));
    }
    SpatialTransformer::new(
        vb,
        &TransformerShape {
            channels,
            heads,
            depth,
            context_dim: cfg.cross_attention_dim,
            groups: cfg.norm_num_groups,
            linear_projection: cfg.use_linear_projection,
        },
    )
}

/// A 3×3 convolution keeping the channel count: the down- and upsamplers.
fn conv3x3(vb: VarBuilder, channels: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d(channels, channels, 3, cfg, vb)
}

/// Whether a block type name has cross-attention (`CrossAttnDownBlock2D`, `CrossAttnUpBlock2D`).
pub fn has_cross_attention(block_type: &str) -> Result<bool> {
    match block_type {
        "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(true),
        "DownBlock2D" | "UpBlock2D" => Ok(false),
        other => Err(Error::InvalidConfig(format!(
            "unsupported UNet block type {other}"
        ))),
    }
}

/// Resnets, each optionally followed by a spatial transformer.
#[derive(Debug, Clone)]
struct Layers {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
}

impl Layers {
    /// `in_channels[j]` is what resnet j receives (skip channels included).
    fn new(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        s: &LevelShape,
        in_channels: &[usize],
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for (j, &cin) in in_channels.iter().enumerate() {
            resnets.push(ResnetBlock::new(
                vb.pp(format!("resnets.{j}")),
                cin,
                s.out_channels,
                s.temb_channels,
                cfg.norm_num_groups,
                cfg.norm_eps,
            )?);
            if s.cross_attention {
                attentions.push(transformer(
                    vb.pp(format!("attentions.{j}")),
                    cfg,
                    s.out_channels,
                    s.heads,
                    s.depth,
                )?);
            }
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    fn layer(&self, j: usize, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.resnets[j].forward(x, temb)?;
        match self.attentions.get(j) {
            Some(attn) => attn.forward(&h, context),
            None => Ok(h),
        }
    }
}

/// One level on the way down; its outputs feed the skip connections.
#[derive(Debug, Clone)]
pub struct DownBlock {
    layers: Layers,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    /// The level of shape `s`, ending in a stride-2 convolution when `downsample`.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, s: &LevelShape, downsample: bool) -> Result<Self> {
        let inputs: Vec<usize> = (0..cfg.layers_per_block)
            .map(|j| {
                if j == 0 {
                    s.in_channels
                } else {
                    s.out_channels
                }
            })
            .collect();
        let downsampler = downsample
            .then(|| {
                let conv = vb.pp("downsamplers.0.conv");
                conv3x3(conv, s.out_channels, 2, cfg.downsample_padding)
            })
            .transpose()?;
        Ok(Self {
            layers: Layers::new(&vb, cfg, s, &inputs)?,
            downsampler,
        })
    }

    /// Runs the level, pushing every intermediate output onto `skips`.
    pub fn forward(
        &self,
        mut x: Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        for j in 0..self.layers.resnets.len() {
            x = self.layers.layer(j, &x, temb, context)?;
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// The bottom of the UNet: resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock,
    attention: SpatialTransformer,
    second: ResnetBlock,
}

impl MidBlock {
    /// The bottom level: `channels` wide, its transformer `heads` × `depth`.
    pub fn new(
        vb: VarBuilder,
        cfg: &UNetConfig,
        channels: usize,
        temb_channels: usize,
        heads: usize,
        depth: usize,
    ) -> Result<Self> {
        let resnet = |j: usize| {
            ResnetBlock::new(
                vb.pp(format!("resnets.{j}")),
                channels,
                channels,
                temb_channels,
                cfg.norm_num_groups,
                cfg.norm_eps,
            )
        };
        Ok(Self {
            first: resnet(0)?,
            attention: transformer(vb.pp("attentions.0"), cfg, channels, heads, depth)?,
            second: resnet(1)?,
        })
    }

    /// `x` through resnet, transformer (attending to `context`), resnet.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(x, temb)?;
        let h = self.attention.forward(&h, context)?;
        self.second.forward(&h, temb)
    }
}

/// One level on the way up: each resnet takes the next skip connection.
#[derive(Debug, Clone)]
pub struct UpBlock {
    layers: Layers,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `skip_channels[j]` is the channel count of the skip connection resnet j consumes.
    pub fn new(
        vb: VarBuilder,
        cfg: &UNetConfig,
        s: &LevelShape,
        skip_channels: &[usize],
        upsample: bool,
    ) -> Result<Self> {
        let inputs: Vec<usize> = skip_channels
            .iter()
            .enumerate()
            .map(|(j, skip)| {
                if j == 0 {
                    s.in_channels + skip
                } else {
                    s.out_channels + skip
                }
            })
            .collect();
        let upsampler = upsample
            .then(|| conv3x3(vb.pp("upsamplers.0.conv"), s.out_channels, 1, 1))
            .transpose()?;
        Ok(Self {
            layers: Layers::new(&vb, cfg, s, &inputs)?,
            upsampler,
        })
    }

    /// Consumes skip connections from the end of `skips`; upsamples (nearest) to the size of
    /// the skip the next level will take, so odd latent sizes come back to their own size.
    pub fn forward(
        &self,
        mut x: Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        for j in 0..self.layers.resnets.len() {
            let skip = skips.pop().ok_or_else(|| {
                Error::InvalidConfig("UNet skip connections do not match its blocks".into())
            })?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = self.layers.layer(j, &x, temb, context)?;
        }
        if let Some(conv) = &self.upsampler {
            let (h, w) = match skips.last() {
                Some(next) => (next.dim(2)?, next.dim(3)?),
                None => (x.dim(2)? * 2, x.dim(3)? * 2),
            };
            x = conv.forward(&x.upsample_nearest2d(h, w)?)?;
        }
        Ok(x)
    }
}

impl Patch for Layers {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        for (j, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.patch_each(&join(prefix, &format!("resnets.{j}")), f)?;
        }
        for (j, attention) in self.attentions.iter_mut().enumerate() {
            attention.patch_each(&join(prefix, &format!("attentions.{j}")), f)?;
        }
        Ok(())
    }
}

impl Patch for DownBlock {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        self.layers.patch_each(prefix, f)?;
        if let Some(conv) = &mut self.downsampler {
            f(&join(prefix, "downsamplers.0.conv"), Patchable::Conv(conv))?;
        }
        Ok(())
    }
}

impl Patch for MidBlock {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        self.first.patch_each(&join(prefix, "resnets.0"), f)?;
        self.attention
            .patch_each(&join(prefix, "attentions.0"), f)?;
        self.second.patch_each(&join(prefix, "resnets.1"), f)
    }
}

impl Patch for UpBlock {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        self.layers.patch_each(prefix, f)?;
        if let Some(conv) = &mut self.upsampler {
            f(&join(prefix, "upsamplers.0.conv"), Patchable::Conv(conv))?;
        }
        Ok(())
    }
}
