//! The sampler name table: A1111's names, older aliases, and how each sampler starts.

use candle_core::Tensor;

use super::{
    ddim, dpmpp_2m, euler, euler_ancestral, heun, plms, Denoiser, NoiseSchedule, NoiseSource,
    OnStep, SigmaSchedule,
};
use crate::{Error, Result};

/// The samplers sdrs offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sampler {
    Ddim,
    Plms,
    Euler,
    EulerAncestral,
    Heun,
    DpmPp2m,
}

/// Each sampler's A1111 name and the other spellings users type.
const NAMES: &[(Sampler, &str, &[&str])] = &[
    (Sampler::Ddim, "DDIM", &["ddim"]),
    (Sampler::Plms, "PLMS", &["plms", "pndm"]),
    (Sampler::Euler, "Euler", &["euler", "k_euler"]),
    (
        Sampler::EulerAncestral,
        "Euler a",
        &[
            "euler a",
            "euler_a",
            "euler_ancestral",
            "k_euler_a",
            "k_euler_ancestral",
        ],
    ),
    (Sampler::Heun, "Heun", &["heun", "k_heun"]),
    (
        Sampler::DpmPp2m,
        "DPM++ 2M",
        &["dpm++ 2m", "dpmpp_2m", "k_dpmpp_2m", "dpm++2m"],
    ),
];

/// A sampler name as parsed: the sampler, and the schedule an alias like "DPM++ 2M Karras"
/// implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerChoice {
    pub sampler: Sampler,
    pub schedule: Option<SigmaSchedule>,
}

impl std::str::FromStr for SamplerChoice {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let (base, schedule) = match lower
            .strip_suffix(" karras")
            .or_else(|| lower.strip_suffix("_karras"))
        {
            Some(base) => (base.trim(), Some(SigmaSchedule::Karras)),
            None => (lower.as_str(), None),
        };
        let sampler = NAMES
            .iter()
            .find(|(_, display, aliases)| {
                display.to_ascii_lowercase() == base || aliases.contains(&base)
            })
            .map(|(s, _, _)| *s)
            .ok_or_else(|| Error::UnknownSampler {
                name: name.to_string(),
                valid: Sampler::all()
                    .iter()
                    .map(|s| s.name().to_string())
                    .collect(),
            })?;
        if schedule.is_some() && !sampler.uses_sigma_schedule() {
            return Err(Error::InvalidRequest(format!(
                "{} walks the training timesteps; a Karras schedule does not apply to it",
                sampler.name()
            )));
        }
        Ok(Self { sampler, schedule })
    }
}

impl Sampler {
    /// Every sampler, in the order the CLI and API list them.
    pub fn all() -> Vec<Sampler> {
        NAMES.iter().map(|(s, _, _)| *s).collect()
    }

    /// This sampler's row of the name table.
    fn names(self) -> Option<&'static (Sampler, &'static str, &'static [&'static str])> {
        NAMES.iter().find(|(s, _, _)| *s == self)
    }

    /// The name A1111 shows and writes into the infotext.
    pub fn name(self) -> &'static str {
        self.names().map_or("", |(_, name, _)| name)
    }

    /// The other spellings this sampler is known by.
    pub fn aliases(self) -> &'static [&'static str] {
        self.names().map_or(&[], |(_, _, aliases)| aliases)
    }

    /// k-diffusion samplers walk a sigma schedule; DDIM and PLMS walk training timesteps.
    pub fn uses_sigma_schedule(self) -> bool {
        !matches!(self, Sampler::Ddim | Sampler::Plms)
    }

    /// The longest schedule this sampler can walk, and the name of that limit: DDIM and PLMS
    /// need a distinct training timestep per step.
    pub fn max_schedule_steps(self) -> (usize, &'static str) {
        if self.uses_sigma_schedule() {
            (crate::limits::MAX_SCHEDULE_STEPS, "MAX_SCHEDULE_STEPS")
        } else {
            (crate::limits::MAX_TIMESTEP_STEPS, "MAX_TIMESTEP_STEPS")
        }
    }

    /// The sigmas a run of `steps` steps visits, ending at the final noise level.
    pub fn sigmas(
        self,
        schedule: &NoiseSchedule,
        steps: usize,
        sigma_schedule: SigmaSchedule,
    ) -> Vec<f64> {
        match (self.uses_sigma_schedule(), sigma_schedule) {
            (false, _) => schedule.sigmas_ddim(steps),
            (true, SigmaSchedule::Normal) => schedule.sigmas_normal(steps),
            (true, SigmaSchedule::Karras) => schedule.sigmas_karras(steps),
            (true, SigmaSchedule::SgmUniform) => schedule.sigmas_sgm_uniform(steps),
        }
    }

    /// What unit noise is multiplied by to start at `first_sigma`: k-diffusion starts at
    /// x = σ·z; DDIM and PLMS start from a unit-variance latent, which in sigma space is
    /// z·sqrt(1 + σ²).
    pub fn initial_noise_scale(self, first_sigma: f64) -> f64 {
        if self.uses_sigma_schedule() {
            first_sigma
        } else {
            (1.0 + first_sigma * first_sigma).sqrt()
        }
    }

    /// Runs the sampler from `x` over `sigmas`; `eta` is DDIM's noise amount.
    pub fn run(
        self,
        den: &mut dyn Denoiser,
        x: Tensor,
        sigmas: &[f64],
        noise: &mut dyn NoiseSource,
        on_step: &mut OnStep,
        eta: f64,
    ) -> Result<Tensor> {
        match self {
            Sampler::Ddim => ddim(den, x, sigmas, noise, on_step, eta),
            Sampler::Plms => plms(den, x, sigmas, noise, on_step),
            Sampler::Euler => euler(den, x, sigmas, noise, on_step),
            Sampler::EulerAncestral => euler_ancestral(den, x, sigmas, noise, on_step),
            Sampler::Heun => heun(den, x, sigmas, noise, on_step),
            Sampler::DpmPp2m => dpmpp_2m(den, x, sigmas, noise, on_step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str) -> Result<SamplerChoice> {
        name.parse()
    }

    #[test]
    fn a1111_names_and_aliases_parse() {
        assert_eq!(parse("Euler a").unwrap().sampler, Sampler::EulerAncestral);
        assert_eq!(
            parse("k_euler_ancestral").unwrap().sampler,
            Sampler::EulerAncestral
        );
        assert_eq!(parse("ddim").unwrap().sampler, Sampler::Ddim);
        let karras = parse("DPM++ 2M Karras").unwrap();
        assert_eq!(karras.sampler, Sampler::DpmPp2m);
        assert_eq!(karras.schedule, Some(SigmaSchedule::Karras));
        assert_eq!(parse("Heun").unwrap().schedule, None);
    }

    #[test]
    fn unknown_sampler_lists_the_valid_ones() {
        let err = parse("Euler b").unwrap_err().to_string();
        assert!(err.contains("Euler a") && err.contains("DPM++ 2M"), "{err}");
    }

    #[test]
    fn karras_is_refused_for_timestep_samplers() {
        assert!(parse("DDIM Karras").is_err());
    }
}
