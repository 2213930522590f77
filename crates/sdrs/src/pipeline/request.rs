//! The one request type every front end builds (CLI flags, HTTP bodies and PNG metadata), and
//! its validation into a [`Generation`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::generation::{resolve_seed, signed_seed, Generation, HiresPlan};
use super::hires;
use crate::image_io::ResizeMode;
use crate::limits::{exceeded, image_fits, MAX_IMAGES, MAX_LORAS, MAX_PIXELS, MAX_SIDE, MAX_STEPS};
use crate::lora::{strip_tags, LoraTag};
use crate::prompt::{EditTimeline, PromptSyntax};
use crate::sampling::rng::{NormalVariant, RandnSource};
use crate::sampling::{SamplerChoice, SamplerOptions, SigmaSchedule};
use crate::{Error, Result};

/// What to generate: the fields A1111's API and infotext use, under the same names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    /// What to draw, in the prompt language `prompt_syntax` says.
    pub prompt: String,
    /// What to steer away from.
    pub negative_prompt: String,
    /// Image width in pixels, a multiple of 8.
    pub width: usize,
    /// Image height in pixels, a multiple of 8.
    pub height: usize,
    /// Sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    pub cfg_scale: f64,
    /// A1111 sampler name or alias ("Euler a", "DPM++ 2M Karras", "ddim", …).
    pub sampler_name: String,
    /// Sigma spacing for k-diffusion samplers; an alias like "… Karras" overrides it.
    pub scheduler: SigmaSchedule,
    /// −1 picks a seed; image i of a run uses seed + i. Another negative seed wraps to 64
    /// bits, as torch's `manual_seed` (and so A1111) takes it.
    pub seed: i64,
    /// Images per batch (CompVis' `--n_samples`).
    pub batch_size: usize,
    /// Number of batches (CompVis' `--n_iter`).
    pub n_iter: usize,
    /// The share of fresh noise per step for the samplers that add noise (DDIM, Euler a);
    /// unset, each sampler's default (DDIM 0, Euler a 1).
    pub eta: Option<f64>,
    /// The scale of the ancestral sampler's fresh noise (k-diffusion's `s_noise`).
    pub s_noise: f64,
    /// How the prompt's syntax is read (A1111, optimizedSD, both, or none).
    pub prompt_syntax: PromptSyntax,
    /// How `when` in `[from:to:when]` is read: A1111's current timeline or its old one.
    pub edit_timeline: EditTimeline,
    /// 1 = the text encoder's last layer, 2 = the penultimate (A1111's convention).
    pub clip_skip: usize,
    /// Which generator makes the noise: torch's CPU one (sdrs' CLI default) or torch's CUDA
    /// one on any device (A1111's "NV", which its API defaults to).
    pub randn_source: RandnSource,
    /// Which float math turns the torch CPU generator's uniforms into normals.
    pub rng_math: NormalVariant,
    /// img2img: how much of the init image is replaced, 0 (none) to 1 (all).
    pub denoising_strength: f64,
    /// img2img: how the init image is fitted to `width` × `height` (A1111's 0/1/2).
    pub resize_mode: ResizeMode,
    /// txt2img hires fix: sample at `width` × `height`, enlarge, then redraw at the larger
    /// size at `denoising_strength`.
    pub enable_hr: bool,
    /// Hires fix: the enlargement (unless `hr_resize_x`/`hr_resize_y` give the size).
    pub hr_scale: f64,
    /// Hires fix upscaler: "Latent", "Latent (nearest)", "Lanczos", or an upscaler model file.
    pub hr_upscaler: String,
    /// Hires fix steps of the second pass; 0 = as many as the first.
    pub hr_second_pass_steps: usize,
    /// Hires fix target width (0 = from `hr_scale`, or from the height's aspect).
    pub hr_resize_x: usize,
    /// Hires fix target height (0 = from `hr_scale`, or from the width's aspect).
    pub hr_resize_y: usize,
    /// SDXL micro-conditioning, `[height, width]` as diffusers orders it: the size the UNet
    /// is told the training image had; unset, the image's (A1111 has no field for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_size: Option<[usize; 2]>,
    /// SDXL micro-conditioning, `[top, left]`: where the UNet is told the image was cropped.
    #[serde(skip_serializing_if = "is_origin")]
    pub crops_coords_top_left: [usize; 2],
    /// SDXL micro-conditioning, `[height, width]`: the size the UNet is told to aim for;
    /// unset, the image's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_size: Option<[usize; 2]>,
    /// LoRA name → A1111 short hash, from an infotext's `Lora hashes`: a tag whose name the
    /// LoRA folder lacks is looked up by this hash.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub lora_hashes: BTreeMap<String, String>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 50,
            cfg_scale: 7.5,
            sampler_name: "PLMS".into(),
            scheduler: SigmaSchedule::Normal,
            seed: -1,
            batch_size: 1,
            n_iter: 1,
            eta: None,
            s_noise: 1.0,
            clip_skip: 1,
            prompt_syntax: PromptSyntax::default(),
            edit_timeline: EditTimeline::default(),
            randn_source: RandnSource::default(),
            rng_math: NormalVariant::default(),
            denoising_strength: 0.75,
            resize_mode: ResizeMode::default(),
            enable_hr: false,
            hr_scale: 2.0,
            hr_upscaler: "Latent".into(),
            hr_second_pass_steps: 0,
            hr_resize_x: 0,
            hr_resize_y: 0,
            original_size: None,
            crops_coords_top_left: [0, 0],
            target_size: None,
            lora_hashes: BTreeMap::new(),
        }
    }
}

