//! SD's training noise schedule and the sigma lists samplers walk.
//!
//! Values are computed in float32 the way torch does (diffusers and k-diffusion build them
//! with torch), so that the sigma tables match the Python tools to the last bits that matter.

use crate::{Error, Result};

/// Training timesteps of every SD model.
pub const TRAIN_STEPS: usize = 1000;

/// The discrete training schedule: `alphas_cumprod` and the derived sigma table.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    log_sigmas: Vec<f32>,
}

/// How sigmas are spaced for the k-diffusion samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigmaSchedule {
    /// k-diffusion's `get_sigmas`: evenly spaced timesteps (A1111's "Automatic").
    #[default]
    Normal,
    /// Karras et al. 2022, ρ = 7.
    Karras,
    /// A1111's "SGM Uniform": timesteps evenly spaced from 999 towards 0 without reaching it
    /// (the spacing SD-Turbo's few-step sampling expects).
    #[serde(rename = "sgm_uniform", alias = "sgm uniform")]
    SgmUniform,
}

impl SigmaSchedule {
    /// Every schedule, in the order the CLI and A1111's `/sdapi/v1/schedulers` list them.
    pub fn all() -> [SigmaSchedule; 3] {
        [Self::Normal, Self::Karras, Self::SgmUniform]
    }

    /// The name sdrs takes and writes (`--schedule`, the request JSON).
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Karras => "karras",
            Self::SgmUniform => "sgm_uniform",
        }
    }

    /// A1111's name for it, which `/sdapi/v1/schedulers` lists.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Normal => "automatic",
            Self::Karras | Self::SgmUniform => self.name(),
        }
    }

    /// The label A1111 shows and writes into the infotext's "Schedule type".
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "Automatic",
            Self::Karras => "Karras",
            Self::SgmUniform => "SGM Uniform",
        }
    }

    /// The other spellings accepted for it, besides its names and label (any case).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Self::Normal => &["uniform", "default"],
            Self::Karras => &[],
            Self::SgmUniform => &["sgm-uniform", "SGMUniform"],
        }
    }
}

impl std::str::FromStr for SigmaSchedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        Self::all()
            .into_iter()
            .find(|schedule| {
                [schedule.name(), schedule.a1111_name(), schedule.label()]
                    .iter()
                    .chain(schedule.aliases())
                    .any(|spelling| spelling.eq_ignore_ascii_case(s))
            })
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::all().iter().map(|each| each.name()).collect();
                Error::InvalidRequest(format!(
                    "unknown schedule {s:?}; valid: {}",
                    valid.join(", ")
                ))
            })
    }
}

