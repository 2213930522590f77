//! txt2img's hires fix, as A1111's `sample_hr_pass` does it: sample at the requested size,
//! enlarge, then redraw at the larger size.
//!
//! - The target is `int(width · hr_scale)` × `int(height · hr_scale)`, or `hr_resize_x/y`
//!   (one of them 0: the other side follows the aspect ratio), rounded down to a multiple of 8.
//! - "Latent" upscalers enlarge the first pass's latent (bilinear, or nearest); any other
//!   upscaler ("Lanczos", an ESRGAN model file) enlarges the decoded image, which is then
//!   fitted to the target with Lanczos and encoded by the VAE.
//! - The second pass is an img2img from that latent. Its noise comes from a fresh generator
//!   seeded with the image's seed (A1111 makes a new `ImageRNG` from the same seeds): first
//!   the VAE posterior sample (image upscalers only), then the initial noise, then any sampler
//!   noise.
//! - Steps: `hr_second_pass_steps` (or the first pass's count) N steps are run, the last N of
//!   a schedule of `int(N / min(strength, 0.999))` steps (A1111's `img2img_fix_steps`
//!   arithmetic, which it always uses for this pass).

use std::path::Path;

use candle_core::Tensor;
use image::RgbImage;

use super::conditioning::Conditioning;
use super::generate::{ImageRun, Pass};
use super::latent::{decode, encode, sample_posterior, unscaled};
use super::{Generation, GenerationRequest, StableDiffusion};
use crate::image_io::resize_lanczos;
use crate::limits::exceeded;
use crate::prompt::EditClock;
use crate::sampling::{NoiseSource, Sampler};
use crate::upscale::Upscaler;
use crate::{Error, Result};

/// The size the hires fix redraws at.
pub fn target_size(req: &GenerationRequest) -> Result<(usize, usize)> {
    let (w, h) = (req.width as f64, req.height as f64);
    let (tw, th) = match (req.hr_resize_x, req.hr_resize_y) {
        (0, 0) => {
            if !(req.hr_scale.is_finite() && req.hr_scale >= 1.0) {
                return Err(Error::InvalidRequest(format!(
                    "the hires fix scale must be at least 1, got {}",
                    req.hr_scale
                )));
            }
            ((w * req.hr_scale) as usize, (h * req.hr_scale) as usize)
        }
        (x, 0) => (x, (x as f64 * h / w) as usize),
        (0, y) => ((y as f64 * w / h) as usize, y),
        (x, y) => (x, y),
    };
    let (tw, th) = (tw / 8 * 8, th / 8 * 8);
    if tw < req.width || th < req.height {
        return Err(Error::InvalidRequest(format!(
            "the hires fix target {tw}x{th} is smaller than the first pass {}x{}",
            req.width, req.height
        )));
    }
    Ok((tw, th))
}

/// The second pass's steps, and the length of the schedule they end (A1111's
/// `img2img_fix_steps`: `int(steps / min(strength, 0.999))`; 0 when the strength is 0 and
/// nothing is redrawn), checked against the sampler's longest schedule.
pub(super) fn second_pass_steps(
    req: &GenerationRequest,
    sampler: Sampler,
) -> Result<(usize, usize)> {
    let steps = match req.hr_second_pass_steps {
        0 => req.steps,
        n => n,
    };
    let strength = req.denoising_strength;
    if strength <= 0.0 {
        return Ok((steps, 0));
    }
    // A tiny strength makes the quotient huge; the float-to-int cast saturates.
    let schedule_steps = ((steps as f64 / strength.min(0.999)) as usize).max(steps);
    let (most, limit) = sampler.max_schedule_steps();
    if schedule_steps > most {
        return Err(exceeded(
            format!(
                "the hires fix's schedule with {} (steps {steps} ÷ denoising strength {strength:?})",
                sampler.name()
            ),
            schedule_steps,
            limit,
            most,
        ));
    }
    Ok((steps, schedule_steps))
}

/// How the first pass is enlarged.
enum HiresUpscaler {
    /// The latent, by torch's `interpolate` (bilinear without antialiasing, or nearest).
    Latent { nearest: bool },
    /// The decoded image.
    Image(Upscaler),
}

