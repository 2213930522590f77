//! Text to image: prompt → conditioning, seeded noise → sampler → VAE → RGB, with the hires
//! fix's second pass when the request asks for it.

use super::generate::{generate, Event, Outcome, Pass, Source};
use super::hires::HiresPass;
use super::latent::decode;
use super::{Generation, StableDiffusion};
use crate::prompt::EditClock;
use crate::sampling::{Flow, NoiseSource};
use crate::Result;

/// Generates every image of `gen`; image i uses seed + i.
pub fn txt2img(
    sd: &StableDiffusion,
    gen: &Generation,
    on_event: &mut dyn FnMut(Event) -> Flow,
) -> Result<Outcome> {
    let req = &gen.request;
    let sigmas = gen.sigmas(&sd.schedule, req.steps);
    let factor = sd.vae_config.downscale_factor();
    let shape = [
        1,
        sd.vae_config.latent_channels,
        req.height / factor,
        req.width / factor,
    ];
    let start_scale = gen.sampler.initial_noise_scale(sigmas[0]);
    let clock = EditClock::new(req.steps, req.edit_timeline);
    let conditioning = sd.conditioning_for(gen, clock, (req.width, req.height))?;
    let hires = HiresPass::prepare(sd, gen)?;
    let steps = req.steps + hires.as_ref().map_or(0, |h| h.steps());
    let pass = Pass {
        conditioning: &conditioning,
        sigmas: &sigmas,
        first_step: 0,
    };
    let last_sigma = sigmas.last().copied().unwrap_or(0.0);
    generate(sd, gen, Source::Text, steps, on_event, &mut |run| {
        let mut noise = run.generator();
        let x = (noise.sample(&shape, &sd.device)? * start_scale)?;
        let Some(x) = run.sample(sd, &pass, &mut noise, x)? else {
            return Ok(None);
        };
        match &hires {
            None => decode(sd, &x, last_sigma).map(Some),
            Some(hires) => hires.run(sd, run, x, last_sigma, req.steps),
        }
    })
}
