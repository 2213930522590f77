//! The sampler table: each sampler's A1111 name, older aliases, how it walks the noise
//! levels, the options it reads, and its function.

use candle_core::Tensor;

use super::{
    ddim, dpmpp_2m, euler, euler_ancestral, heun, plms, NoiseSchedule, Sampled, SamplerContext,
    SamplerOptions, SigmaSchedule,
};
use crate::{Error, Result};

/// The samplers sdrs offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Sampler {
    /// DDIM over the training timesteps (η adds noise).
    Ddim,
    /// Pseudo linear multistep (PLMS / PNDM) over the training timesteps.
    Plms,
    /// k-diffusion's Euler.
    Euler,
    /// k-diffusion's ancestral Euler, A1111's "Euler a".
    EulerAncestral,
    /// k-diffusion's Heun, two model calls a step.
    Heun,
    /// k-diffusion's DPM++ 2M.
    DpmPp2m,
}

/// How a sampler walks the noise levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// A k-diffusion sigma schedule (normal, Karras, SGM uniform).
    Sigmas,
    /// The training timesteps, one per step (DDIM, PLMS), from a unit-variance start.
    Timesteps,
}

/// A sampler's function with the options it reads taken from [`SamplerOptions`], as
/// k-diffusion's samplers take their keyword arguments.
type Run = fn(&mut SamplerContext, Tensor, &[f64], &SamplerOptions) -> Result<Sampled>;

/// One sampler: everything the rest of sdrs knows about it.
struct Row {
    sampler: Sampler,
    /// The name A1111 shows and writes into infotexts.
    name: &'static str,
    /// Other spellings users type (lower case).
    aliases: &'static [&'static str],
    walk: Walk,
    /// The η a run uses unless the request gives one; `None` for samplers that add no noise.
    eta: Option<f64>,
    run: Run,
}

/// The sampler table, in the order the CLI and the API list them. A new sampler is its file
/// under `sampling/`, a [`Sampler`] variant and a row here.
const TABLE: &[Row] = &[
    Row {
        sampler: Sampler::Ddim,
        name: "DDIM",
        aliases: &["ddim"],
        walk: Walk::Timesteps,
        eta: Some(0.0),
        run: |ctx, x, sigmas, o| ddim(ctx, x, sigmas, o.eta),
    },
    Row {
        sampler: Sampler::Plms,
        name: "PLMS",
        aliases: &["plms", "pndm"],
        walk: Walk::Timesteps,
        eta: None,
        run: |ctx, x, sigmas, _| plms(ctx, x, sigmas),
    },
    Row {
        sampler: Sampler::Euler,
        name: "Euler",
        aliases: &["euler", "k_euler"],
        walk: Walk::Sigmas,
        eta: None,
        run: |ctx, x, sigmas, _| euler(ctx, x, sigmas),
    },
    Row {
        sampler: Sampler::EulerAncestral,
        name: "Euler a",
        aliases: &[
            "euler a",
            "euler_a",
            "euler_ancestral",
            "k_euler_a",
            "k_euler_ancestral",
        ],
        walk: Walk::Sigmas,
        // k-diffusion's `eta=1.`: a full step of fresh noise.
        eta: Some(1.0),
        run: |ctx, x, sigmas, o| euler_ancestral(ctx, x, sigmas, o.eta, o.s_noise),
    },
    Row {
        sampler: Sampler::Heun,
        name: "Heun",
        aliases: &["heun", "k_heun"],
        walk: Walk::Sigmas,
        eta: None,
        run: |ctx, x, sigmas, _| heun(ctx, x, sigmas),
    },
    Row {
        sampler: Sampler::DpmPp2m,
        name: "DPM++ 2M",
        aliases: &["dpm++ 2m", "dpmpp_2m", "k_dpmpp_2m", "dpm++2m"],
        walk: Walk::Sigmas,
        eta: None,
        run: |ctx, x, sigmas, _| dpmpp_2m(ctx, x, sigmas),
    },
];

