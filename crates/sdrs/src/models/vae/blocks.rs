//! The VAE's building blocks: resnets without time embedding, single-head spatial attention,
//! the mid block and the 2× resamplers.

use candle_core::Tensor;
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::layers::{
    conv2d, group_norm, linear, AttentionKernel, Conv2d, GroupNorm, Linear,
};
use crate::Result;

/// Every GroupNorm of the VAE uses this epsilon (diffusers' `resnet_eps` for `AutoencoderKL`).
const NORM_EPS: f64 = 1e-6;

/// A GroupNorm with the VAE's epsilon.
pub(super) fn norm(groups: usize, channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    group_norm(groups, channels, NORM_EPS, vb)
}

/// A 3×3 convolution that keeps the spatial size.
pub(super) fn conv3x3(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(in_ch, out_ch, 3, cfg, vb)
}

/// A 1×1 convolution (channel mixing only).
pub(super) fn conv1x1(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(in_ch, out_ch, 1, Conv2dConfig::default(), vb)
}

/// GroupNorm followed by SiLU, the pre-activation used throughout the VAE.
pub(super) fn norm_silu(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    norm.forward_silu(x)
}

/// diffusers' `ResnetBlock2D` without time embedding: x + conv(silu(norm(conv(silu(norm(x)))))).
#[derive(Debug, Clone)]
pub(super) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1×1 projection of the skip path, present when the channel count changes.
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub(super) fn new(vb: VarBuilder, in_ch: usize, out_ch: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(conv1x1(in_ch, out_ch, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm(groups, in_ch, vb.pp("norm1"))?,
            conv1: conv3x3(in_ch, out_ch, vb.pp("conv1"))?,
            norm2: norm(groups, out_ch, vb.pp("norm2"))?,
            conv2: conv3x3(out_ch, out_ch, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Reassigning `h` frees each full-resolution intermediate as soon as the next exists.
        let mut h = norm_silu(&self.norm1, x)?;
        h = self.conv1.forward(&h)?;
        h = norm_silu(&self.norm2, &h)?;
        h = self.conv2.forward(&h)?;
        Ok(match &self.conv_shortcut {
            Some(shortcut) => (shortcut.forward(x)? + h)?,
            None => (x + h)?,
        })
    }
}

/// Single-head self-attention over all pixels, with a residual (diffusers' `Attention` as the VAE uses it).
#[derive(Debug, Clone)]
pub(super) struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    kernel: AttentionKernel,
}

impl AttentionBlock {
    pub(super) fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: norm(groups, channels, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
            kernel: AttentionKernel::new(&vb),
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        // Token-major [B, HW, C] so the projections are plain matrix products and the
        // attention kernel sees the layout it reads through strides.
        let tokens = self
            .group_norm
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        drop(tokens);
        let out = self
            .kernel
            .forward(&q, &k, &v, 1, (channels as f64).powf(-0.5))?;
        drop((q, k, v));
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        Ok((out + x)?)
    }
}

/// diffusers' `UNetMidBlock2D` for the VAE: resnet, attention, resnet at the lowest resolution.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    resnet0: ResnetBlock,
    attention: AttentionBlock,
    resnet1: ResnetBlock,
}

impl MidBlock {
    pub(super) fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::new(vb.pp("resnets.0"), channels, channels, groups)?,
            attention: AttentionBlock::new(vb.pp("attentions.0"), channels, groups)?,
            resnet1: ResnetBlock::new(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnet0.forward(x)?;
        let h = self.attention.forward(&h)?;
        self.resnet1.forward(&h)
    }
}

/// Halves the resolution: pad right and bottom by one, then a 3×3 convolution with stride 2.
#[derive(Debug, Clone)]
pub(super) struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub(super) fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The asymmetric padding is what the SD VAE was trained with; symmetric padding shifts the grid.
        let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&padded)
    }
}

/// Doubles the resolution: nearest-neighbour ×2, then a 3×3 convolution.
#[derive(Debug, Clone)]
pub(super) struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub(super) fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, vb.pp("conv"))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let upsampled = x.upsample_nearest2d(2 * height, 2 * width)?;
        self.conv.forward(&upsampled)
    }
}
