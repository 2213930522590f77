//! Sigma and timestep tables against diffusers and k-diffusion (fixtures/reference/schedules.json).

use crate::common;

use sdrs::sampling::{NoiseSchedule, Sampler, SigmaSchedule};

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Distance in float32 units in the last place.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// The tables are float32 in torch. torch takes square roots, logs and exps of whole tensors
/// with MKL's vector math, which is not correctly rounded, so derived tables may differ from
/// ours by a unit in the last place; `max_ulps` says how many are allowed.
fn assert_table(what: &str, got: &[f64], want: &[f64], max_ulps: u32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = ulps(*g as f32, *w as f32);
        assert!(
            d <= max_ulps,
            "{what}[{i}]: got {g}, want {w} ({d} ulps apart, {max_ulps} allowed)"
        );
    }
}

#[test]
fn training_schedule_matches_diffusers_and_k_diffusion() {
    let reference = common::reference_json("schedules.json");
    let schedule = NoiseSchedule::stable_diffusion();
    let ac: Vec<f64> = schedule
        .alphas_cumprod()
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert_table(
        "alphas_cumprod",
        &ac,
        &floats(&reference["alphas_cumprod"]),
        0,
    );
    let sigmas: Vec<f64> = schedule.sigmas().iter().map(|&v| v as f64).collect();
    assert_table(
        "sigmas_table",
        &sigmas,
        &floats(&reference["sigmas_table"]),
        1,
    );
}

#[test]
fn every_sampler_visits_the_reference_timesteps_and_sigmas() {
    let reference = common::reference_json("schedules.json");
    let schedule = NoiseSchedule::stable_diffusion();
    let per_steps = reference["steps"]
        .as_object()
        .expect("schedules.json: steps");
    assert!(!per_steps.is_empty());
    for (steps, tables) in per_steps {
        let n: usize = steps.parse().expect("step count");
        let ddim: Vec<f64> = schedule
            .ddim_timesteps(n)
            .iter()
            .map(|&t| t as f64)
            .collect();
        assert_eq!(
            ddim,
            floats(&tables["ddim_timesteps"]),
            "DDIM timesteps, {n} steps"
        );
        // PNDM visits its first timestep's successor twice (the warm-up step), then the rest.
        let mut pndm = ddim.clone();
        if n > 1 {
            pndm.insert(1, ddim[1]);
        }
        assert_eq!(
            pndm,
            floats(&tables["pndm_timesteps"]),
            "PLMS timesteps, {n} steps"
        );
        for sampler in [
            Sampler::Euler,
            Sampler::EulerAncestral,
            Sampler::Heun,
            Sampler::DpmPp2m,
        ] {
            let normal = sampler.sigmas(&schedule, n, SigmaSchedule::Normal);
            assert_table(
                &format!("{} sigmas, {n} steps", sampler.name()),
                &normal,
                &floats(&tables["sigmas"]),
                2,
            );
            let karras = sampler.sigmas(&schedule, n, SigmaSchedule::Karras);
            assert_table(
                &format!("{} Karras sigmas, {n} steps", sampler.name()),
                &karras,
                &floats(&tables["sigmas_karras"]),
                2,
            );
        }
        for sampler in [Sampler::Ddim, Sampler::Plms] {
            let got = sampler.sigmas(&schedule, n, SigmaSchedule::Normal);
            let table = schedule.sigmas();
            let want: Vec<f64> = ddim
                .iter()
                .map(|&t| table[t as usize] as f64)
                .chain([table[0] as f64])
                .collect();
            assert_table(
                &format!("{} sigmas, {n} steps", sampler.name()),
                &got,
                &want,
                0,
            );
        }
    }
}