/// A sampler name as parsed: the sampler, and the schedule an alias like "DPM++ 2M Karras"
/// implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerChoice {
    /// The sampler named.
    pub sampler: Sampler,
    /// The schedule the name implies, if it implies one.
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
        let sampler = TABLE
            .iter()
            .find(|row| row.name.to_ascii_lowercase() == base || row.aliases.contains(&base))
            .map(|row| row.sampler)
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
        TABLE.iter().map(|row| row.sampler).collect()
    }

    /// This sampler's row of the table (every variant has one; a unit test checks).
    fn row(self) -> &'static Row {
        TABLE
            .iter()
            .find(|row| row.sampler == self)
            .unwrap_or(&TABLE[0])
    }

    /// The name A1111 shows and writes into the infotext.
    pub fn name(self) -> &'static str {
        self.row().name
    }

    /// The other spellings this sampler is known by.
    pub fn aliases(self) -> &'static [&'static str] {
        self.row().aliases
    }

    /// The CLI's help line: every sampler's A1111 name, quoted where it has a space.
    pub fn help() -> String {
        let names: Vec<String> = Sampler::all()
            .iter()
            .map(|s| match s.name() {
                name if name.contains(' ') => format!("{name:?}"),
                name => name.to_string(),
            })
            .collect();
        format!(
            "{} (add \" Karras\" for a Karras schedule)",
            names.join(", ")
        )
    }

    /// The η a run uses unless the request gives one: DDIM is deterministic by default,
    /// ancestral samplers add a full step of fresh noise (k-diffusion's `eta=1.`); 0 for
    /// samplers that add no noise.
    pub fn default_eta(self) -> f64 {
        self.row().eta.unwrap_or(0.0)
    }

    /// Whether this sampler reads η (it adds fresh noise): DDIM and the ancestral sampler.
    pub fn uses_eta(self) -> bool {
        self.row().eta.is_some()
    }

    /// k-diffusion samplers walk a sigma schedule; DDIM and PLMS walk training timesteps.
    pub fn uses_sigma_schedule(self) -> bool {
        self.row().walk == Walk::Sigmas
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

    /// Runs the sampler from `x` over `sigmas`, with the options it reads.
    pub fn run(
        self,
        ctx: &mut SamplerContext,
        x: Tensor,
        sigmas: &[f64],
        options: &SamplerOptions,
    ) -> Result<Sampled> {
        (self.row().run)(ctx, x, sigmas, options)
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
    fn every_sampler_has_exactly_one_row() {
        let variants = [
            Sampler::Ddim,
            Sampler::Plms,
            Sampler::Euler,
            Sampler::EulerAncestral,
            Sampler::Heun,
            Sampler::DpmPp2m,
        ];
        for sampler in variants {
            // Exhaustive, so that a new variant does not compile until it is listed above.
            match sampler {
                Sampler::Ddim
                | Sampler::Plms
                | Sampler::Euler
                | Sampler::EulerAncestral
                | Sampler::Heun
                | Sampler::DpmPp2m => {}
            }
            let rows = TABLE.iter().filter(|row| row.sampler == sampler).count();
            assert_eq!(rows, 1, "{sampler:?}");
        }
        assert_eq!(TABLE.len(), variants.len());
    }

    #[test]
    fn karras_is_refused_for_timestep_samplers() {
        assert!(parse("DDIM Karras").is_err());
    }
}

#[cfg(test)]
mod option_tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::sampling::rng::{NormalVariant, TorchRng};
    use crate::sampling::{Denoiser, Flow, NoiseSource, Step};

    /// `D(x, σ) = x / (1 + σ²)` (the exact denoiser of a unit Gaussian), recording the step
    /// each call was made at.
    struct Gaussian {
        steps: Vec<usize>,
    }

    impl Denoiser for Gaussian {
        fn denoise(&mut self, x: &Tensor, sigma: f64, step: usize) -> Result<Tensor> {
            self.steps.push(step);
            Ok((x / (1.0 + sigma * sigma))?)
        }
    }

    fn run(sampler: Sampler, options: SamplerOptions) -> (Vec<f32>, Vec<usize>) {
        let schedule = NoiseSchedule::stable_diffusion();
        let sigmas = sampler.sigmas(&schedule, 6, SigmaSchedule::Normal);
        let mut noise = TorchRng::new(7, NormalVariant::default());
        let x = (noise.sample(&[1, 4, 2, 2], &Device::Cpu).unwrap() * sigmas[0]).unwrap();
        let mut denoiser = Gaussian { steps: Vec::new() };
        let mut on_step = |_: &Step| Flow::Continue;
        let mut ctx = SamplerContext {
            denoiser: &mut denoiser,
            noise: &mut noise,
            on_step: &mut on_step,
        };
        let Sampled::Done(x) = sampler.run(&mut ctx, x, &sigmas, &options).unwrap() else {
            panic!("stopped");
        };
        let values = x.flatten_all().unwrap().to_vec1().unwrap();
        (values, denoiser.steps)
    }

    #[test]
    fn euler_a_at_eta_zero_is_euler() {
        // k-diffusion's get_ancestral_step gives σ_down = σ_next, σ_up = 0 at η = 0: the
        // step is Euler's, and the noise it still draws is scaled by zero.
        let plain = run(Sampler::Euler, SamplerOptions::defaults(Sampler::Euler)).0;
        let eta_zero = SamplerOptions {
            eta: 0.0,
            s_noise: 1.0,
        };
        assert_eq!(run(Sampler::EulerAncestral, eta_zero).0, plain);
        let default = SamplerOptions::defaults(Sampler::EulerAncestral);
        assert_eq!(default.eta, 1.0);
        assert_ne!(run(Sampler::EulerAncestral, default).0, plain);
        let quiet = SamplerOptions {
            s_noise: 0.0,
            ..default
        };
        // With s_noise 0 only the deterministic part of each ancestral step is left, which
        // ends below where Euler ends (σ_down < σ_next).
        assert_ne!(run(Sampler::EulerAncestral, quiet).0, plain);
    }

    #[test]
    fn the_denoiser_is_told_each_step_and_heun_asks_twice_per_step() {
        let (_, steps) = run(Sampler::Euler, SamplerOptions::defaults(Sampler::Euler));
        assert_eq!(steps, [0, 1, 2, 3, 4, 5]);
        let (_, steps) = run(Sampler::Heun, SamplerOptions::defaults(Sampler::Heun));
        // The last step goes to σ = 0 and is a plain Euler step.
        assert_eq!(steps, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]);
    }

    #[test]
    fn a_stop_ends_the_run_with_what_was_asked() {
        let schedule = NoiseSchedule::stable_diffusion();
        let sigmas = Sampler::Euler.sigmas(&schedule, 6, SigmaSchedule::Normal);
        let mut noise = TorchRng::new(7, NormalVariant::default());
        let x = noise.sample(&[1, 4, 2, 2], &Device::Cpu).unwrap();
        let mut denoiser = Gaussian { steps: Vec::new() };
        let mut on_step = |s: &Step| {
            if s.index == 2 {
                Flow::Skip
            } else {
                Flow::Continue
            }
        };
        let mut ctx = SamplerContext {
            denoiser: &mut denoiser,
            noise: &mut noise,
            on_step: &mut on_step,
        };
        let options = SamplerOptions::defaults(Sampler::Euler);
        let ended = Sampler::Euler.run(&mut ctx, x, &sigmas, &options).unwrap();
        assert!(matches!(ended, Sampled::Stopped(Flow::Skip)));
        assert_eq!(denoiser.steps, [0, 1, 2]);
    }
}
