//! RRDBNet as in BasicSR's `rrdbnet_arch.py` (ESRGAN, Real-ESRGAN x4plus / x2plus / anime_6B).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use super::{leaky_relu, pixel_unshuffle};

/// RRDBNet sizes, read from the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrdbConfig {
    /// Image channels in and out (3 for RGB).
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_feat: usize,
    pub num_block: usize,
    pub num_grow_ch: usize,
    /// Pixel-unshuffle factor of the input: 1 for 4× models, 2 for 2×, 4 for 1×.
    pub unshuffle: usize,
    /// Nearest ×2 + convolution stages (`conv_up1`, `conv_up2`, ...): 2 in every BasicSR model.
    pub upsamples: usize,
}

impl RrdbConfig {
    /// The output/input size ratio.
    pub fn scale(&self) -> usize {
        (1 << self.upsamples) / self.unshuffle
    }
}

fn conv3(vb: VarBuilder, name: &str, c_in: usize, c_out: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(c_in, c_out, 3, cfg, vb.pp(name))
}

struct DenseBlock {
    convs: Vec<Conv2d>,
}

impl DenseBlock {
    fn new(vb: VarBuilder, feat: usize, grow: usize) -> Result<Self> {
        let convs = (0..5)
            .map(|i| {
                let c_out = if i == 4 { feat } else { grow };
                conv3(
                    vb.clone(),
                    &format!("conv{}", i + 1),
                    feat + i * grow,
                    c_out,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut features = vec![x.clone()];
        for conv in &self.convs[..4] {
            let input = Tensor::cat(&features, 1)?;
            features.push(leaky_relu(&conv.forward(&input)?)?);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&features, 1)?)?;
        (x5 * 0.2)? + x
    }
}

struct Block {
    dense: [DenseBlock; 3],
}

impl Block {
    fn new(vb: VarBuilder, feat: usize, grow: usize) -> Result<Self> {
        Ok(Self {
            dense: [
                DenseBlock::new(vb.pp("rdb1"), feat, grow)?,
                DenseBlock::new(vb.pp("rdb2"), feat, grow)?,
                DenseBlock::new(vb.pp("rdb3"), feat, grow)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for dense in &self.dense {
            out = dense.forward(&out)?;
        }
        (out * 0.2)? + x
    }
}

/// Residual-in-residual dense block network.
pub struct Rrdb {
    config: RrdbConfig,
    conv_first: Conv2d,
    body: Vec<Block>,
    conv_body: Conv2d,
    conv_up: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl Rrdb {
    /// Builds the network from BasicSR-named weights.
    pub fn new(vb: VarBuilder, config: &RrdbConfig) -> Result<Self> {
        let (feat, grow) = (config.num_feat, config.num_grow_ch);
        let first_in = config.in_channels * config.unshuffle * config.unshuffle;
        let body = (0..config.num_block)
            .map(|i| Block::new(vb.pp(format!("body.{i}")), feat, grow))
            .collect::<Result<_>>()?;
        let conv_up = (1..=config.upsamples)
            .map(|i| conv3(vb.clone(), &format!("conv_up{i}"), feat, feat))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: config.clone(),
            conv_first: conv3(vb.clone(), "conv_first", first_in, feat)?,
            body,
            conv_body: conv3(vb.clone(), "conv_body", feat, feat)?,
            conv_up,
            conv_hr: conv3(vb.clone(), "conv_hr", feat, feat)?,
            conv_last: conv3(vb, "conv_last", feat, config.out_channels)?,
        })
    }

    /// RGB `[b, 3, h, w]` → `[b, 3, h·scale, w·scale]`; h and w must be multiples of the unshuffle.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.config.unshuffle {
            1 => x.clone(),
            r => pixel_unshuffle(x, r)?,
        };
        let feat = self.conv_first.forward(&x)?;
        let mut body = feat.clone();
        for block in &self.body {
            body = block.forward(&body)?;
        }
        let mut feat = (feat + self.conv_body.forward(&body)?)?;
        drop(body);
        for conv in &self.conv_up {
            let (_, _, h, w) = feat.dims4()?;
            let up = feat.upsample_nearest2d(h * 2, w * 2)?;
            feat = leaky_relu(&conv.forward(&up)?)?;
        }
        let feat = leaky_relu(&self.conv_hr.forward(&feat)?)?;
        self.conv_last.forward(&feat)
    }
}
