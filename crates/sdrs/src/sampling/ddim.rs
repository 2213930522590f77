//! DDIM (Song et al. 2020) as diffusers' `DDIMScheduler` runs it, in sigma space.
//!
//! With x scaled so that x = x₀ + σ·ε, DDIM's update is
//! x' = x₀ + c_ε·ε + c_z·z with c_ε = sqrt((1 − ᾱ' − s²)/ᾱ') and c_z = s/sqrt(ᾱ'),
//! s = η·sqrt((1 − ᾱ')/(1 − ᾱ)·(1 − ᾱ/ᾱ')), ᾱ = 1/(1 + σ²). At η = 0 this is an Euler step.

use candle_core::Tensor;

use super::{Sampled, SamplerContext};
use crate::Result;

/// DDIM over the given training sigmas; `eta` > 0 adds noise at every step, drawn from
/// the context's noise (diffusers draws it from the pipeline's generator, continuing its
/// stream).
pub fn ddim(ctx: &mut SamplerContext, mut x: Tensor, sigmas: &[f64], eta: f64) -> Result<Sampled> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = ctx.denoiser.denoise(&x, sigma, i)?;
        let eps = ((&x - &denoised)? / sigma)?;
        let alpha = 1.0 / (1.0 + sigma * sigma);
        let alpha_next = 1.0 / (1.0 + sigma_next * sigma_next);
        let variance = (1.0 - alpha_next) / (1.0 - alpha) * (1.0 - alpha / alpha_next);
        let std = eta * variance.max(0.0).sqrt();
        let c_eps = ((1.0 - alpha_next - std * std).max(0.0) / alpha_next).sqrt();
        x = (&denoised + (eps * c_eps)?)?;
        if eta > 0.0 {
            let z = ctx.noise.sample(x.dims(), x.device())?;
            x = (x + (z * (std / alpha_next.sqrt()))?)?;
        }
        report!(ctx, i, sigmas, &denoised);
    }
    Ok(Sampled::Done(x))
}
