//! [`Generation`]: a request validated once, the only form the pipelines, the worker protocol
//! and the infotext take; and the rule for showing seeds.

use serde::{Deserialize, Serialize};

use super::GenerationRequest;
use crate::sampling::{NoiseSchedule, Sampler, SamplerOptions, SigmaSchedule};
use crate::{Error, Result};

/// A request checked once and resolved into what the pipelines run: the seed drawn, the
/// sampler parsed with its options and schedule, the hires fix's sizes and steps worked out.
///
/// Only [`GenerationRequest::validate`] makes one; it travels (to a worker process, say) as
/// its request, and is validated again when read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "GenerationRequest", into = "GenerationRequest")]
pub struct Generation {
    /// The request as given, with the seed it resolved to.
    pub(crate) request: GenerationRequest,
    pub(crate) seed: u64,
    pub(crate) sampler: Sampler,
    pub(crate) schedule: SigmaSchedule,
    pub(crate) options: SamplerOptions,
    pub(crate) hires: Option<HiresPlan>,
    /// The prompt and negative prompt the text encoder reads: without their `<lora:…>` tags.
    pub(crate) texts: (String, String),
    /// The LoRAs both prompts ask for, in order.
    pub(crate) loras: Vec<crate::lora::LoraTag>,
}

/// The hires fix's second pass, as sizes and step counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HiresPlan {
    pub width: usize,
    pub height: usize,
    /// Steps the second pass takes.
    pub steps: usize,
    /// The length of the schedule those steps end (0: nothing is redrawn).
    pub schedule_steps: usize,
}

impl Generation {
    /// The request, with `seed` set to the seed it resolved to.
    pub fn request(&self) -> &GenerationRequest {
        &self.request
    }

    /// The seed of the first image (image i uses seed + i).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The sampler the request names.
    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// The sigma spacing: the request's, or the one its sampler alias implies.
    pub fn schedule(&self) -> SigmaSchedule {
        self.schedule
    }

    /// The sampler's options: the request's η and `s_noise`, else the sampler's defaults.
    pub fn options(&self) -> SamplerOptions {
        self.options
    }

    /// Number of images the run makes.
    pub fn image_count(&self) -> usize {
        self.request.image_count()
    }

    /// The sigmas a run of `steps` steps visits with this sampler and schedule.
    pub(crate) fn sigmas(&self, noise: &NoiseSchedule, steps: usize) -> Vec<f64> {
        self.sampler.sigmas(noise, steps, self.schedule)
    }

    /// This run with its first image's seed set to `seed` (a sub-run's own seed: set here,
    /// not through the request, where the −1 that `u64::MAX` reads as would draw a new one).
    pub(crate) fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.request.seed = signed_seed(seed);
        self
    }

    /// A request derived from this one by `change` (a pipeline's sub-run), validated anew,
    /// with this run's seed.
    pub(crate) fn derive(&self, change: impl FnOnce(&mut GenerationRequest)) -> Result<Self> {
        let mut request = self.request.clone();
        change(&mut request);
        Ok(request.validate()?.with_seed(self.seed))
    }
}

impl TryFrom<GenerationRequest> for Generation {
    type Error = Error;
    fn try_from(request: GenerationRequest) -> Result<Self> {
        request.validate()
    }
}

impl From<Generation> for GenerationRequest {
    fn from(generation: Generation) -> Self {
        generation.request
    }
}

/// A seed as users give and read it: requests, infotexts, file names and A1111's API carry
/// signed seeds, so a seed that a negative one wrapped to reads as that negative one again.
pub fn signed_seed(seed: u64) -> i64 {
    seed as i64
}

/// The seed a run uses: the request's, or a fresh one for −1. Another negative seed wraps to
/// 64 bits, as torch's `manual_seed` (and so A1111) takes it.
pub(crate) fn resolve_seed(seed: i64) -> u64 {
    if seed != -1 {
        return seed as u64;
    }
    // A1111 draws from [0, 2³² − 2]; any source of entropy will do.
    let entropy = std::collections::hash_map::RandomState::new();
    std::hash::BuildHasher::hash_one(&entropy, std::time::SystemTime::now()) % 4_294_967_295
}