impl std::fmt::Display for SigmaSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` as torch's x86-64 CPU build computes it:
/// the first half counts up from `start`, the second half down from `end`, each value one
/// fused multiply-add (the compiler contracts `start + step * i`).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

impl NoiseSchedule {
    /// SD's schedule: `scaled_linear` betas from 0.00085 to 0.012 over 1000 steps.
    pub fn stable_diffusion() -> Self {
        let betas: Vec<f32> = linspace_f32(
            0.00085f64.sqrt() as f32,
            0.012f64.sqrt() as f32,
            TRAIN_STEPS,
        )
        .into_iter()
        .map(|b| b * b)
        .collect();
        // torch's CPU cumprod accumulates float32 input in double.
        let mut acc = 1f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                acc *= (1f32 - b) as f64;
                acc as f32
            })
            .collect();
        let sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|a| ((1f32 - a) / a).sqrt())
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        }
    }

    /// ᾱ_t for t in 0..1000.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for t in 0..1000.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Smallest and largest training sigma.
    pub fn sigma_range(&self) -> (f64, f64) {
        (self.sigmas[0] as f64, self.sigmas[TRAIN_STEPS - 1] as f64)
    }

    /// The (fractional) timestep of a sigma, interpolating log σ like k-diffusion's
    /// `DiscreteSchedule.sigma_to_t`; exact training sigmas map to integer timesteps.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigma = (sigma as f32).ln();
        let last = self.log_sigmas.len() - 1;
        let low = self
            .log_sigmas
            .iter()
            .rposition(|&l| log_sigma - l >= 0.0)
            .unwrap_or(0)
            .min(last - 1);
        let (lo, hi) = (self.log_sigmas[low], self.log_sigmas[low + 1]);
        let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
        ((1.0 - w) * low as f32 + w * (low + 1) as f32) as f64
    }

    /// The sigma of a (fractional) timestep, k-diffusion's `t_to_sigma`.
    pub fn t_to_sigma(&self, t: f32) -> f32 {
        let low = t.floor() as usize;
        let high = (t.ceil() as usize).min(TRAIN_STEPS - 1);
        let w = t - t.floor();
        ((1.0 - w) * self.log_sigmas[low.min(TRAIN_STEPS - 1)] + w * self.log_sigmas[high]).exp()
    }

    /// k-diffusion's `get_sigmas(n)`: n sigmas at evenly spaced timesteps 999…0, then 0.
    pub fn sigmas_normal(&self, steps: usize) -> Vec<f64> {
        let ts = linspace_f32((TRAIN_STEPS - 1) as f32, 0.0, steps);
        let mut out: Vec<f64> = ts.iter().map(|&t| self.t_to_sigma(t) as f64).collect();
        out.push(0.0);
        out
    }

    /// A1111's `sgm_uniform(n)`: the sigmas of `linspace(t(σ_max), t(σ_min), n + 1)[:-1]`
    /// (timesteps 999 down to, not including, 0), then 0.
    pub fn sigmas_sgm_uniform(&self, steps: usize) -> Vec<f64> {
        let ts = linspace_f32((TRAIN_STEPS - 1) as f32, 0.0, steps + 1);
        let mut out: Vec<f64> = ts[..steps]
            .iter()
            .map(|&t| self.t_to_sigma(t) as f64)
            .collect();
        out.push(0.0);
        out
    }

    /// k-diffusion's `get_sigmas_karras(n, σ_min, σ_max, ρ=7)` over the training range, then 0.
    pub fn sigmas_karras(&self, steps: usize) -> Vec<f64> {
        let (sigma_min, sigma_max) = self.sigma_range();
        let rho = 7f64;
        // Python computes the two roots and their difference in double; torch then applies
        // them to the float32 ramp as float32 scalars.
        let min_inv_rho = sigma_min.powf(1.0 / rho);
        let max_inv_rho = sigma_max.powf(1.0 / rho);
        let span = (min_inv_rho - max_inv_rho) as f32;
        let max_inv_rho = max_inv_rho as f32;
        let mut out: Vec<f64> = linspace_f32(0.0, 1.0, steps)
            .iter()
            .map(|&r| (max_inv_rho + r * span).powf(rho as f32) as f64)
            .collect();
        out.push(0.0);
        out
    }

    /// DDIM/PLMS timesteps ("leading" spacing, offset 1): `i·(1000 // S) + 1`, descending.
    pub fn ddim_timesteps(&self, steps: usize) -> Vec<usize> {
        let ratio = TRAIN_STEPS / steps.max(1);
        (0..steps).rev().map(|i| i * ratio + 1).collect()
    }

    /// The sigmas DDIM and PLMS visit: the training sigma of each timestep, then σ_0, the
    /// noise left at ᾱ_0 (CompVis' `set_alpha_to_one = False`).
    pub fn sigmas_ddim(&self, steps: usize) -> Vec<f64> {
        let mut out: Vec<f64> = self
            .ddim_timesteps(steps)
            .iter()
            .map(|&t| self.sigmas[t] as f64)
            .collect();
        out.push(self.sigmas[0] as f64);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddim_timesteps_use_leading_spacing_with_offset_one() {
        let s = NoiseSchedule::stable_diffusion();
        assert_eq!(
            s.ddim_timesteps(10),
            vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        // 1000 // 7 = 142; CompVis' script would add an eighth step here.
        assert_eq!(s.ddim_timesteps(7), vec![853, 711, 569, 427, 285, 143, 1]);
    }

    #[test]
    fn sigma_to_t_inverts_training_sigmas_exactly() {
        let s = NoiseSchedule::stable_diffusion();
        for t in [0usize, 1, 101, 500, 998, 999] {
            assert_eq!(s.sigma_to_t(s.sigmas()[t] as f64), t as f64, "t = {t}");
        }
    }

    #[test]
    fn sgm_uniform_stops_short_of_timestep_zero() {
        let s = NoiseSchedule::stable_diffusion();
        let (_, sigma_max) = s.sigma_range();
        assert_eq!(s.sigmas_sgm_uniform(1), vec![sigma_max as f32 as f64, 0.0]);
        // linspace(999, 0, 5)[:-1] = 999, 749.25, 499.5, 249.75.
        let four = s.sigmas_sgm_uniform(4);
        let want: Vec<f64> = [999.0, 749.25, 499.5, 249.75]
            .iter()
            .map(|&t| s.t_to_sigma(t) as f64)
            .chain([0.0])
            .collect();
        assert_eq!(four, want);
    }

    #[test]
    fn every_spelling_of_a_schedule_reads_back_as_it() {
        for schedule in SigmaSchedule::all() {
            let spellings = [schedule.name(), schedule.a1111_name(), schedule.label()];
            for spelling in spellings.iter().chain(schedule.aliases()) {
                assert_eq!(
                    spelling.parse::<SigmaSchedule>().unwrap(),
                    schedule,
                    "{spelling}"
                );
                let shouted = spelling.to_ascii_uppercase();
                assert_eq!(
                    shouted.parse::<SigmaSchedule>().unwrap(),
                    schedule,
                    "{shouted}"
                );
            }
            // The request JSON is written with serde, so its names must be these.
            let json = serde_json::to_value(schedule).unwrap();
            assert_eq!(json, schedule.name());
        }
        let err = "linear".parse::<SigmaSchedule>().unwrap_err().to_string();
        assert!(err.contains("valid: normal, karras, sgm_uniform"), "{err}");
    }

    #[test]
    fn sigma_range_is_sd_s() {
        let (lo, hi) = NoiseSchedule::stable_diffusion().sigma_range();
        assert!((lo - 0.0292).abs() < 1e-4, "{lo}");
        assert!((hi - 14.6146).abs() < 1e-3, "{hi}");
    }
}
