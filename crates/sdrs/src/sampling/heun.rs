//! Heun's second-order method (k-diffusion's `sample_heun`).

use candle_core::Tensor;

use super::{report, step_along, to_d, Denoiser, NoiseSource, OnStep};
use crate::Result;

/// Two model calls per step (one for the last step, which is plain Euler).
pub fn heun(
    den: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f64],
    _noise: &mut dyn NoiseSource,
    on_step: &mut OnStep,
) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = den.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        let dt = sigma_next - sigma;
        x = if sigma_next == 0.0 {
            step_along(&x, &d, dt)?
        } else {
            let x_2 = step_along(&x, &d, dt)?;
            let denoised_2 = den.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let d_prime = ((d + d_2)? / 2.0)?;
            step_along(&x, &d_prime, dt)?
        };
        report(on_step, i, sigmas, &denoised)?;
    }
    Ok(x)
}
