//! Image upscalers: the built-in Lanczos filter and, in `esrgan`, trained networks.

use image::RgbImage;

use crate::image_io::resize_lanczos;
use crate::{Error, Result};

/// Something that enlarges an RGB image by an integer factor.
pub enum Upscaler {
    /// Pillow's Lanczos filter: no model, any factor.
    Lanczos,
}

impl Upscaler {
    /// A short name for infotexts and listings.
    pub fn name(&self) -> &str {
        match self {
            Upscaler::Lanczos => "Lanczos",
        }
    }

    /// Enlarges `image` by `scale` (≥ 1) in both directions.
    pub fn upscale(&self, image: &RgbImage, scale: u32) -> Result<RgbImage> {
        if scale == 0 {
            return Err(Error::InvalidRequest(
                "upscale factor must be at least 1".into(),
            ));
        }
        match self {
            Upscaler::Lanczos => Ok(resize_lanczos(
                image,
                image.width() * scale,
                image.height() * scale,
            )),
        }
    }
}
