//! Super-resolution networks: ESRGAN's RRDBNet (ESRGAN, Real-ESRGAN x4plus / x2plus / anime_6B)
//! and Real-ESRGAN's compact SRVGGNet (realesr-animevideov3, realesr-general-x4v3).
//!
//! Parameter names are BasicSR's (`conv_first`, `body.N.rdb1.conv1`, `conv_up1`, ... and
//! `body.N` for SRVGGNet); `weights::upscaler` maps the old ESRGAN layout onto them. Input and
//! output are RGB in [0, 1], shape `[batch, 3, height, width]`; the output is not clamped.

mod compact;
mod rrdb;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub use compact::{Compact, CompactConfig};
pub use rrdb::{Rrdb, RrdbConfig};

/// Which network a file holds, with the sizes read from its tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EsrganConfig {
    /// Residual-in-residual dense blocks (ESRGAN, Real-ESRGAN x4plus and friends).
    Rrdb(RrdbConfig),
    /// A plain stack of convolutions with PReLU and a pixel shuffle (SRVGGNetCompact).
    Compact(CompactConfig),
}

impl EsrganConfig {
    /// How many output pixels each input pixel becomes, per side.
    pub fn scale(&self) -> usize {
        match self {
            EsrganConfig::Rrdb(c) => c.scale(),
            EsrganConfig::Compact(c) => c.upscale,
        }
    }

    /// Input sides must be a multiple of this (RRDBNet x2 / x1 pixel-unshuffle their input).
    pub fn size_multiple(&self) -> usize {
        match self {
            EsrganConfig::Rrdb(c) => c.unshuffle,
            EsrganConfig::Compact(_) => 1,
        }
    }

    /// A short description for messages and listings, e.g. "RRDBNet 4x (23 blocks, 64 features)".
    pub fn describe(&self) -> String {
        match self {
            EsrganConfig::Rrdb(c) => format!(
                "RRDBNet {}x ({} blocks, {} features)",
                c.scale(),
                c.num_block,
                c.num_feat
            ),
            EsrganConfig::Compact(c) => format!(
                "SRVGGNetCompact {}x ({} convolutions, {} features)",
                c.upscale, c.num_conv, c.num_feat
            ),
        }
    }
}

/// An upscaling network, ready to run.
pub enum Esrgan {
    /// RRDBNet (boxed: its 23 blocks of weights make it the large one).
    Rrdb(Box<Rrdb>),
    /// SRVGGNetCompact.
    Compact(Compact),
}

impl Esrgan {
    /// Builds the network described by `config` from BasicSR-named weights.
    pub fn new(vb: VarBuilder, config: &EsrganConfig) -> Result<Self> {
        Ok(match config {
            EsrganConfig::Rrdb(c) => Esrgan::Rrdb(Box::new(Rrdb::new(vb, c)?)),
            EsrganConfig::Compact(c) => Esrgan::Compact(Compact::new(vb, c)?),
        })
    }

    /// RGB `[b, 3, h, w]` in [0, 1] → `[b, 3, h·scale, w·scale]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Esrgan::Rrdb(m) => m.forward(x),
            Esrgan::Compact(m) => m.forward(x),
        }
    }
}

/// `[b, c, h·r, w·r]` → `[b, c·r², h, w]`, torch's `pixel_unshuffle`.
pub(crate) fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h, w) = (h / r, w / r);
    x.reshape(vec![b, c, h, r, w, r])?
        .permute(vec![0, 1, 3, 5, 2, 4])?
        .reshape((b, c * r * r, h, w))
}

/// `[b, c·r², h, w]` → `[b, c, h·r, w·r]`, torch's `pixel_shuffle`.
pub(crate) fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c = c / (r * r);
    x.reshape(vec![b, c, r, r, h, w])?
        .permute(vec![0, 1, 4, 2, 5, 3])?
        .reshape((b, c, h * r, w * r))
}

/// LeakyReLU with slope 0.2 as `max(x, 0.2·x)`: two full-size temporaries instead of four,
/// which matters at the 4× resolution of the last layers.
pub(crate) fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    x.maximum(&(x * 0.2)?)
}
