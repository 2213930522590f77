//! Euler's method on the probability-flow ODE (k-diffusion's `sample_euler`).

use candle_core::Tensor;

use super::{report, step_along, to_d, Denoiser, NoiseSource, OnStep};
use crate::Result;

/// Deterministic first-order sampler: one model call per step.
pub fn euler(
    den: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f64],
    _noise: &mut dyn NoiseSource,
    on_step: &mut OnStep,
) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = den.denoise(&x, sigmas[i])?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        x = step_along(&x, &d, sigmas[i + 1] - sigmas[i])?;
        report(on_step, i, sigmas, &denoised)?;
    }
    Ok(x)
}
