//! The UNet's residual block (diffusers' `ResnetBlock2D` with a time embedding).

use candle_core::Tensor;
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::layers::{
    conv2d, group_norm, join, linear, Conv2d, GroupNorm, Linear, Patch, Patchable, Visitor,
};

use crate::Result;

/// GroupNorm → SiLU → conv, plus the projected time embedding, twice, around a skip path.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// A block from `in_channels` to `out_channels` taking a time embedding of `temb_channels`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                in_channels,
                out_channels,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_channels, eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out_channels, 3, same, vb.pp("conv1"))?,
            time_emb_proj: linear(temb_channels, out_channels, vb.pp("time_emb_proj"))?,
            norm2: group_norm(groups, out_channels, eps, vb.pp("norm2"))?,
            conv2: conv2d(out_channels, out_channels, 3, same, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// `x` is `[B, C, H, W]`; `temb` is `[B, temb_channels]` (already through SiLU).
    pub fn forward(&self, x: &Tensor, temb_silu: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self
            .time_emb_proj
            .forward(temb_silu)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

impl Patch for ResnetBlock {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        f(&join(prefix, "conv1"), Patchable::Conv(&mut self.conv1))?;
        f(
            &join(prefix, "time_emb_proj"),
            Patchable::Linear(&mut self.time_emb_proj),
        )?;
        f(&join(prefix, "conv2"), Patchable::Conv(&mut self.conv2))?;
        if let Some(conv) = &mut self.conv_shortcut {
            f(&join(prefix, "conv_shortcut"), Patchable::Conv(conv))?;
        }
        Ok(())
    }
}
