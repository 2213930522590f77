//! A network upscaler run over the image in overlapping tiles, Real-ESRGAN's way: each tile is
//! cut with `pad` extra input pixels on every side (where the image has them), run, and the
//! padding's output is cropped away, so only the tile's own pixels are written.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::limits::{exceeded, MAX_UPSCALE_TILE};
use crate::models::esrgan::{Esrgan, EsrganConfig};
use crate::weights::UpscalerFile;
use crate::{Error, Result};

/// Tile size and overlap, in input pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Side of the square tiles; 0 runs the whole image at once.
    pub tile: usize,
    /// Extra context around each tile, cropped from the output (Real-ESRGAN's `tile_pad`).
    pub pad: usize,
}

impl Default for Tiling {
    /// 512-pixel tiles with Real-ESRGAN's 10-pixel padding: a 768² → 3072² 4× upscale runs
    /// four forward passes, none bigger than 532² in.
    fn default() -> Self {
        Self { tile: 512, pad: 10 }
    }
}

/// An ESRGAN-family network with its tiling.
pub struct ModelUpscaler {
    name: String,
    config: EsrganConfig,
    network: Esrgan,
    device: Device,
    tiling: Tiling,
}

impl ModelUpscaler {
    /// Opens `path`, recognises the network and builds it in f32 on `device`.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = UpscalerFile::open(path)?;
        let network = Esrgan::new(file.var_builder(DType::F32, device), file.config())?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upscaler".into());
        Ok(Self {
            name,
            config: file.config().clone(),
            network,
            device: device.clone(),
            tiling: Tiling::default(),
        })
    }

    /// The file name without extension.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The detected network.
    pub fn config(&self) -> &EsrganConfig {
        &self.config
    }

    /// The factor the network enlarges by.
    pub fn scale(&self) -> u32 {
        self.config.scale() as u32
    }

    /// Sets the tiling; a tile no larger than its padding is refused (it would mostly redo
    /// the neighbours' work).
    pub fn set_tiling(&mut self, tiling: Tiling) -> Result<()> {
        // The tile plus its padding on both sides is what one pass sees.
        let pass = tiling.tile.saturating_add(tiling.pad.saturating_mul(2));
        if pass > MAX_UPSCALE_TILE {
            return Err(exceeded(
                format!(
                    "the tile size {} with twice its overlap {}",
                    tiling.tile, tiling.pad
                ),
                pass,
                "MAX_UPSCALE_TILE",
                MAX_UPSCALE_TILE,
            ));
        }
        if tiling.tile != 0 && tiling.tile <= tiling.pad {
            return Err(Error::InvalidRequest(format!(
                "tile size {} must be larger than the tile overlap {} (or 0 for no tiling)",
                tiling.tile, tiling.pad
            )));
        }
        self.tiling = tiling;
        Ok(())
    }

    /// Runs the network over `image` tile by tile; `on_tile(done, total)` after each.
    pub fn upscale(
        &self,
        image: &RgbImage,
        on_tile: &mut dyn FnMut(usize, usize),
    ) -> Result<RgbImage> {
        super::upscaled_size(image, self.scale())?;
        let (width, height) = (image.width() as usize, image.height() as usize);
        if width == 0 || height == 0 {
            return Err(Error::InvalidSize {
                width,
                height,
                reason: "the image is empty".into(),
            });
        }
        // RealESRGANer reflect-pads the right and bottom of the image to a multiple of 2 for
        // every 2× model (4 for 1×), which x2 / x1 RRDBNets need for their pixel unshuffle;
        // SRVGGNet does not, but following it keeps the border pixels equal to Real-ESRGAN's.
        let mod_pad = match self.config.scale() {
            1 => 4,
            2 => 2,
            _ => 1,
        };
        let input = Planes::from_image(
            image,
            width.next_multiple_of(mod_pad),
            height.next_multiple_of(mod_pad),
        );
        // Tile edges must fall on the unshuffle grid too.
        let m = self.config.size_multiple();
        let pad = self.tiling.pad.next_multiple_of(m);
        let tile = match self.tiling.tile {
            0 => input.width.max(input.height),
            t => t.next_multiple_of(m),
        };
        if self.tiling.tile == 0 && input.width.max(input.height) > MAX_UPSCALE_TILE {
            return Err(exceeded(
                format!("the side of a {width}x{height} picture run without tiles"),
                input.width.max(input.height),
                "MAX_UPSCALE_TILE",
                MAX_UPSCALE_TILE,
            ));
        }
        let s = self.config.scale();
        let mut out = RgbImage::new((width * s) as u32, (height * s) as u32);
        let (tiles_x, tiles_y) = (input.width.div_ceil(tile), input.height.div_ceil(tile));
        let total = tiles_x * tiles_y;
        for ty in 0..tiles_y {
            for tx in 0..tiles_x {
                let (x0, y0) = (tx * tile, ty * tile);
                let (x1, y1) = ((x0 + tile).min(input.width), (y0 + tile).min(input.height));
                let (px0, py0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
                let (px1, py1) = ((x1 + pad).min(input.width), (y1 + pad).min(input.height));
                let tensor = input.crop(px0, py0, px1, py1, &self.device)?;
                let result = self.network.forward(&tensor)?;
                let (_, _, out_h, out_w) = result.dims4()?;
                let values: Vec<f32> = result.flatten_all()?.to_vec1()?;
                // Keep the tile's own output pixels, clipped to the unpadded image.
                for y in y0 * s..(y1 * s).min(height * s) {
                    for x in x0 * s..(x1 * s).min(width * s) {
                        let (ly, lx) = (y - py0 * s, x - px0 * s);
                        let mut pixel = [0u8; 3];
                        for (c, v) in pixel.iter_mut().enumerate() {
                            *v = to_u8(values[(c * out_h + ly) * out_w + lx]);
                        }
                        out.put_pixel(x as u32, y as u32, image::Rgb(pixel));
                    }
                }
                on_tile(ty * tiles_x + tx + 1, total);
            }
        }
        Ok(out)
    }
}

