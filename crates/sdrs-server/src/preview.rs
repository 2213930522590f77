//! Live previews: the sampler's current clean-latent estimate turned into a small picture
//! without running the VAE (A1111's "Approx cheap": one linear map per latent pixel).

use candle_core::{DType, Tensor};
use image::RgbImage;

/// A1111's `sd_vae_approx.cheap_approximation` coefficients for SD 1.x/2.x latents: row c is
/// latent channel c's contribution to R, G, B.
const LATENT_TO_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// The picture of a `[1, 4, h, w]` latent, one pixel per latent cell; `None` for latents of
/// another shape.
pub fn cheap_preview(latent: &Tensor) -> Option<RgbImage> {
    let (_, channels, h, w) = latent.dims4().ok()?;
    if channels != LATENT_TO_RGB.len() {
        return None;
    }
    let values: Vec<f32> = latent
        .get(0)
        .ok()?
        .to_dtype(DType::F32)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1()
        .ok()?;
    let plane = h * w;
    Some(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = y as usize * w + x as usize;
        let rgb: [u8; 3] = std::array::from_fn(|c| {
            let v: f32 = (0..channels)
                .map(|l| values[l * plane + at] * LATENT_TO_RGB[l][c])
                .sum();
            ((v + 1.0) / 2.0 * 255.0).round().clamp(0.0, 255.0) as u8
        });
        image::Rgb(rgb)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_latent_cell_maps_linearly_to_one_pixel() {
        // Cell (0,0) = channel 0 at 1: RGB = (1 + coef)/2·255. Cell (1,0) = channel 3 at 2:
        // (1 + 2·coef)/2·255, clamped.
        let mut data = vec![0f32; 4 * 2 * 2];
        data[0] = 1.0;
        data[3 * 4 + 1] = 2.0;
        let latent = Tensor::from_vec(data, (1, 4, 2, 2), &candle_core::Device::Cpu).unwrap();
        let img = cheap_preview(&latent).unwrap();
        assert_eq!(img.dimensions(), (2, 2));
        assert_eq!(img.get_pixel(0, 0).0, [165, 154, 154]);
        assert_eq!(img.get_pixel(1, 0).0, [81, 58, 7]);
        assert_eq!(img.get_pixel(0, 1).0, [128, 128, 128]);
        let wrong = Tensor::zeros((1, 3, 2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(cheap_preview(&wrong).is_none());
    }
}