impl HiresUpscaler {
    /// A [`BuiltinUpscaler`](crate::upscale::BuiltinUpscaler) by A1111's name (empty:
    /// "Latent"), or a model file.
    fn from_name(name: &str, sd: &StableDiffusion) -> Result<Self> {
        use crate::upscale::BuiltinUpscaler;
        if name.trim().is_empty() {
            return Ok(Self::Latent { nearest: false });
        }
        if let Ok(builtin) = name.parse::<BuiltinUpscaler>() {
            return Ok(match builtin {
                BuiltinUpscaler::Latent => Self::Latent { nearest: false },
                BuiltinUpscaler::LatentNearest => Self::Latent { nearest: true },
                BuiltinUpscaler::None | BuiltinUpscaler::Lanczos => {
                    Self::Image(Upscaler::built_in(builtin)?)
                }
            });
        }
        let path = Path::new(name);
        if path.is_file() {
            return Ok(Self::Image(Upscaler::open(path, &sd.device)?));
        }
        Err(Error::InvalidRequest(format!(
            "unknown hires upscaler {name:?}: use {}, or the path of an ESRGAN/Real-ESRGAN model \
             file",
            BuiltinUpscaler::names().join(", ")
        )))
    }
}

/// Everything the second pass needs, prepared once per request.
pub(super) struct HiresPass {
    width: usize,
    height: usize,
    steps: usize,
    upscaler: HiresUpscaler,
    /// Planned for the second pass's own step count (prompt editing follows it).
    conditioning: Option<Conditioning>,
    sigmas: Vec<f64>,
}

impl HiresPass {
    /// The second pass `gen` asks for, or `None` without the hires fix.
    pub(super) fn prepare(sd: &StableDiffusion, gen: &Generation) -> Result<Option<Self>> {
        let Some(plan) = gen.hires else {
            return Ok(None);
        };
        let (sigmas, conditioning) = if plan.schedule_steps > 0 {
            let full = gen.sigmas(&sd.schedule, plan.schedule_steps);
            let sigmas = full[full.len() - plan.steps - 1..].to_vec();
            let req = &gen.request;
            let clock = EditClock::second_pass(req.steps, plan.steps, req.edit_timeline);
            (
                sigmas,
                Some(sd.conditioning_for(gen, clock, (plan.width, plan.height))?),
            )
        } else {
            (Vec::new(), None)
        };
        Ok(Some(Self {
            width: plan.width,
            height: plan.height,
            steps: plan.steps,
            upscaler: HiresUpscaler::from_name(&gen.request.hr_upscaler, sd)?,
            conditioning,
            sigmas,
        }))
    }

    /// Steps the second pass takes.
    pub(super) fn steps(&self) -> usize {
        self.steps
    }

    /// Enlarges the first pass's result `x` (sampler space, ending at `last_sigma`), redraws
    /// it, and decodes it; `None` when the redraw was stopped. `first_steps` is the first
    /// pass's step count, for progress.
    pub(super) fn run(
        &self,
        sd: &StableDiffusion,
        run: &mut ImageRun,
        x: Tensor,
        last_sigma: f64,
        first_steps: usize,
    ) -> Result<Option<RgbImage>> {
        let factor = sd.vae_config.downscale_factor();
        let (lh, lw) = (self.height / factor, self.width / factor);
        let latent = unscaled(&x, last_sigma)?;
        let mut noise = run.generator();
        let latent = match &self.upscaler {
            HiresUpscaler::Latent { nearest: false } => {
                latent.upsample_bilinear2d(lh, lw, false)?
            }
            HiresUpscaler::Latent { nearest: true } => latent.upsample_nearest2d(lh, lw)?,
            HiresUpscaler::Image(upscaler) => {
                let image = decode(sd, &latent, 0.0)?;
                let enlarged = enlarge(upscaler, &image, self.width, self.height)?;
                sample_posterior(sd, &encode(sd, &enlarged)?, &mut noise)?
            }
        };
        let Some(conditioning) = &self.conditioning else {
            return decode(sd, &latent, 0.0).map(Some);
        };
        let start = noise.sample(latent.dims(), &sd.device)?;
        let x = (latent + (start * self.sigmas[0])?)?;
        let pass = Pass {
            conditioning,
            sigmas: &self.sigmas,
            first_step: first_steps,
        };
        let Some(x) = run.sample(sd, &pass, &mut noise, x)? else {
            return Ok(None);
        };
        decode(sd, &x, self.sigmas.last().copied().unwrap_or(0.0)).map(Some)
    }
}

/// A1111's `resize_image` with an upscaler: enlarge by the upscaler until the target is
/// reached, then fit exactly with Lanczos.
pub(super) fn enlarge(
    upscaler: &Upscaler,
    image: &RgbImage,
    width: usize,
    height: usize,
) -> Result<RgbImage> {
    let (w, h) = (width as u32, height as u32);
    if upscaler.native_scale().is_none() {
        return Ok(resize_lanczos(image, w, h));
    }
    let mut current = image.clone();
    while current.width() < w || current.height() < h {
        let needed = (w.div_ceil(current.width())).max(h.div_ceil(current.height()));
        let scale = upscaler.native_scale().unwrap_or(needed).max(2);
        current = upscaler.upscale(&current, scale)?;
    }
    if current.dimensions() == (w, h) {
        return Ok(current);
    }
    Ok(resize_lanczos(&current, w, h))
}
