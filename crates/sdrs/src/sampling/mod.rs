//! Noise schedules, samplers and the seeded noise they draw.
//!
//! Samplers follow k-diffusion's shape: a denoiser `D(x, σ)` that returns the denoised
//! latent, a list of sigmas ending at the final noise level, the starting latent (already
//! scaled to the first sigma), and a source of noise. CFG, prompt scheduling and the
//! prediction type live in the denoiser, never in a sampler.

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod heun;
mod plms;
pub mod rng;
pub mod schedule;
mod table;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

pub use ddim::ddim;
pub use dpmpp_2m::dpmpp_2m;
pub use euler::euler;
pub use euler_ancestral::euler_ancestral;
pub use heun::heun;
pub use plms::plms;
pub use schedule::{NoiseSchedule, SigmaSchedule};
pub use table::{Sampler, SamplerChoice};

/// A source of standard-normal noise, drawn in a reproducible order.
pub trait NoiseSource {
    /// Draws a float32 tensor of the given shape.
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// A model that predicts the clean latent: `D(x, σ)` in k-diffusion's terms.
pub trait Denoiser {
    /// The denoised latent for `x`, a latent carrying noise of standard deviation `sigma`.
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor>;
}

/// What a sampler reports after each step.
pub struct Step<'a> {
    /// Zero-based index of the step just taken.
    pub index: usize,
    /// Number of steps in the run.
    pub total: usize,
    /// The noise level the step started from.
    pub sigma: f64,
    /// The model's current estimate of the clean latent (for previews).
    pub denoised: &'a Tensor,
}

/// Whether sampling goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop the whole run.
    Stop,
    /// Give up the current image and go on with the next (A1111's "skip").
    Skip,
}

/// The callback samplers call after each step.
pub type OnStep<'a> = dyn FnMut(&Step) -> Flow + 'a;

/// Reports a finished step and turns a stop request into `Error::Cancelled`.
fn report(on_step: &mut OnStep, index: usize, sigmas: &[f64], denoised: &Tensor) -> Result<()> {
    let step = Step {
        index,
        total: sigmas.len() - 1,
        sigma: sigmas[index],
        denoised,
    };
    match on_step(&step) {
        Flow::Continue => Ok(()),
        Flow::Stop => Err(Error::Cancelled),
        Flow::Skip => Err(Error::Skipped),
    }
}

/// k-diffusion's `to_d`: the derivative dx/dσ of the probability-flow ODE.
fn to_d(x: &Tensor, sigma: f64, denoised: &Tensor) -> Result<Tensor> {
    Ok(((x - denoised)? / sigma)?)
}

/// `x + d · dt`.
fn step_along(x: &Tensor, d: &Tensor, dt: f64) -> Result<Tensor> {
    Ok((x + (d * dt)?)?)
}
