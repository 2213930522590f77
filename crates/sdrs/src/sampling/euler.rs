//! Euler's method on the probability-flow ODE (k-diffusion's `sample_euler`).

use candle_core::Tensor;

use super::{step_along, to_d, Sampled, SamplerContext};
use crate::Result;

/// Deterministic first-order sampler: one model call per step.
pub fn euler(ctx: &mut SamplerContext, mut x: Tensor, sigmas: &[f64]) -> Result<Sampled> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = ctx.denoiser.denoise(&x, sigmas[i], i)?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        x = step_along(&x, &d, sigmas[i + 1] - sigmas[i])?;
        report!(ctx, i, sigmas, &denoised);
    }
    Ok(Sampled::Done(x))
}
