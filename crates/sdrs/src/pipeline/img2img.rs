//! Image to image: init image → VAE latent → noised to a strength-dependent level → sampler.
//!
//! Conventions, so that every image is reproducible from its seed:
//! - The init image is fitted to `width` × `height` with `resize_mode` (A1111's
//!   `resize_image`, Pillow's Lanczos), then encoded once by the VAE.
//! - Image i draws from its own generator `TorchRng::new(seed + i)`, in diffusers' order:
//!   first the VAE posterior sample (`latent = mean + std · randn`), then the initial noise,
//!   then any sampler noise (ancestral steps, DDIM η). The init latent is
//!   `scaling_factor · latent`.
//! - DDIM and PLMS (diffusers' `StableDiffusionImg2ImgPipeline`): `t_enc = min(int(strength ·
//!   S), S)`; the run takes the last `t_enc` of the S timesteps after noising the init latent
//!   to the first of them (`x = x₀ + σ_t · noise` in sigma space, i.e. diffusers' `add_noise`).
//!   diffusers' PNDM img2img skips into its doubled first timestep; sdrs runs PLMS over the
//!   same timesteps as DDIM instead.
//! - k-diffusion samplers (A1111's `sample_img2img`): `t_enc = int(min(strength, 0.999) · S)`,
//!   the full S-step sigma schedule is cut to `sigmas[S − t_enc − 1 ..]` (t_enc + 1 steps) and
//!   `x = init_latent + noise · sigmas[0]`.
//! - Strength 0 (or a DDIM/PLMS `t_enc` of 0) samples nothing: the image is the decoded init
//!   latent.

use image::RgbImage;

use super::generate::{generate, Event, Outcome, Pass, Source};
use super::latent::{decode, encode, sample_posterior};
use super::{Generation, StableDiffusion};
use crate::image_io::resize_for_mode;
use crate::prompt::EditClock;
use crate::sampling::{Flow, NoiseSource, Sampler};
use crate::Result;

/// The tail of a full `steps`-step sigma list that img2img walks at `strength`, or `None`
/// when nothing is sampled. `full` is what [`Sampler::sigmas`] returns for `steps`.
pub fn img2img_sigmas(
    sampler: Sampler,
    full: &[f64],
    steps: usize,
    strength: f64,
) -> Option<&[f64]> {
    if strength <= 0.0 || full.len() != steps + 1 {
        return None;
    }
    let start = if sampler.uses_sigma_schedule() {
        let t_enc = (strength.min(0.999) * steps as f64) as usize;
        steps - t_enc - 1
    } else {
        let t_enc = ((strength * steps as f64) as usize).min(steps);
        if t_enc == 0 {
            return None;
        }
        steps - t_enc
    };
    Some(&full[start..])
}

/// Generates every image of `gen` from `init` (8-bit RGB, any size); image i uses seed + i.
/// The request's `denoising_strength` and `resize_mode` apply.
pub fn img2img(
    sd: &StableDiffusion,
    gen: &Generation,
    init: &RgbImage,
    on_event: &mut dyn FnMut(Event) -> Flow,
) -> Result<Outcome> {
    let req = &gen.request;
    let fitted = resize_for_mode(init, req.resize_mode, req.width as u32, req.height as u32);
    let posterior = encode(sd, &fitted)?;
    let full = gen.sigmas(&sd.schedule, req.steps);
    let sigmas = img2img_sigmas(gen.sampler, &full, req.steps, req.denoising_strength);
    let clock = EditClock::new(req.steps, req.edit_timeline);
    let conditioning = sd.conditioning_for(gen, clock, (req.width, req.height))?;
    let steps = sigmas.map_or(0, |s| s.len() - 1);
    generate(sd, gen, Source::Picture, steps, on_event, &mut |run| {
        let mut noise = run.generator();
        let latent = sample_posterior(sd, &posterior, &mut noise)?;
        let Some(sigmas) = sigmas else {
            return decode(sd, &latent, 0.0).map(Some);
        };
        let start = noise.sample(latent.dims(), &sd.device)?;
        let x = (latent + (start * sigmas[0])?)?;
        let pass = Pass {
            conditioning: &conditioning,
            sigmas,
            first_step: 0,
        };
        let Some(x) = run.sample(sd, &pass, &mut noise, x)? else {
            return Ok(None);
        };
        decode(sd, &x, sigmas.last().copied().unwrap_or(0.0)).map(Some)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{NoiseSchedule, SigmaSchedule};

    fn tail(sampler: Sampler, steps: usize, strength: f64) -> Option<usize> {
        let schedule = NoiseSchedule::stable_diffusion();
        let full = sampler.sigmas(&schedule, steps, SigmaSchedule::Normal);
        img2img_sigmas(sampler, &full, steps, strength).map(|s| {
            assert_eq!(s.last(), full.last());
            s.len() - 1
        })
    }

    #[test]
    fn ddim_runs_the_last_int_strength_times_steps_timesteps() {
        assert_eq!(tail(Sampler::Ddim, 8, 0.75), Some(6));
        assert_eq!(tail(Sampler::Ddim, 8, 0.3), Some(2));
        assert_eq!(tail(Sampler::Ddim, 8, 1.0), Some(8));
        assert_eq!(tail(Sampler::Plms, 10, 0.55), Some(5));
        // int(0.1 · 8) = 0: nothing to sample.
        assert_eq!(tail(Sampler::Ddim, 8, 0.1), None);
    }

    #[test]
    fn k_samplers_start_at_a1111s_sigma() {
        // sigma_sched = sigmas[S − t_enc − 1 ..]: t_enc + 1 steps.
        assert_eq!(tail(Sampler::Euler, 8, 0.75), Some(7));
        assert_eq!(tail(Sampler::EulerAncestral, 8, 0.3), Some(3));
        assert_eq!(tail(Sampler::Euler, 8, 1.0), Some(8));
        assert_eq!(tail(Sampler::DpmPp2m, 8, 0.01), Some(1));
    }

    #[test]
    fn strength_zero_samples_nothing() {
        for sampler in Sampler::all() {
            assert_eq!(tail(sampler, 8, 0.0), None, "{}", sampler.name());
        }
    }
}
