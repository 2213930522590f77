//! Noise schedules, samplers and the seeded noise they draw.
//!
//! Samplers follow k-diffusion's shape: a denoiser `D(x, sigma)` that returns the denoised
//! latent, a list of sigmas, the starting latent, and a source of noise.

pub mod rng;

use candle_core::{Device, Tensor};

use crate::Result;

/// A source of standard-normal noise, drawn in a reproducible order.
pub trait NoiseSource {
    /// Draws a float32 tensor of the given shape.
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}
