//! Shared helpers for the integration tests: fixture paths, reference tensors, comparisons
//! that say where they failed.

pub mod fake_hub;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A reference file's tensors, by name.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// A reference JSON file.
pub fn reference_json(name: &str) -> serde_json::Value {
    let path = fixtures().join("reference").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts `max |got − want| ≤ tol · max |want|`, naming the worst position on failure.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel_tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_slices_close(what, &g, &w, want.dims(), rel_tol);
}

/// Slice version of [`assert_close`]; `dims` only names positions in the message.
pub fn assert_slices_close(what: &str, got: &[f32], want: &[f32], dims: &[usize], rel_tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-12);
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (*a as f64 - *b as f64).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
            if d.is_nan() {
                break;
            }
        }
    }
    let rel = worst / scale;
    eprintln!(
        "{what}: max error {worst:.2e} ({rel:.2e} of output scale {scale:.3e}) at index {at}"
    );
    assert!(
        rel <= rel_tol,
        "{what}: max error {worst:.3e} ({rel:.3e} of output scale {scale:.3e}, tolerance {rel_tol:.0e}) at index {at} {:?}: got {}, want {}",
        unravel(at, dims),
        got[at],
        want[at]
    );
}

/// The A1111 sampler name for a reference's sampler key.
pub fn sampler_name(key: &str) -> &'static str {
    match key {
        "ddim" => "DDIM",
        "plms" => "PLMS",
        "euler" => "Euler",
        "euler_a" => "Euler a",
        "heun" => "Heun",
        "dpmpp_2m" => "DPM++ 2M",
        other => panic!("fixture names an unknown sampler {other}"),
    }
}

/// Whole-image parity: no channel off by more than 2/255, at most 0.1% off by more than 1/255.
pub fn assert_images_close(
    name: &str,
    got: &image::RgbImage,
    want: &image::RgbImage,
    tolerance: u8,
) {
    assert_eq!(got.dimensions(), want.dimensions(), "{name}: size");
    let (mut over_one, mut worst, mut at) = (0usize, 0u8, 0usize);
    for (i, (a, b)) in got.as_raw().iter().zip(want.as_raw()).enumerate() {
        let d = a.abs_diff(*b);
        over_one += usize::from(d > 1);
        if d > worst {
            (worst, at) = (d, i);
        }
    }
    let total = got.as_raw().len();
    eprintln!(
        "{name}: max difference {worst}/255, {over_one} of {total} values off by more than 1"
    );
    let (x, y) = ((at / 3) as u32 % got.width(), (at / 3) as u32 / got.width());
    assert!(
        worst <= tolerance && (tolerance == 0 || over_one * 1000 <= total),
        "{name}: max difference {worst}/255 at pixel ({x}, {y}) channel {}, {over_one} of {total} values off by more than 1",
        at % 3
    );
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; dims.len()];
    for (k, d) in dims.iter().enumerate().rev() {
        if *d > 0 {
            pos[k] = i % d;
            i /= d;
        }
    }
    pos
}

/// Loads a tiny fixture model (a folder or a single file under `tests/fixtures`).
pub fn load_model(path: &str) -> sdrs::pipeline::StableDiffusion {
    load_model_with(path, sdrs::pipeline::LoadOptions::default())
}

/// Loads a tiny fixture model with `options`.
pub fn load_model_with(
    path: &str,
    options: sdrs::pipeline::LoadOptions,
) -> sdrs::pipeline::StableDiffusion {
    let ckpt = sdrs::weights::Checkpoint::open(&fixtures().join(path)).expect("open tiny model");
    sdrs::pipeline::StableDiffusion::load_with(&ckpt, &Device::Cpu, options)
        .expect("load tiny model")
}

/// A reference image under `tests/fixtures/reference`.
pub fn reference_image(file: &str) -> image::RgbImage {
    let path = fixtures().join("reference").join(file);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// The request a reference manifest's case describes (`eta` and `strength` when present).
pub fn request(case: &serde_json::Value) -> sdrs::pipeline::GenerationRequest {
    let s = |k: &str| case[k].as_str().unwrap_or_else(|| panic!("{k} in {case}"));
    let n = |k: &str| case[k].as_f64().unwrap_or_else(|| panic!("{k} in {case}"));
    let defaults = sdrs::pipeline::GenerationRequest::default();
    sdrs::pipeline::GenerationRequest {
        prompt: s("prompt").into(),
        negative_prompt: s("negative_prompt").into(),
        width: n("width") as usize,
        height: n("height") as usize,
        steps: n("steps") as usize,
        cfg_scale: n("cfg_scale"),
        sampler_name: sampler_name(s("sampler")).into(),
        scheduler: s("schedule").parse().expect("schedule"),
        seed: n("seed") as i64,
        eta: case["eta"].as_f64(),
        denoising_strength: case["strength"]
            .as_f64()
            .unwrap_or(defaults.denoising_strength),
        ..defaults
    }
}
