//! Between pixels and the sampler's latent: the VAE's encode (a posterior sample, scaled) and
//! decode (unscaled from sigma space), with the NaN check on the way out.

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::vae_tiling;
use super::StableDiffusion;
use crate::image_io::{image_to_tensor, tensor_to_images};
use crate::models::vae::LatentDistribution;
use crate::sampling::NoiseSource;
use crate::{Error, Result};

/// The VAE's posterior of `image` (8-bit RGB at a size the VAE divides).
pub(super) fn encode(sd: &StableDiffusion, image: &RgbImage) -> Result<LatentDistribution> {
    vae_tiling::encode(
        &*sd.vae()?,
        sd.vae_config.downscale_factor(),
        &image_to_tensor(image, &sd.device)?,
        &sd.vae_tiling,
    )
}

/// A latent drawn from `posterior` (`mean + std · randn`, the first draw of `noise`, as
/// diffusers' `latent_dist.sample(generator)`), in the sampler's scale.
pub(super) fn sample_posterior(
    sd: &StableDiffusion,
    posterior: &LatentDistribution,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let unit = noise.sample(posterior.mean.dims(), &sd.device)?;
    Ok(((&posterior.mean + (&posterior.std * unit)?)? * sd.vae_config.scaling_factor)?)
}

/// A sampler's result back from sigma space: DDIM and PLMS end at σ_0 > 0, where the latent
/// is x·sqrt(ᾱ_0).
pub(super) fn unscaled(x: &Tensor, last_sigma: f64) -> Result<Tensor> {
    Ok((x / (1.0 + last_sigma * last_sigma).sqrt())?)
}

/// Decodes a sampler's result `x`, which ended at `last_sigma`, through the VAE. Unless
/// `sd`'s NaN check is off, a latent or image with NaN or infinite values is an error.
pub fn decode(sd: &StableDiffusion, x: &Tensor, last_sigma: f64) -> Result<RgbImage> {
    let latent = unscaled(x, last_sigma)?;
    if sd.nan_check {
        check_finite(&latent, "latent after sampling")?;
    }
    let decoded = vae_tiling::decode(
        &*sd.vae()?,
        sd.vae_config.downscale_factor(),
        &(latent / sd.vae_config.scaling_factor)?,
        &sd.vae_tiling,
    )?;
    if sd.nan_check {
        check_finite(&decoded, "image the VAE decoded")?;
    }
    tensor_to_images(&decoded)?
        .pop()
        .ok_or_else(|| Error::Image("the VAE returned no image".into()))
}

/// Fails with [`Error::NonFinite`] when `t` holds a NaN or an infinity.
fn check_finite(t: &Tensor, stage: &'static str) -> Result<()> {
    let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        return Err(Error::NonFinite {
            stage,
            count,
            total: values.len(),
        });
    }
    Ok(())
}