fn is_origin(corner: &[usize; 2]) -> bool {
    *corner == [0, 0]
}

impl GenerationRequest {
    /// Checks every field a user can get wrong, before anything is allocated, and resolves
    /// the request into the [`Generation`] the pipelines run (drawing a seed for −1).
    pub fn validate(&self) -> Result<Generation> {
        let (w, h) = (self.width, self.height);
        let size_error = |reason: &str| Error::InvalidSize {
            width: w,
            height: h,
            reason: reason.into(),
        };
        if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 {
            return Err(size_error(
                "width and height must be positive multiples of 8",
            ));
        }
        if !image_fits(w, h) {
            return Err(size_error(&format!(
                "at most {MAX_SIDE} pixels a side and {MAX_PIXELS} pixels in all"
            )));
        }
        for (field, text) in [
            ("prompt", &self.prompt),
            ("negative prompt", &self.negative_prompt),
        ] {
            crate::prompt::check_text(field, text)?;
        }
        let prompt = strip_tags("prompt", &self.prompt)?;
        let negative = strip_tags("negative prompt", &self.negative_prompt)?;
        for kind in prompt.ignored.iter().chain(&negative.ignored) {
            tracing::warn!("<{kind}:…> is not a kind of extra network sdrs has; it is left out");
        }
        let loras: Vec<LoraTag> = prompt.loras.into_iter().chain(negative.loras).collect();
        if loras.len() > MAX_LORAS {
            return Err(exceeded("LoRA tags", loras.len(), "MAX_LORAS", MAX_LORAS));
        }
        if self.lora_hashes.len() > MAX_LORAS {
            return Err(exceeded(
                "Lora hashes",
                self.lora_hashes.len(),
                "MAX_LORAS",
                MAX_LORAS,
            ));
        }
        if self.steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if self.steps > MAX_STEPS {
            return Err(exceeded("steps", self.steps, "MAX_STEPS", MAX_STEPS));
        }
        if self.hr_second_pass_steps > MAX_STEPS {
            return Err(exceeded(
                "the hires fix's steps",
                self.hr_second_pass_steps,
                "MAX_STEPS",
                MAX_STEPS,
            ));
        }
        if !self.cfg_scale.is_finite() {
            return Err(Error::InvalidRequest("cfg_scale must be a number".into()));
        }
        if let Some(eta) = self.eta {
            if !(eta.is_finite() && eta >= 0.0) {
                return Err(Error::InvalidRequest("eta must be ≥ 0".into()));
            }
        }
        if !(self.s_noise.is_finite() && self.s_noise >= 0.0) {
            return Err(Error::InvalidRequest("s_noise must be ≥ 0".into()));
        }
        if self.batch_size == 0 || self.n_iter == 0 {
            return Err(Error::InvalidRequest(
                "batch size and iterations must be at least 1".into(),
            ));
        }
        if self.image_count() > MAX_IMAGES {
            return Err(exceeded(
                "batch size × iterations",
                self.image_count(),
                "MAX_IMAGES",
                MAX_IMAGES,
            ));
        }
        if !(0.0..=1.0).contains(&self.denoising_strength) {
            return Err(Error::InvalidRequest(format!(
                "denoising strength must be between 0 and 1, got {}",
                self.denoising_strength
            )));
        }
        if self.clip_skip == 0 {
            return Err(Error::InvalidRequest("clip_skip starts at 1".into()));
        }
        let hires_size = if self.enable_hr {
            let (tw, th) = hires::target_size(self)?;
            if !image_fits(tw, th) {
                return Err(Error::InvalidSize {
                    width: tw,
                    height: th,
                    reason: format!(
                        "the hires fix would make this size; at most {MAX_SIDE} pixels a side \
                         and {MAX_PIXELS} pixels in all"
                    ),
                });
            }
            Some((tw, th))
        } else {
            None
        };
        let choice: SamplerChoice = self.sampler_name.parse()?;
        let schedule = choice.schedule.unwrap_or(self.scheduler);
        if schedule != SigmaSchedule::Normal && !choice.sampler.uses_sigma_schedule() {
            return Err(Error::InvalidRequest(format!(
                "{} walks the training timesteps; a {schedule} schedule does not apply to it",
                choice.sampler.name()
            )));
        }
        let (most, limit) = choice.sampler.max_schedule_steps();
        if self.steps > most {
            return Err(exceeded(
                format!("steps with {}", choice.sampler.name()),
                self.steps,
                limit,
                most,
            ));
        }
        let hires = match hires_size {
            Some((width, height)) => {
                let (steps, schedule_steps) = hires::second_pass_steps(self, choice.sampler)?;
                Some(HiresPlan {
                    width,
                    height,
                    steps: if schedule_steps == 0 { 0 } else { steps },
                    schedule_steps,
                })
            }
            None => None,
        };
        let defaults = SamplerOptions::defaults(choice.sampler);
        let seed = resolve_seed(self.seed);
        Ok(Generation {
            request: GenerationRequest {
                seed: signed_seed(seed),
                ..self.clone()
            },
            seed,
            sampler: choice.sampler,
            schedule,
            options: SamplerOptions {
                eta: self.eta.unwrap_or(defaults.eta),
                s_noise: self.s_noise,
            },
            hires,
            texts: (prompt.text, negative.text),
            loras,
        })
    }

