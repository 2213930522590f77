//! Ancestral Euler (k-diffusion's `sample_euler_ancestral`, η = 1): A1111's "Euler a".

use candle_core::Tensor;

use super::{report, step_along, to_d, Denoiser, NoiseSource, OnStep};
use crate::Result;

/// Splits a step from `sigma_from` to `sigma_to` into a deterministic step down to
/// `sigma_down` and fresh noise of size `sigma_up` (k-diffusion's `get_ancestral_step`).
pub(crate) fn ancestral_step(sigma_from: f64, sigma_to: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (sigma_to, 0.0);
    }
    let up = (eta
        * (sigma_to.powi(2) * (sigma_from.powi(2) - sigma_to.powi(2)) / sigma_from.powi(2)).sqrt())
    .min(sigma_to);
    let down = (sigma_to.powi(2) - up.powi(2)).sqrt();
    (down, up)
}

/// Euler steps that re-inject noise after each step; one model call per step.
pub fn euler_ancestral(
    den: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f64],
    noise: &mut dyn NoiseSource,
    on_step: &mut OnStep,
) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = den.denoise(&x, sigmas[i])?;
        let (sigma_down, sigma_up) = ancestral_step(sigmas[i], sigmas[i + 1], 1.0);
        let d = to_d(&x, sigmas[i], &denoised)?;
        x = step_along(&x, &d, sigma_down - sigmas[i])?;
        if sigmas[i + 1] > 0.0 {
            let z = noise.sample(x.dims(), x.device())?;
            x = step_along(&x, &z, sigma_up)?;
        }
        report(on_step, i, sigmas, &denoised)?;
    }
    Ok(x)
}
