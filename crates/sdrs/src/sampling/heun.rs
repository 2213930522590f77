//! Heun's second-order method (k-diffusion's `sample_heun`).

use candle_core::Tensor;

use super::{step_along, to_d, Sampled, SamplerContext};
use crate::Result;

/// Two model calls per step (one for the last step, which is plain Euler).
pub fn heun(ctx: &mut SamplerContext, mut x: Tensor, sigmas: &[f64]) -> Result<Sampled> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = ctx.denoiser.denoise(&x, sigma, i)?;
        let d = to_d(&x, sigma, &denoised)?;
        let dt = sigma_next - sigma;
        x = if sigma_next == 0.0 {
            step_along(&x, &d, dt)?
        } else {
            let x_2 = step_along(&x, &d, dt)?;
            let denoised_2 = ctx.denoiser.denoise(&x_2, sigma_next, i)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let d_prime = ((d + d_2)? / 2.0)?;
            step_along(&x, &d_prime, dt)?
        };
        report!(ctx, i, sigmas, &denoised);
    }
    Ok(Sampled::Done(x))
}
