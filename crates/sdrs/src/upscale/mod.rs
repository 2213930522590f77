//! Image upscalers: the built-in Lanczos filter and trained ESRGAN-family networks.

mod builtin;
mod model;

use std::path::Path;

use candle_core::Device;
use image::RgbImage;

use crate::image_io::resize_lanczos;
use crate::limits::{exceeded, MAX_UPSCALED_PIXELS, MAX_UPSCALED_SIDE};
use crate::{Error, Result};
pub use builtin::BuiltinUpscaler;
pub use model::{ModelUpscaler, Tiling};

/// Something that enlarges an RGB image by an integer factor.
pub enum Upscaler {
    /// Pillow's Lanczos filter: no model, any factor.
    Lanczos,
    /// An ESRGAN / Real-ESRGAN network: one fixed factor, run in tiles.
    Model(Box<ModelUpscaler>),
}

impl Upscaler {
    /// Opens an upscaler network file (`.pth` or `.safetensors`) to run on `device`.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        Ok(Upscaler::Model(Box::new(ModelUpscaler::open(
            path, device,
        )?)))
    }

    /// A built-in image upscaler by name (see [`BuiltinUpscaler`]).
    pub fn by_name(name: &str) -> Result<Self> {
        Self::built_in(name.parse()?)
    }

    /// A built-in image upscaler; a latent mode is refused, having no image to enlarge.
    pub fn built_in(which: BuiltinUpscaler) -> Result<Self> {
        match which {
            BuiltinUpscaler::Lanczos | BuiltinUpscaler::None => Ok(Upscaler::Lanczos),
            BuiltinUpscaler::Latent | BuiltinUpscaler::LatentNearest => {
                let images: Vec<&str> = BuiltinUpscaler::all()
                    .into_iter()
                    .filter(|u| !u.is_latent())
                    .map(|u| u.name())
                    .collect();
                Err(Error::InvalidRequest(format!(
                    "{} enlarges the latent of a hires fix, not an image; image upscalers: {} \
                     (networks are opened from their file)",
                    which.name(),
                    images.join(", ")
                )))
            }
        }
    }

    /// Sets how a network is run in tiles (filters have no tiles and ignore it); refuses a
    /// tile no larger than its overlap.
    pub fn set_tiling(&mut self, tiling: Tiling) -> Result<()> {
        match self {
            Upscaler::Lanczos => Ok(()),
            Upscaler::Model(m) => m.set_tiling(tiling),
        }
    }

    /// A short name for infotexts and listings.
    pub fn name(&self) -> &str {
        match self {
            Upscaler::Lanczos => "Lanczos",
            Upscaler::Model(m) => m.name(),
        }
    }

    /// The one factor a network enlarges by; `None` for filters, which take any.
    pub fn native_scale(&self) -> Option<u32> {
        match self {
            Upscaler::Lanczos => None,
            Upscaler::Model(m) => Some(m.scale()),
        }
    }

    /// Enlarges `image` by `scale` (≥ 1) in both directions.
    pub fn upscale(&self, image: &RgbImage, scale: u32) -> Result<RgbImage> {
        self.upscale_with_progress(image, scale, &mut |_, _| {})
    }

    /// [`Upscaler::upscale`], calling `on_tile(done, total)` after each tile a network runs.
    pub fn upscale_with_progress(
        &self,
        image: &RgbImage,
        scale: u32,
        on_tile: &mut dyn FnMut(usize, usize),
    ) -> Result<RgbImage> {
        if scale == 0 {
            return Err(Error::InvalidRequest(
                "upscale factor must be at least 1".into(),
            ));
        }
        let (width, height) = upscaled_size(image, scale)?;
        match self {
            Upscaler::Lanczos => Ok(resize_lanczos(image, width, height)),
            Upscaler::Model(m) if m.scale() != scale => Err(Error::InvalidRequest(format!(
                "{} ({}) upscales {}x only, not {scale}x",
                m.name(),
                m.config().describe(),
                m.scale()
            ))),
            Upscaler::Model(m) => m.upscale(image, on_tile),
        }
    }
}

/// The size `image` becomes at `scale`, refused over [`MAX_UPSCALED_SIDE`] or
/// [`MAX_UPSCALED_PIXELS`] before anything is allocated.
pub(crate) fn upscaled_size(image: &RgbImage, scale: u32) -> Result<(u32, u32)> {
    let side = |v: u32| (v as u64).saturating_mul(scale as u64);
    let (width, height) = (side(image.width()), side(image.height()));
    let what = || {
        format!(
            "the upscaled size of {}x{} at {scale}x ({width}x{height})",
            image.width(),
            image.height()
        )
    };
    let longest = width.max(height);
    if longest > MAX_UPSCALED_SIDE as u64 {
        return Err(exceeded(
            format!("the longer side of {}", what()),
            longest,
            "MAX_UPSCALED_SIDE",
            MAX_UPSCALED_SIDE,
        ));
    }
    if width * height > MAX_UPSCALED_PIXELS as u64 {
        return Err(exceeded(
            format!("the pixel count of {}", what()),
            width * height,
            "MAX_UPSCALED_PIXELS",
            MAX_UPSCALED_PIXELS,
        ));
    }
    Ok((width as u32, height as u32))
}
