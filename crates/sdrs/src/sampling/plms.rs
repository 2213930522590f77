//! PLMS: diffusers' `PNDMScheduler` with `skip_prk_steps`, in sigma space.
//!
//! A linear multistep method on ε: the first step averages the slopes at both ends (one
//! extra model call), then Adams–Bashforth of order 2, 3 and 4 on the remembered ε.

use candle_core::Tensor;

use super::{step_along, Denoiser, Sampled, SamplerContext};
use crate::Result;

/// ε and the denoised latent at one point.
fn eps_at(den: &mut dyn Denoiser, x: &Tensor, sigma: f64, step: usize) -> Result<(Tensor, Tensor)> {
    let denoised = den.denoise(x, sigma, step)?;
    let eps = ((x - &denoised)? / sigma)?;
    Ok((eps, denoised))
}

/// PLMS over the given training sigmas (S steps cost S + 1 model calls when S > 1).
pub fn plms(ctx: &mut SamplerContext, mut x: Tensor, sigmas: &[f64]) -> Result<Sampled> {
    let steps = sigmas.len().saturating_sub(1);
    let mut history: Vec<Tensor> = Vec::with_capacity(4);
    for i in 0..steps {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let dt = sigma_next - sigma;
        let (eps, denoised) = eps_at(ctx.denoiser, &x, sigma, i)?;
        if history.len() == 4 {
            history.remove(0);
        }
        history.push(eps);
        let e: Vec<&Tensor> = history.iter().rev().collect();
        let slope = match e.len() {
            1 if steps > 1 => {
                let (eps_next, _) =
                    eps_at(ctx.denoiser, &step_along(&x, e[0], dt)?, sigma_next, i)?;
                ((eps_next + e[0])? / 2.0)?
            }
            1 => e[0].clone(),
            2 => (((e[0] * 3.0)? - e[1])? / 2.0)?,
            3 => ((((e[0] * 23.0)? - (e[1] * 16.0)?)? + (e[2] * 5.0)?)? / 12.0)?,
            _ => {
                let sum = ((((e[0] * 55.0)? - (e[1] * 59.0)?)? + (e[2] * 37.0)?)? - (e[3] * 9.0)?)?;
                (sum * (1.0 / 24.0))?
            }
        };
        x = step_along(&x, &slope, dt)?;
        report!(ctx, i, sigmas, &denoised);
    }
    Ok(Sampled::Done(x))
}
