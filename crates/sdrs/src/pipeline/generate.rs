//! The generation loop every pipeline shares: the conditioning, one seeded generator per
//! image, sampling passes with their progress, and the finished images with their infotexts.

use candle_core::Tensor;
use image::RgbImage;

use super::conditioning::Conditioning;
use super::infotext::{self, ImageFacts};
use super::{CfgDenoiser, Generation, StableDiffusion};
use crate::sampling::rng::ImageNoise;
use crate::sampling::{Flow, Sampled, SamplerContext, Step};
use crate::Result;

/// One finished image and what made it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// The pixels.
    pub image: RgbImage,
    /// The image's own seed (the request's seed + its index).
    pub seed: u64,
    /// A1111's parameters text for the image.
    pub infotext: String,
}

/// What a generation reports while it runs.
pub enum Event<'a> {
    /// Image `image` of `images` finished sampling step `step` of `steps`.
    Step {
        /// Zero-based index of the image.
        image: usize,
        /// Images in the run.
        images: usize,
        /// One-based index of the step just taken.
        step: usize,
        /// Steps the image takes, all passes together.
        steps: usize,
        /// The model's current estimate of the clean latent (for previews).
        denoised: &'a Tensor,
    },
    /// Image `index` is done (save it now: nothing is lost if a later image fails).
    Image {
        /// Zero-based index of the image.
        index: usize,
        /// The image.
        image: &'a GeneratedImage,
    },
}

/// What a run made: its images (skipped ones are absent), and whether it was stopped
/// before the end. Stopping and skipping are outcomes a caller asks for, not errors.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The finished images, in order.
    pub images: Vec<GeneratedImage>,
    /// True when an event callback said [`Flow::Stop`].
    pub stopped: bool,
}

/// Whether an image came from a picture (img2img's infotext carries its strength).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Text,
    Picture,
}

/// One image's run: its seed, and where its sampling passes report their steps.
pub(super) struct ImageRun<'a> {
    /// The image's seed (the request's seed + the image's index).
    pub seed: u64,
    gen: &'a Generation,
    on_step: &'a mut dyn FnMut(usize, &Step) -> Flow,
    /// What the step callback asked for when a pass ended early.
    stop: Flow,
}

/// One sampling pass: the text it follows, the sigmas it walks, and where its steps fall in
/// the image's count.
pub(super) struct Pass<'a> {
    pub conditioning: &'a Conditioning,
    pub sigmas: &'a [f64],
    /// Steps of the image taken before this pass (the hires fix's second pass follows its
    /// first).
    pub first_step: usize,
}

impl ImageRun<'_> {
    /// A fresh generator seeded with the image's seed, from the request's source (diffusers'
    /// and A1111's per-image generator; the hires fix's second pass starts another, as A1111
    /// does).
    pub fn generator(&self) -> ImageNoise {
        let req = &self.gen.request;
        ImageNoise::new(self.seed, req.randn_source, req.rng_math)
    }

    /// Runs the request's sampler from `x` over the pass's sigmas, drawing sampler noise from
    /// `noise`. `None` when the step callback stopped the pass (the run learns why).
    pub fn sample(
        &mut self,
        sd: &StableDiffusion,
        pass: &Pass,
        noise: &mut ImageNoise,
        x: Tensor,
    ) -> Result<Option<Tensor>> {
        let mut denoiser = CfgDenoiser::new(sd, pass.conditioning, self.gen.request.cfg_scale);
        let on_step = &mut *self.on_step;
        let mut report = |s: &Step| on_step(pass.first_step, s);
        let mut ctx = SamplerContext {
            denoiser: &mut denoiser,
            noise,
            on_step: &mut report,
        };
        match self
            .gen
            .sampler
            .run(&mut ctx, x, pass.sigmas, &self.gen.options)?
        {
            Sampled::Done(x) => Ok(Some(x)),
            Sampled::Stopped(flow) => {
                self.stop = flow;
                Ok(None)
            }
        }
    }
}

/// Runs every image of `gen`: image i gets seed + i, its own generator, and `steps` steps in
/// all for progress; `make_image` turns one image's run into pixels (`None` when a pass was
/// stopped).
pub(super) fn generate(
    sd: &StableDiffusion,
    gen: &Generation,
    source: Source,
    steps: usize,
    on_event: &mut dyn FnMut(Event) -> Flow,
    make_image: &mut dyn FnMut(&mut ImageRun) -> Result<Option<RgbImage>>,
) -> Result<Outcome> {
    let images = gen.image_count();
    let mut outcome = Outcome::default();
    let ti_hashes = sd.ti_hashes(gen)?;
    for index in 0..images {
        let seed = gen.seed.wrapping_add(index as u64);
        let mut on_step = |first_step: usize, s: &Step| {
            on_event(Event::Step {
                image: index,
                images,
                step: first_step + s.index + 1,
                steps,
                denoised: s.denoised,
            })
        };
        let mut run = ImageRun {
            seed,
            gen,
            on_step: &mut on_step,
            stop: Flow::Continue,
        };
        let Some(image) = make_image(&mut run)? else {
            match run.stop {
                Flow::Skip => continue,
                _ => {
                    outcome.stopped = true;
                    return Ok(outcome);
                }
            }
        };
        let facts = ImageFacts {
            seed,
            model_name: sd.model_name.clone(),
            model_hash: sd.model_hash.clone(),
            img2img: source == Source::Picture,
            fast: sd.fast(),
            lora_hashes: sd.lora_hashes(),
            ti_hashes: ti_hashes.clone(),
        };
        let generated = GeneratedImage {
            image,
            seed,
            infotext: infotext::render(gen, &facts),
        };
        let flow = on_event(Event::Image {
            index,
            image: &generated,
        });
        outcome.images.push(generated);
        if flow == Flow::Stop {
            outcome.stopped = true;
            return Ok(outcome);
        }
    }
    Ok(outcome)
}
