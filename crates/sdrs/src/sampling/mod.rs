//! Noise schedules, samplers and the seeded noise they draw.
//!
//! Samplers follow k-diffusion's shape: a denoiser `D(x, σ)` that returns the denoised
//! latent, a list of sigmas ending at the final noise level, the starting latent (already
//! scaled to the first sigma), a source of noise, and options as keywords. CFG, prompt
//! editing and the prediction type live in the denoiser, never in a sampler.

/// Reports step `$i` to the context's callback, and ends the sampler with
/// [`Sampled::Stopped`] unless the callback says go on.
macro_rules! report {
    ($ctx:expr, $i:expr, $sigmas:expr, $denoised:expr) => {
        match $ctx.report($i, $sigmas, $denoised) {
            $crate::sampling::Flow::Continue => {}
            flow => return Ok($crate::sampling::Sampled::Stopped(flow)),
        }
    };
}

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod heun;
mod plms;
pub mod rng;
mod sampler;
pub mod schedule;

use candle_core::{Device, Tensor};

use crate::Result;

pub use ddim::ddim;
pub use dpmpp_2m::dpmpp_2m;
pub use euler::euler;
pub use euler_ancestral::euler_ancestral;
pub use heun::heun;
pub use plms::plms;
pub use sampler::{Sampler, SamplerChoice};
pub use schedule::{NoiseSchedule, SigmaSchedule};

/// A source of standard-normal noise, drawn in a reproducible order.
pub trait NoiseSource {
    /// Draws a float32 tensor of the given shape.
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// A model that predicts the clean latent: `D(x, σ)` in k-diffusion's terms.
pub trait Denoiser {
    /// The denoised latent for `x`, a latent carrying noise of standard deviation `sigma`, at
    /// zero-based sampling step `step` of the run (what picks a scheduled prompt; both model
    /// calls of a second-order step pass the step they belong to).
    fn denoise(&mut self, x: &Tensor, sigma: f64, step: usize) -> Result<Tensor>;
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
    /// Go on.
    Continue,
    /// Stop the whole run.
    Stop,
    /// Give up the current image and go on with the next (A1111's "skip").
    Skip,
}

/// The callback samplers call after each step.
pub type OnStep<'a> = dyn FnMut(&Step) -> Flow + 'a;

/// What a sampler works with besides the latent and the sigmas: the model, a source of noise
/// (drawn only by samplers that add noise) and the step callback.
pub struct SamplerContext<'a> {
    /// The model, `D(x, σ, step)`.
    pub denoiser: &'a mut dyn Denoiser,
    /// Fresh noise for ancestral steps and DDIM's η.
    pub noise: &'a mut dyn NoiseSource,
    /// Called after each step; anything but [`Flow::Continue`] ends the run.
    pub on_step: &'a mut OnStep<'a>,
}

impl SamplerContext<'_> {
    /// Reports step `index` of a run over `sigmas` and returns what the callback asks for.
    fn report(&mut self, index: usize, sigmas: &[f64], denoised: &Tensor) -> Flow {
        (self.on_step)(&Step {
            index,
            total: sigmas.len() - 1,
            sigma: sigmas[index],
            denoised,
        })
    }
}

/// A sampler's options, as k-diffusion's keyword arguments: each sampler reads the ones it
/// has and ignores the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    /// The share of each step's noise that is fresh: DDIM's η (0 = deterministic) and the
    /// ancestral samplers' η (1 = k-diffusion's default).
    pub eta: f64,
    /// The scale of that fresh noise (k-diffusion's `s_noise`, 1 = unit variance).
    pub s_noise: f64,
}

impl SamplerOptions {
    /// `sampler`'s defaults: η of 0 for DDIM, 1 for the ancestral samplers; `s_noise` 1.
    pub fn defaults(sampler: Sampler) -> Self {
        Self {
            eta: sampler.default_eta(),
            s_noise: 1.0,
        }
    }
}

/// How a sampler's run ended.
#[derive(Debug)]
pub enum Sampled {
    /// Every step was taken: the final latent.
    Done(Tensor),
    /// The step callback asked to stop ([`Flow::Stop`]) or to skip the image ([`Flow::Skip`]).
    Stopped(Flow),
}

/// k-diffusion's `to_d`: the derivative dx/dσ of the probability-flow ODE.
fn to_d(x: &Tensor, sigma: f64, denoised: &Tensor) -> Result<Tensor> {
    Ok(((x - denoised)? / sigma)?)
}

/// `x + d · dt`.
fn step_along(x: &Tensor, d: &Tensor, dt: f64) -> Result<Tensor> {
    Ok((x + (d * dt)?)?)
}
