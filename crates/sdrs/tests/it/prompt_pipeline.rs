//! The prompt language through the whole txt2img pipeline against the Python reference
//! (fixtures/reference/prompt_pipeline.json, tools/make_prompt_pipeline_fixtures.py): prompt
//! editing, alternation, AND, optimizedSD blends, BREAK with a long prompt and a scheduled
//! negative, on the tiny model.
//!
//! The tiny model fixes most of its image in the first sampling step, so a prompt switch after
//! step 2 moves few pixels by a whole level; the final latents, compared tightly, see it (one
//! step off moves them by 1e-4–7e-3 of their scale).

use crate::common;

use candle_core::{Device, Tensor};
use sdrs::pipeline::{txt2img, CfgDenoiser, GenerationRequest, StableDiffusion};
use sdrs::prompt::plan;
use sdrs::sampling::rng::TorchRng;
use sdrs::sampling::{Flow, NoiseSource, Sampled, SamplerContext};

/// Relative tolerance on the final latents (Rust and torch agree to ~1e-6 of their scale).
const LATENT_TOL: f64 = 3e-5;

fn cases() -> Vec<serde_json::Value> {
    let manifest = common::reference_json("prompt_pipeline.json");
    let cases = manifest["cases"]
        .as_array()
        .expect("prompt_pipeline.json: cases");
    assert!(cases.len() >= 7, "only {} reference cases", cases.len());
    cases.clone()
}

fn name(case: &serde_json::Value) -> &str {
    case["name"].as_str().unwrap_or("case")
}

/// `[[until_step, [[text, weight], …]], …]` as the reference wrote a schedule.
fn reference_schedule(value: &serde_json::Value) -> Vec<(usize, Vec<(String, f32)>)> {
    let entries = value.as_array().expect("schedule");
    entries
        .iter()
        .map(|e| {
            let blend = e[1].as_array().expect("blend");
            let blend = blend
                .iter()
                .map(|b| {
                    let text = b[0].as_str().expect("text").trim().to_string();
                    (text, b[1].as_f64().expect("weight") as f32)
                })
                .collect();
            (e[0].as_u64().expect("until_step") as usize, blend)
        })
        .collect()
}

/// The plan's schedule in the reference's form (texts trimmed: the reference keeps the spaces
/// around AND and sub-prompts, which do not reach the tokens).
fn planned_schedule(plan: &sdrs::prompt::PlanPart) -> Vec<(usize, Vec<(String, f32)>)> {
    plan.edits
        .iter()
        .map(|s| {
            let blend = s.blend.iter().map(|(t, w)| (t.trim().to_string(), *w));
            (s.until_step, blend.collect())
        })
        .collect()
}

#[test]
fn plans_match_the_reference_schedules() {
    for case in cases() {
        let req = common::request(&case);
        let planned = plan(&req.prompt, req.prompt_syntax, req.steps).expect("plan");
        let parts = case["parts"].as_array().expect("parts");
        assert_eq!(
            planned.parts.len(),
            parts.len(),
            "{}: AND parts",
            name(&case)
        );
        for (got, want) in planned.parts.iter().zip(parts) {
            let weight = want["weight"].as_f64().expect("weight") as f32;
            assert_eq!(got.weight, weight, "{}: part weight", name(&case));
            let want = reference_schedule(&want["schedule"]);
            assert_eq!(planned_schedule(got), want, "{}: schedule", name(&case));
        }
        let negative = plan(&req.negative_prompt, req.prompt_syntax, req.steps).expect("plan");
        let want = reference_schedule(&case["negative_schedule"]);
        assert_eq!(negative.parts.len(), 1);
        assert_eq!(
            planned_schedule(&negative.parts[0]),
            want,
            "{}: negative schedule",
            name(&case)
        );
    }
}

#[test]
fn prompt_language_images_match_the_python_reference() {
    let sd = common::load_model("tiny-sd1");
    for case in cases() {
        let path = common::fixtures()
            .join("reference")
            .join(case["file"].as_str().expect("file"));
        let want = image::open(path).expect("reference image").to_rgb8();
        let images = txt2img(
            &sd,
            &common::request(&case).validate().unwrap(),
            &mut |_| Flow::Continue,
        )
        .map(|outcome| outcome.images)
        .unwrap_or_else(|e| panic!("{}: {e}", name(&case)));
        assert_eq!(images.len(), 1);
        common::assert_images_close(name(&case), &images[0].image, &want, 2);
    }
}

/// The request's final latent (before the VAE), run from the pipeline's public pieces the way
/// `txt2img` runs them: the sampler passes each step's index to the denoiser.
fn final_latent(sd: &StableDiffusion, req: &GenerationRequest) -> Tensor {
    let gen = req.validate().expect("valid request");
    let sigmas = gen
        .sampler()
        .sigmas(sd.schedule(), req.steps, gen.schedule());
    let conditioning = sd
        .conditioning(
            &req.prompt,
            &req.negative_prompt,
            req.prompt_syntax,
            req.steps,
            req.clip_skip,
            sdrs::pipeline::SizeIds::of(req.width, req.height),
        )
        .expect("conditioning");
    let mut denoiser = CfgDenoiser::new(sd, &conditioning, req.cfg_scale);
    let mut noise = TorchRng::new(gen.seed(), req.rng_math);
    let shape = [1, 4, req.height / 8, req.width / 8];
    let scale = gen.sampler().initial_noise_scale(sigmas[0]);
    let x = (noise.sample(&shape, &Device::Cpu).expect("noise") * scale).expect("scale");
    let mut on_step = |_: &sdrs::sampling::Step| Flow::Continue;
    let mut ctx = SamplerContext {
        denoiser: &mut denoiser,
        noise: &mut noise,
        on_step: &mut on_step,
    };
    let Sampled::Done(x) = gen
        .sampler()
        .run(&mut ctx, x, &sigmas, &gen.options())
        .expect("sampling")
    else {
        panic!("sampling stopped");
    };
    // DDIM ends at σ_0 > 0, where the latent is x·sqrt(ᾱ_0).
    let last = sigmas.last().copied().unwrap_or(0.0);
    (x / (1.0 + last * last).sqrt()).expect("unscale")
}

#[test]
fn prompt_language_latents_match_the_python_reference() {
    let sd = common::load_model("tiny-sd1");
    let latents = common::reference("prompt_pipeline_latents.safetensors");
    for case in cases() {
        let want = &latents[name(&case)];
        let got = final_latent(&sd, &common::request(&case));
        common::assert_close(name(&case), &got, want, LATENT_TOL);
    }
}