    /// Number of images the request makes.
    pub fn image_count(&self) -> usize {
        self.batch_size.saturating_mul(self.n_iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> GenerationRequest {
        GenerationRequest {
            sampler_name: "Euler a".into(),
            ..Default::default()
        }
    }

    #[test]
    fn sizes_must_be_multiples_of_8_and_bounded() {
        for (w, h) in [(500, 512), (0, 512), (512, 8200), (8192, 8192)] {
            let r = GenerationRequest {
                width: w,
                height: h,
                ..req()
            };
            assert!(
                matches!(r.validate(), Err(Error::InvalidSize { .. })),
                "{w}x{h}"
            );
        }
        let ok = GenerationRequest {
            width: 80,
            height: 48,
            ..req()
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn step_counts_are_bounded_per_sampler_and_for_the_hires_fix() {
        let with = |sampler: &str, steps: usize| GenerationRequest {
            sampler_name: sampler.into(),
            steps,
            ..req()
        };
        for sampler in ["DDIM", "PLMS"] {
            assert!(with(sampler, 999).validate().is_ok());
            let err = with(sampler, 1000).validate().unwrap_err().to_string();
            assert!(
                err.contains("MAX_TIMESTEP_STEPS") && err.contains("999"),
                "{err}"
            );
        }
        assert!(with("Euler", 1000).validate().is_ok());
        let err = with("Euler", 1001).validate().unwrap_err().to_string();
        assert!(err.contains("MAX_STEPS"), "{err}");
        let hires = |sampler: &str, steps: usize, strength: f64| GenerationRequest {
            enable_hr: true,
            hr_second_pass_steps: steps,
            denoising_strength: strength,
            ..with(sampler, 20)
        };
        let err = hires("Euler", 1_000_000_000, 0.5)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MAX_STEPS") && err.contains("1000000000"),
            "{err}"
        );
        let err = hires("Euler", 20, 1e-300)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("MAX_SCHEDULE_STEPS"), "{err}");
        let err = hires("DDIM", 600, 0.5).validate().unwrap_err().to_string();
        assert!(
            err.contains("MAX_TIMESTEP_STEPS") && err.contains("1200"),
            "{err}"
        );
        assert!(hires("DDIM", 400, 0.5).validate().is_ok());
        assert!(hires("Euler", 20, 0.0).validate().is_ok());
    }

    #[test]
    fn prompts_are_capped_in_bytes() {
        let long = "x".repeat(crate::limits::MAX_PROMPT_BYTES + 1);
        for r in [
            GenerationRequest {
                prompt: long.clone(),
                ..req()
            },
            GenerationRequest {
                negative_prompt: long,
                ..req()
            },
        ] {
            let err = r.validate().unwrap_err().to_string();
            assert!(err.contains("MAX_PROMPT_BYTES"), "{err}");
        }
    }

    #[test]
    fn karras_alias_sets_the_schedule() {
        let r = GenerationRequest {
            sampler_name: "DPM++ 2M Karras".into(),
            ..req()
        };
        assert_eq!(r.validate().unwrap().schedule(), SigmaSchedule::Karras);
    }

    #[test]
    fn strength_outside_zero_to_one_is_refused() {
        for strength in [-0.1, 1.01, f64::NAN] {
            let r = GenerationRequest {
                denoising_strength: strength,
                ..req()
            };
            let err = r.validate().unwrap_err().to_string();
            assert!(err.contains("between 0 and 1"), "{strength}: {err}");
        }
        for strength in [0.0, 1.0] {
            let r = GenerationRequest {
                denoising_strength: strength,
                ..req()
            };
            assert!(r.validate().is_ok());
        }
    }

    #[test]
    fn a_generation_is_read_back_only_through_validation() {
        let gen = GenerationRequest {
            seed: -1,
            sampler_name: "DPM++ 2M Karras".into(),
            ..req()
        }
        .validate()
        .unwrap();
        // The drawn seed travels as the request's seed and comes back as drawn.
        let wire = serde_json::to_string(&gen).unwrap();
        let back: Generation = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, gen);
        assert_eq!(back.seed(), gen.seed());
        // A frame that was not validated (or was tampered with) is refused, not run.
        let err = serde_json::from_str::<Generation>(r#"{"steps": 0}"#).unwrap_err();
        assert!(
            err.to_string().contains("steps must be at least 1"),
            "{err}"
        );
        let err = serde_json::from_str::<Generation>(r#"{"sampler_name": "DDIM", "steps": 1000}"#)
            .unwrap_err();
        assert!(err.to_string().contains("MAX_TIMESTEP_STEPS"), "{err}");
    }

    #[test]
    fn request_deserialises_with_defaults() {
        let r: GenerationRequest =
            serde_json::from_str(r#"{"prompt": "a cat", "steps": 20}"#).unwrap();
        assert_eq!(r.prompt, "a cat");
        assert_eq!(r.steps, 20);
        assert_eq!(r.width, 512);
        assert_eq!(r.denoising_strength, 0.75);
        let r: GenerationRequest =
            serde_json::from_str(r#"{"denoising_strength": 0.4, "resize_mode": 2}"#).unwrap();
        assert_eq!(r.resize_mode, ResizeMode::Fill);
        assert_eq!(r.denoising_strength, 0.4);
    }
}
