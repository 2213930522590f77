//! RRDBNet as in BasicSR's `rrdbnet_arch.py` (ESRGAN, Real-ESRGAN x4plus / x2plus / anime_6B).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use super::{leaky_relu, pixel_unshuffle};

/// RRDBNet sizes, read from the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrdbConfig {
    /// Image channels in, before the pixel unshuffle (3 for RGB).
    pub in_channels: usize,
    /// Image channels out (3 for RGB).
    pub out_channels: usize,
    /// Feature channels of the trunk (64 in ESRGAN).
    pub num_feat: usize,
    /// Residual-in-residual dense blocks in the trunk (23 in ESRGAN, 6 in anime_6B).
    pub num_block: usize,
    /// Channels each convolution of a dense block adds (32 in ESRGAN).
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

/// Rows of the last upsampling stage's input run at once (see [`Rrdb::set_tail_rows`]).
const TAIL_ROWS: usize = 64;

/// Context rows around each strip of the tail: its three 3×3 convolutions see 3 output rows,
/// fewer than 3 input rows once upsampled.
const TAIL_HALO: usize = 3;

/// Residual-in-residual dense block network.
pub struct Rrdb {
    config: RrdbConfig,
    tail_rows: usize,
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
            tail_rows: TAIL_ROWS,
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
        let Some((last_up, first_ups)) = self.conv_up.split_last() else {
            return self.tail(&feat, None);
        };
        for conv in first_ups {
            let (_, _, h, w) = feat.dims4()?;
            let up = feat.upsample_nearest2d(h * 2, w * 2)?;
            feat = leaky_relu(&conv.forward(&up)?)?;
        }
        self.tail(&feat, Some(last_up))
    }

    /// Sets how many rows of the last upsampling stage's input are run at once. That stage
    /// (upsample, conv_up, conv_hr, conv_last) works at the output resolution with 64
    /// channels: in strips its peak memory is a strip's, not the whole tile's. Strips overlap
    /// by enough rows that the result does not depend on their height.
    pub fn set_tail_rows(&mut self, rows: usize) {
        self.tail_rows = rows.max(1);
    }

    /// The last upsampling (if any), conv_hr and conv_last, strip by strip.
    fn tail(&self, feat: &Tensor, last_up: Option<&Conv2d>) -> Result<Tensor> {
        let (_, _, h, _) = feat.dims4()?;
        let factor = if last_up.is_some() { 2 } else { 1 };
        let mut strips = Vec::with_capacity(h.div_ceil(self.tail_rows));
        for start in (0..h).step_by(self.tail_rows) {
            let end = (start + self.tail_rows).min(h);
            let (from, to) = (start.saturating_sub(TAIL_HALO), (end + TAIL_HALO).min(h));
            let mut x = feat.narrow(2, from, to - from)?.contiguous()?;
            if let Some(conv) = last_up {
                let (_, _, sh, sw) = x.dims4()?;
                x = leaky_relu(&conv.forward(&x.upsample_nearest2d(sh * 2, sw * 2)?)?)?;
            }
            let x = leaky_relu(&self.conv_hr.forward(&x)?)?;
            let x = self.conv_last.forward(&x)?;
            strips.push(x.narrow(2, (start - from) * factor, (end - start) * factor)?);
        }
        Tensor::cat(&strips, 2)
    }
}
