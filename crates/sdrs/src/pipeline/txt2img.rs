//! Text to image: prompt → conditioning, seeded noise → sampler → VAE → RGB.

use std::cell::Cell;

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::hires::HiresPass;
use super::infotext::{self, ImageFacts};
use super::vae_tiling;
use super::{CfgDenoiser, GenerationRequest, ResolvedSampling, StableDiffusion};
use crate::image_io::tensor_to_images;
use crate::sampling::rng::TorchRng;
use crate::sampling::{Flow, NoiseSource, Step};
use crate::{Error, Result};

/// One finished image and what made it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub image: RgbImage,
    pub seed: u64,
    pub infotext: String,
}

/// What a generation reports while it runs.
pub enum Event<'a> {
    /// Image `image` of `images` finished sampling step `step` of `steps`.
    Step {
        image: usize,
        images: usize,
        step: usize,
        steps: usize,
        /// The model's current estimate of the clean latent (for previews).
        denoised: &'a Tensor,
    },
    /// Image `index` is done (save it now: nothing is lost if a later image fails).
    Image {
        index: usize,
        image: &'a GeneratedImage,
    },
}

/// The seed a run uses: the request's, or a fresh one for −1. Another negative seed wraps to
/// 64 bits, as torch's `manual_seed` (and so A1111) takes it.
pub fn resolve_seed(seed: i64) -> u64 {
    if seed != -1 {
        return seed as u64;
    }
    // A1111 draws from [0, 2³² − 2]; any source of entropy will do.
    let entropy = std::collections::hash_map::RandomState::new();
    std::hash::BuildHasher::hash_one(&entropy, std::time::SystemTime::now()) % 4_294_967_295
}

/// Generates every image of the request; image i uses seed + i.
pub fn txt2img(
    sd: &StableDiffusion,
    req: &GenerationRequest,
    on_event: &mut dyn FnMut(Event) -> Flow,
) -> Result<Vec<GeneratedImage>> {
    let sampling = req.validate()?;
    let sigmas = sampling
        .sampler
        .sigmas(&sd.schedule, req.steps, sampling.schedule);
    let factor = sd.vae_config.downscale_factor();
    let shape = [
        1,
        sd.vae_config.latent_channels,
        req.height / factor,
        req.width / factor,
    ];
    let start_scale = sampling.sampler.initial_noise_scale(sigmas[0]);
    let hires = HiresPass::prepare(sd, req, sampling)?;
    generate(sd, req, sampling, false, on_event, &mut |run| {
        let x = (run.noise.sample(&shape, &sd.device)? * start_scale)?;
        let Some(hires) = &hires else {
            return sample_and_decode(sd, run, x, &sigmas);
        };
        let total = req.steps + hires.steps();
        let x = {
            let mut report = offset_steps(&mut *run.on_step, 0, total);
            run.sampling.sampler.run(
                &mut *run.denoiser,
                x,
                &sigmas,
                &mut *run.noise,
                &mut report,
                run.eta,
            )?
        };
        let last_sigma = sigmas.last().copied().unwrap_or(0.0);
        hires.run(sd, req, run, x, last_sigma, req.steps)
    })
}

/// What the per-image step of [`generate`] works with: the image's seeded generator, the
/// guided denoiser, and the progress callback.
pub(super) struct ImageRun<'a, 'b> {
    /// The image's seed (request seed + image index).
    pub seed: u64,
    pub noise: &'a mut TorchRng,
    pub denoiser: &'a mut CfgDenoiser<'b>,
    pub on_step: &'a mut dyn FnMut(&Step) -> Flow,
    pub sampling: ResolvedSampling,
    pub eta: f64,
}

/// Runs the request's sampler from `x` over `sigmas` and decodes the result.
pub(super) fn sample_and_decode(
    sd: &StableDiffusion,
    run: &mut ImageRun,
    x: Tensor,
    sigmas: &[f64],
) -> Result<RgbImage> {
    let x = run.sampling.sampler.run(
        &mut *run.denoiser,
        x,
        sigmas,
        &mut *run.noise,
        &mut *run.on_step,
        run.eta,
    )?;
    decode(sd, &x, sigmas.last().copied().unwrap_or(0.0))
}

