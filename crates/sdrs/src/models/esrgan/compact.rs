//! SRVGGNetCompact as in Real-ESRGAN's `srvgg_arch.py` (realesr-animevideov3, realesr-general-x4v3).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, prelu, Conv2d, Conv2dConfig, PReLU, VarBuilder};

use super::pixel_shuffle;

/// SRVGGNetCompact sizes, read from the weights (only the PReLU variant has weights that say so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactConfig {
    /// Image channels in (3 for RGB).
    pub in_channels: usize,
    /// Image channels out (3 for RGB).
    pub out_channels: usize,
    /// Feature channels between the first and the last convolution.
    pub num_feat: usize,
    /// Convolutions between the first and the last one.
    pub num_conv: usize,
    /// The output/input size ratio, done by the final pixel shuffle.
    pub upscale: usize,
}

/// Convolutions with PReLU, a pixel shuffle, plus the nearest-upsampled input.
pub struct Compact {
    config: CompactConfig,
    /// `body.0, body.2, ...`: each but the last followed by its PReLU.
    convs: Vec<Conv2d>,
    activations: Vec<PReLU>,
}

impl Compact {
    /// Builds the network from `body.N` weights: even N convolutions, odd N PReLU slopes.
    pub fn new(vb: VarBuilder, config: &CompactConfig) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let feat = config.num_feat;
        let last_out = config.out_channels * config.upscale * config.upscale;
        let mut convs = Vec::with_capacity(config.num_conv + 2);
        let mut activations = Vec::with_capacity(config.num_conv + 1);
        for i in 0..config.num_conv + 2 {
            let c_in = if i == 0 { config.in_channels } else { feat };
            let is_last = i == config.num_conv + 1;
            let c_out = if is_last { last_out } else { feat };
            convs.push(conv2d(
                c_in,
                c_out,
                3,
                cfg,
                vb.pp(format!("body.{}", 2 * i)),
            )?);
            if !is_last {
                activations.push(prelu(Some(feat), vb.pp(format!("body.{}", 2 * i + 1)))?);
            }
        }
        Ok(Self {
            config: config.clone(),
            convs,
            activations,
        })
    }

    /// RGB `[b, 3, h, w]` → `[b, 3, h·upscale, w·upscale]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for (conv, act) in self.convs.iter().zip(&self.activations) {
            out = act.forward(&conv.forward(&out)?)?;
        }
        let last = self.convs.last().ok_or_else(|| {
            candle_core::Error::Msg("SRVGGNetCompact without convolutions".into())
        })?;
        let r = self.config.upscale;
        let out = pixel_shuffle(&last.forward(&out)?, r)?;
        let (_, _, h, w) = x.dims4()?;
        out + x.upsample_nearest2d(h * r, w * r)?
    }
}
