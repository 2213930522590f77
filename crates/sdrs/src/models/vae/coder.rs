//! The VAE's encoder (image → latent moments) and decoder (latent → image).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::models::layers::{Conv2d, GroupNorm};

use super::blocks::{conv3x3, norm, norm_silu, Downsample, MidBlock, ResnetBlock, Upsample};
use super::VaeConfig;
use crate::Result;

/// One resolution level: a run of resnets, then optionally a resampler.
#[derive(Debug, Clone)]
struct Level<R> {
    resnets: Vec<ResnetBlock>,
    resample: Option<R>,
}

impl<R> Level<R> {
    fn new(
        vb: &VarBuilder,
        (in_ch, out_ch): (usize, usize),
        n_resnets: usize,
        groups: usize,
        resample: Option<R>,
    ) -> Result<Self> {
        let resnets = (0..n_resnets)
            .map(|j| {
                let from = if j == 0 { in_ch } else { out_ch };
                ResnetBlock::new(vb.pp(format!("resnets.{j}")), from, out_ch, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { resnets, resample })
    }

    fn resnets_forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        Ok(h)
    }
}

/// diffusers' `Encoder` with `double_z`: outputs mean and log-variance stacked on the channel axis.
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Level<Downsample>>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub(super) fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_ch = channels[0];
        for (i, &out_ch) in channels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let is_last = i + 1 == channels.len();
            let downsample = if is_last {
                None
            } else {
                Some(Downsample::new(vb.pp("downsamplers.0"), out_ch)?)
            };
            let level = Level::new(
                &vb,
                (in_ch, out_ch),
                cfg.layers_per_block,
                groups,
                downsample,
            )?;
            down_blocks.push(level);
            in_ch = out_ch;
        }
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, channels[0], vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), in_ch, groups)?,
            conv_norm_out: norm(groups, in_ch, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(in_ch, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }

    pub(super) fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(image)?;
        for level in &self.down_blocks {
            h = level.resnets_forward(&h)?;
            if let Some(downsample) = &level.resample {
                h = downsample.forward(&h)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        h = norm_silu(&self.conv_norm_out, &h)?;
        self.conv_out.forward(&h)
    }
}

/// diffusers' `Decoder`: mid block at the latent resolution, then up blocks of `layers_per_block + 1` resnets.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Level<Upsample>>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub(super) fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        // The decoder walks the channel list from the deepest level back up.
        let channels: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut in_ch = channels[0];
        for (i, &out_ch) in channels.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let is_last = i + 1 == channels.len();
            let upsample = if is_last {
                None
            } else {
                Some(Upsample::new(vb.pp("upsamplers.0"), out_ch)?)
            };
            let n_resnets = cfg.layers_per_block + 1;
            up_blocks.push(Level::new(
                &vb,
                (in_ch, out_ch),
                n_resnets,
                groups,
                upsample,
            )?);
            in_ch = out_ch;
        }
        Ok(Self {
            conv_in: conv3x3(cfg.latent_channels, channels[0], vb.pp("conv_in"))?,
            mid_block: MidBlock::new(vb.pp("mid_block"), channels[0], groups)?,
            up_blocks,
            conv_norm_out: norm(groups, in_ch, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(in_ch, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }

    pub(super) fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(latent)?;
        h = self.mid_block.forward(&h)?;
        for level in &self.up_blocks {
            h = level.resnets_forward(&h)?;
            if let Some(upsample) = &level.resample {
                h = upsample.forward(&h)?;
            }
        }
        h = norm_silu(&self.conv_norm_out, &h)?;
        self.conv_out.forward(&h)
    }
}
