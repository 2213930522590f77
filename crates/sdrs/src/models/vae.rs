//! The KL autoencoder (diffusers' `AutoencoderKL`): image ↔ latent.

mod blocks;
mod coder;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::layers::Conv2d;
use crate::models::ModelOptions;
use crate::{Error, Result};
use blocks::conv1x1;
use coder::{Decoder, Encoder};

/// Architecture of the VAE, as in diffusers' `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Image channels the encoder takes (3 for RGB).
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels the decoder gives (3 for RGB).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels of each level, image side first (`[128, 256, 512, 512]` in SD); each level
    /// after the first halves the image's sides.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (a decoder block has one more).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Channels of the latent (4).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// What the latent is multiplied by after encoding and divided by before decoding, so that
    /// the UNet sees unit variance (0.18215 in SD).
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
}

impl VaeConfig {
    /// The SD 1.x/2.x VAE.
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        }
    }

    /// How many pixels one latent cell covers along each axis.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scaling_factor() -> f64 {
    0.18215
}

/// The encoder's output: a diagonal Gaussian over latents, per latent element.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// The mean [B,latent,H/8,W/8], the usual "encoded latent" before scaling.
    pub mean: Tensor,
    /// The standard deviation, same shape, from the log-variance clamped to [-30, 20] as diffusers does.
    pub std: Tensor,
}

/// diffusers' `AutoencoderKL`: encodes images to latent distributions and decodes latents to images.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    latent_channels: usize,
    downscale_factor: usize,
}

impl AutoencoderKL {
    /// Builds the VAE from weights with diffusers' names (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        Self::new_with(vb, cfg, ModelOptions::default())
    }

    /// Builds the VAE with explicit kernel and weight-residency options.
    pub fn new_with(vb: VarBuilder, cfg: &VaeConfig, opts: ModelOptions) -> Result<Self> {
        let vb = opts.weights(vb);
        if cfg.block_out_channels.is_empty() {
            return Err(Error::InvalidConfig(
                "VAE block_out_channels is empty".to_string(),
            ));
        }
        let latent = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            quant_conv: conv1x1(2 * latent, 2 * latent, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(latent, latent, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            latent_channels: latent,
            downscale_factor: cfg.downscale_factor(),
        })
    }

    /// The latent distribution of `image` `[B,3,H,W]` in [-1, 1]; H and W must be multiples of
    /// the downscale factor (8 for SD).
    /// No scaling factor is applied.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let (_, _, height, width) = image.dims4()?;
        let factor = self.downscale_factor;
        if !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
            || height == 0
            || width == 0
        {
            return Err(Error::InvalidSize {
                width,
                height,
                reason: format!(
                    "the VAE needs a non-empty image whose sides are multiples of {factor}"
                ),
            });
        }
        let moments = self.quant_conv.forward(&self.encoder.forward(image)?)?;
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let logvar = moments.narrow(1, self.latent_channels, self.latent_channels)?;
        let std = (logvar.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        Ok(LatentDistribution {
            mean: mean.contiguous()?,
            std,
        })
    }

    /// The image `[B,3,8h,8w]` (roughly in [-1, 1]) for a raw latent `[B,latent,h,w]`; divide by
    /// `scaling_factor` before calling.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let h = self.post_quant_conv.forward(latent)?;
        self.decoder.forward(&h)
    }
}
