//! Ancestral Euler (k-diffusion's `sample_euler_ancestral`): A1111's "Euler a".

use candle_core::Tensor;

use super::{step_along, to_d, Sampled, SamplerContext};
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

/// Euler steps that re-inject noise after each step; one model call per step. `eta` is the
/// share of each step's noise that is fresh (0: plain Euler), `s_noise` its scale.
pub fn euler_ancestral(
    ctx: &mut SamplerContext,
    mut x: Tensor,
    sigmas: &[f64],
    eta: f64,
    s_noise: f64,
) -> Result<Sampled> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = ctx.denoiser.denoise(&x, sigmas[i], i)?;
        let (sigma_down, sigma_up) = ancestral_step(sigmas[i], sigmas[i + 1], eta);
        let d = to_d(&x, sigmas[i], &denoised)?;
        x = step_along(&x, &d, sigma_down - sigmas[i])?;
        if sigmas[i + 1] > 0.0 {
            let z = ctx.noise.sample(x.dims(), x.device())?;
            x = step_along(&x, &z, s_noise * sigma_up)?;
        }
        report!(ctx, i, sigmas, &denoised);
    }
    Ok(Sampled::Done(x))
}
