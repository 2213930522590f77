//! VAE encode and decode in overlapping tiles, so memory stays bounded for large images.
//!
//! Tiles are laid out on the latent grid (so every pixel tile starts on a multiple of the
//! VAE's downscale factor) with `tiles::grid`, run through the VAE one at a time, and
//! joined with linear ramps over the overlap: decoded tiles in pixel space, encoded tiles in
//! latent space. The VAE's group norms see one tile at a time, so a tiled result differs a
//! little from the whole-image one; the overlap hides the seams.

use candle_core::{DType, Device, Tensor};

use super::tiles::{self, Blender, Tile};
use crate::models::vae::{AutoencoderKL, LatentDistribution};
use crate::Result;

/// Latent area above which `Auto` tiles: 512² pixels, the size SD 1.x is made for, still
/// decodes whole (and matches diffusers exactly).
const AUTO_ABOVE_CELLS: usize = 64 * 64;

/// When to tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TilingMode {
    /// Tile latents of more than 64² cells (images above 512² pixels for SD) that are
    /// larger than a tile.
    #[default]
    Auto,
    /// Tile whenever the image is larger than a tile.
    Always,
    /// Never tile.
    Never,
}

/// Tile size and overlap in latent cells, and when to use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    /// When tiles are used.
    pub mode: TilingMode,
    /// Tile side in latent cells (64 = 512 pixels for SD's VAE).
    pub tile: usize,
    /// Overlap between neighbouring tiles, in latent cells.
    pub overlap: usize,
}

impl Default for VaeTiling {
    fn default() -> Self {
        Self {
            mode: TilingMode::Auto,
            tile: 64,
            overlap: 16,
        }
    }
}

impl VaeTiling {
    /// Whether a latent of `height` × `width` cells is processed in tiles.
    pub fn applies(&self, height: usize, width: usize) -> bool {
        let larger = height > self.tile || width > self.tile;
        match self.mode {
            TilingMode::Never => false,
            TilingMode::Auto => larger && height * width > AUTO_ABOVE_CELLS,
            TilingMode::Always => larger,
        }
    }
}

/// Planar float32 values of a tensor, on the CPU.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A tile's region of `t` [B,C,H,W] at `scale` units per grid cell.
fn crop(t: &Tensor, tile: Tile, scale: usize) -> Result<Tensor> {
    Ok(t.narrow(2, tile.y * scale, tile.height * scale)?
        .narrow(3, tile.x * scale, tile.width * scale)?
        .contiguous()?)
}

fn scaled(tile: Tile, scale: usize) -> Tile {
    Tile {
        x: tile.x * scale,
        y: tile.y * scale,
        width: tile.width * scale,
        height: tile.height * scale,
    }
}

/// Decodes a raw latent `[B,C,h,w]` (already divided by the scaling factor) to images
/// `[B,3,h·f,w·f]`, in tiles when `tiling` says so.
pub fn decode(
    vae: &AutoencoderKL,
    factor: usize,
    latent: &Tensor,
    tiling: &VaeTiling,
) -> Result<Tensor> {
    let (batch, _, h, w) = latent.dims4()?;
    if !tiling.applies(h, w) {
        return vae.decode(latent);
    }
    let grid = tiles::grid(w, h, tiling.tile, tiling.tile, tiling.overlap)?;
    let mut images = Vec::with_capacity(batch);
    for b in 0..batch {
        let one = latent.narrow(0, b, 1)?;
        let mut blender = Blender::new(3, w * factor, h * factor, tiling.overlap * factor);
        for &tile in &grid {
            let pixels = vae.decode(&crop(&one, tile, 1)?)?;
            blender.add(scaled(tile, factor), &values(&pixels)?)?;
        }
        images.push(planar(
            blender.finish(),
            3,
            h * factor,
            w * factor,
            latent.device(),
        )?);
    }
    Ok(Tensor::cat(&images, 0)?)
}

/// Encodes images `[B,3,H,W]` (sides multiples of `factor`) to the latent distribution, in tiles
/// when `tiling` says so; the tiles' means and standard deviations are blended.
pub fn encode(
    vae: &AutoencoderKL,
    factor: usize,
    image: &Tensor,
    tiling: &VaeTiling,
) -> Result<LatentDistribution> {
    let (batch, _, height, width) = image.dims4()?;
    let (h, w) = (height / factor, width / factor);
    if !tiling.applies(h, w) || height % factor != 0 || width % factor != 0 {
        return vae.encode(image);
    }
    let grid = tiles::grid(w, h, tiling.tile, tiling.tile, tiling.overlap)?;
    let (mut means, mut stds) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
    for b in 0..batch {
        let one = image.narrow(0, b, 1)?;
        let mut mean: Option<Blender> = None;
        let mut std: Option<Blender> = None;
        let mut channels = 0;
        for &tile in &grid {
            let dist = vae.encode(&crop(&one, tile, factor)?)?;
            channels = dist.mean.dim(1)?;
            mean.get_or_insert_with(|| Blender::new(channels, w, h, tiling.overlap))
                .add(tile, &values(&dist.mean)?)?;
            std.get_or_insert_with(|| Blender::new(channels, w, h, tiling.overlap))
                .add(tile, &values(&dist.std)?)?;
        }
        if let (Some(m), Some(s)) = (mean, std) {
            means.push(planar(m.finish(), channels, h, w, image.device())?);
            stds.push(planar(s.finish(), channels, h, w, image.device())?);
        }
    }
    Ok(LatentDistribution {
        mean: Tensor::cat(&means, 0)?,
        std: Tensor::cat(&stds, 0)?,
    })
}

fn planar(data: Vec<f32>, c: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, (1, c, h, w), &Device::Cpu)?.to_device(device)?)
}