/// Real-ESRGAN's output conversion: clamp to [0, 1], × 255, round half to even.
fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// The image as three f32 planes in [0, 1], reflect-padded on the right and bottom.
struct Planes {
    width: usize,
    height: usize,
    data: Vec<f32>,
}

impl Planes {
    fn from_image(image: &RgbImage, width: usize, height: usize) -> Self {
        let (w, h) = (image.width() as usize, image.height() as usize);
        // torch's 'reflect' mode: index w + k reads w − 2 − k (the edge is not repeated).
        let reflect = |i: usize, n: usize| {
            if i < n {
                i
            } else {
                (2 * n).saturating_sub(i + 2)
            }
        };
        let mut data = vec![0f32; 3 * width * height];
        for y in 0..height {
            for x in 0..width {
                let p = image.get_pixel(reflect(x, w) as u32, reflect(y, h) as u32);
                for c in 0..3 {
                    data[(c * height + y) * width + x] = f32::from(p[c]) / 255.0;
                }
            }
        }
        Self {
            width,
            height,
            data,
        }
    }

    /// `[1, 3, y1 − y0, x1 − x0]` cut from the planes.
    fn crop(&self, x0: usize, y0: usize, x1: usize, y1: usize, device: &Device) -> Result<Tensor> {
        let (w, h) = (x1 - x0, y1 - y0);
        let mut tile = Vec::with_capacity(3 * w * h);
        for c in 0..3 {
            for y in y0..y1 {
                let row = (c * self.height + y) * self.width;
                tile.extend_from_slice(&self.data[row + x0..row + x1]);
            }
        }
        Ok(Tensor::from_vec(tile, (1, 3, h, w), device)?)
    }
}