/// Reports a sampler's steps as steps `offset + 1 ..` of `total` (a hires fix's second
/// pass follows its first).
pub(super) fn offset_steps<'a>(
    on_step: &'a mut dyn FnMut(&Step) -> Flow,
    offset: usize,
    total: usize,
) -> impl FnMut(&Step) -> Flow + 'a {
    move |s: &Step| {
        on_step(&Step {
            index: s.index + offset,
            total,
            sigma: s.sigma,
            denoised: s.denoised,
        })
    }
}

/// What txt2img and img2img share: the prompts, the seeds, one generator and denoiser per
/// image, progress and image events. `make_image` turns one image's run into pixels.
pub(super) fn generate(
    sd: &StableDiffusion,
    req: &GenerationRequest,
    sampling: ResolvedSampling,
    img2img: bool,
    on_event: &mut dyn FnMut(Event) -> Flow,
    make_image: &mut dyn FnMut(&mut ImageRun) -> Result<RgbImage>,
) -> Result<Vec<GeneratedImage>> {
    let base_seed = resolve_seed(req.seed);
    let conditioning = sd.conditioning(
        &req.prompt,
        &req.negative_prompt,
        req.prompt_syntax,
        req.steps,
        req.clip_skip,
    )?;
    let images = req.image_count();
    let mut out = Vec::with_capacity(images);
    for index in 0..images {
        let seed = base_seed.wrapping_add(index as u64);
        let mut noise = TorchRng::new(seed, req.rng_math);
        let step = Cell::new(0);
        let mut denoiser = CfgDenoiser::new(sd, &conditioning, req.cfg_scale, &step);
        let image = {
            let mut on_step = |s: &Step| {
                step.set(s.index + 1);
                on_event(Event::Step {
                    image: index,
                    images,
                    step: s.index + 1,
                    steps: s.total,
                    denoised: s.denoised,
                })
            };
            let made = make_image(&mut ImageRun {
                seed,
                noise: &mut noise,
                denoiser: &mut denoiser,
                on_step: &mut on_step,
                sampling,
                eta: req.eta,
            });
            match made {
                Err(Error::Skipped) => continue,
                made => made?,
            }
        };
        let facts = ImageFacts {
            seed,
            model_name: sd.model_name.clone(),
            model_hash: sd.model_hash.clone(),
            img2img,
            fast: sd.fast(),
        };
        let generated = GeneratedImage {
            image,
            seed,
            infotext: infotext::render(req, sampling.sampler.name(), sampling.schedule, &facts),
        };
        if on_event(Event::Image {
            index,
            image: &generated,
        }) == Flow::Stop
        {
            return Err(Error::Cancelled);
        }
        out.push(generated);
    }
    Ok(out)
}

/// Decodes a sampler's result: back from sigma space to the VAE's latent scale (DDIM and
/// PLMS end at σ_0 > 0, where the latent is x·sqrt(ᾱ_0)), then through the VAE.
/// Unless `sd.nan_check` is off, a latent or image with NaN or infinite values is an error.
pub fn decode(sd: &StableDiffusion, x: &Tensor, last_sigma: f64) -> Result<RgbImage> {
    let latent = (x / (1.0 + last_sigma * last_sigma).sqrt())?;
    if sd.nan_check {
        check_finite(&latent, "latent after sampling")?;
    }
    let decoded = vae_tiling::decode(
        &*sd.vae()?,
        sd.vae_config.downscale_factor(),
        &(latent / sd.vae_config.scaling_factor)?,
        &sd.vae_tiling,
    )?;
    if sd.nan_check {
        check_finite(&decoded, "image the VAE decoded")?;
    }
    tensor_to_images(&decoded)?
        .pop()
        .ok_or_else(|| Error::Image("the VAE returned no image".into()))
}

/// Fails with [`Error::NonFinite`] when `t` holds a NaN or an infinity.
fn check_finite(t: &Tensor, stage: &'static str) -> Result<()> {
    let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        return Err(Error::NonFinite {
            stage,
            count,
            total: values.len(),
        });
    }
    Ok(())
}
