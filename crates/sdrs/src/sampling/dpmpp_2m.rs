//! DPM-Solver++(2M) (k-diffusion's `sample_dpmpp_2m`).

use candle_core::Tensor;

use super::{Sampled, SamplerContext};
use crate::Result;

/// Second-order multistep solver in log-sigma time; one model call per step.
pub fn dpmpp_2m(ctx: &mut SamplerContext, mut x: Tensor, sigmas: &[f64]) -> Result<Sampled> {
    let t_of = |sigma: f64| -sigma.ln();
    let mut old_denoised: Option<Tensor> = None;
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = ctx.denoiser.denoise(&x, sigma, i)?;
        if sigma_next == 0.0 {
            // t_next = ∞: the update collapses to the denoised latent.
            x = denoised.clone();
        } else {
            let (t, t_next) = (t_of(sigma), t_of(sigma_next));
            let h = t_next - t;
            let target = match &old_denoised {
                Some(old) => {
                    let r = (t - t_of(sigmas[i - 1])) / h;
                    let c = 1.0 / (2.0 * r);
                    ((&denoised * (1.0 + c))? - (old * c)?)?
                }
                None => denoised.clone(),
            };
            x = ((&x * (sigma_next / sigma))? - (target * (-h).exp_m1())?)?;
        }
        report!(ctx, i, sigmas, &denoised);
        old_denoised = Some(denoised);
    }
    Ok(Sampled::Done(x))
}
