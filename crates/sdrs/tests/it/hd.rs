//! High resolution on the tiny model: tiled VAE against the whole-image VAE, the hires fix
//! against the txt2img + img2img it is made of, and `hd` end to end.

use crate::common;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sdrs::image_io::resize_lanczos;
use sdrs::pipeline::vae_tiling::{self, TilingMode, VaeTiling};
use sdrs::pipeline::{final_size, hd, tile_seed, HdOptions};
use sdrs::pipeline::{img2img, infotext, txt2img, GenerationRequest, StableDiffusion};
use sdrs::sampling::rng::TorchRng;
use sdrs::sampling::{Flow, NoiseSource};
use sdrs::upscale::Upscaler;

fn tiny() -> StableDiffusion {
    common::load_model("tiny-sd1")
}

fn base_request() -> GenerationRequest {
    GenerationRequest {
        prompt: "a red fox in the snow".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 4,
        cfg_scale: 6.0,
        sampler_name: "Euler a".into(),
        seed: 1234,
        ..Default::default()
    }
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.mean_all())
        .and_then(|d| d.to_dtype(DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("mean abs diff")
}

#[test]
fn tiled_vae_decode_and_encode_stay_close_to_the_whole_image() {
    let sd = tiny();
    let factor = sd.vae_config().downscale_factor();
    // A 40×24 latent (320×192 pixels) in tiles of 16 latent cells overlapping by 6: 3×2 tiles.
    // The bounds are loose because this VAE's random weights make its group norms and
    // mid-block attention (which see one tile at a time) matter far more than a trained
    // VAE's do; the README gives the full-size figures.
    let latent = TorchRng::new(7, Default::default())
        .sample(&[1, 4, 24, 40], &Device::Cpu)
        .expect("latent");
    let tiling = VaeTiling {
        mode: TilingMode::Always,
        tile: 16,
        overlap: 6,
    };
    let whole = sd.vae().unwrap().decode(&latent).expect("decode");
    let tiled =
        vae_tiling::decode(&sd.vae().unwrap(), factor, &latent, &tiling).expect("tiled decode");
    assert_eq!(tiled.dims(), whole.dims());
    let mad = mean_abs_diff(&tiled, &whole);
    let spread = mean_abs_diff(&whole, &whole.zeros_like().expect("zeros"));
    eprintln!("tiled decode: MAD {mad:.5} (mean |x| {spread:.4}, [-1, 1] scale)");
    assert!(mad > 0.0, "tiling did not happen");
    assert!(
        mad < 0.5 * spread,
        "tiled decode MAD {mad} (mean |x| {spread})"
    );

    let never = VaeTiling {
        mode: TilingMode::Never,
        ..tiling
    };
    let untouched =
        vae_tiling::decode(&sd.vae().unwrap(), factor, &latent, &never).expect("decode");
    assert_eq!(mean_abs_diff(&untouched, &whole), 0.0);

    let image = whole.clamp(-1f32, 1f32).expect("clamp");
    let enc_whole = sd.vae().unwrap().encode(&image).expect("encode");
    let enc_tiled =
        vae_tiling::encode(&sd.vae().unwrap(), factor, &image, &tiling).expect("tiled encode");
    let mad = mean_abs_diff(&enc_tiled.mean, &enc_whole.mean);
    let spread = mean_abs_diff(
        &enc_whole.mean,
        &enc_whole.mean.zeros_like().expect("zeros"),
    );
    eprintln!("tiled encode: MAD {mad:.5} (mean |latent| {spread:.4})");
    assert!(
        mad > 0.0 && mad < 0.3 * spread,
        "tiled encode MAD {mad} vs {spread}"
    );
}

#[test]
fn auto_tiling_leaves_512_pixel_images_whole() {
    let tiling = VaeTiling::default();
    assert!(!tiling.applies(64, 64));
    assert!(!tiling.applies(8, 8));
    assert!(tiling.applies(96, 96));
    assert!(tiling.applies(64, 80));
}

#[test]
fn hires_with_an_image_upscaler_is_txt2img_then_img2img() {
    let sd = tiny();
    let first = base_request();
    // 4 hires steps at strength 0.5 walk the last 4 of 8 sigmas; plain img2img does the same
    // at 8 steps and strength 0.4 (t_enc = int(0.4 · 8) = 3, sigmas[8 − 3 − 1 ..]).
    let hires = GenerationRequest {
        enable_hr: true,
        hr_scale: 2.0,
        hr_upscaler: "Lanczos".into(),
        hr_second_pass_steps: 4,
        denoising_strength: 0.5,
        ..first.clone()
    };
    let got = txt2img(&sd, &hires.validate().unwrap(), &mut |_| Flow::Continue)
        .expect("hires")
        .images;
    assert_eq!(got[0].image.dimensions(), (128, 128));

    let base = txt2img(&sd, &first.validate().unwrap(), &mut |_| Flow::Continue)
        .expect("first pass")
        .images;
    let enlarged = resize_lanczos(&base[0].image, 128, 128);
    let second = GenerationRequest {
        width: 128,
        height: 128,
        steps: 8,
        denoising_strength: 0.4,
        ..first.clone()
    };
    let want = img2img(&sd, &second.validate().unwrap(), &enlarged, &mut |_| {
        Flow::Continue
    })
    .expect("img2img")
    .images;
    common::assert_images_close(
        "hires = txt2img + img2img",
        &got[0].image,
        &want[0].image,
        0,
    );

    let info = infotext::parse(&got[0].infotext);
    assert_eq!(info.get("Hires upscale"), Some("2"));
    assert_eq!(info.get("Hires steps"), Some("4"));
    assert_eq!(info.get("Hires upscaler"), Some("Lanczos"));
    assert_eq!(info.get("Denoising strength"), Some("0.5"));
    assert_eq!(info.get("Size"), Some("64x64"));
    let back = info.to_request();
    assert!(back.enable_hr);
    assert_eq!(
        (
            back.hr_scale,
            back.hr_second_pass_steps,
            back.hr_upscaler.as_str()
        ),
        (2.0, 4, "Lanczos")
    );
}

#[test]
fn latent_hires_doubles_the_size_reproducibly_and_reports_every_step() {
    let sd = tiny();
    let req = GenerationRequest {
        enable_hr: true,
        hr_scale: 1.5,
        hr_second_pass_steps: 3,
        denoising_strength: 0.6,
        width: 64,
        height: 48,
        ..base_request()
    };
    let mut steps = Vec::new();
    let a = txt2img(&sd, &req.validate().unwrap(), &mut |e| {
        if let sdrs::pipeline::Event::Step { step, steps: n, .. } = e {
            steps.push((step, n));
        }
        Flow::Continue
    })
    .expect("latent hires")
    .images;
    assert_eq!(a[0].image.dimensions(), (96, 72));
    assert_eq!(steps, (1..=7).map(|s| (s, 7)).collect::<Vec<_>>());
    let b = txt2img(&sd, &req.validate().unwrap(), &mut |_| Flow::Continue)
        .expect("again")
        .images;
    common::assert_images_close("same seed", &a[0].image, &b[0].image, 0);
    let plain = txt2img(
        &sd,
        &(GenerationRequest {
            enable_hr: false,
            ..req.clone()
        })
        .validate()
        .unwrap(),
        &mut |_| Flow::Continue,
    )
    .expect("plain")
    .images;
    assert_eq!(plain[0].image.dimensions(), (64, 48));
}

#[test]
fn hires_refuses_bad_settings() {
    let sd = tiny();
    let too_big = GenerationRequest {
        enable_hr: true,
        hr_scale: 200.0,
        ..base_request()
    };
    // Refused when the request is validated, before anything runs.
    let err = too_big.validate().unwrap_err();
    assert!(err.to_string().contains("12800x12800"), "{err}");
    let unknown = GenerationRequest {
        enable_hr: true,
        hr_upscaler: "R-ESRGAN 9x".into(),
        ..base_request()
    };
    let err = txt2img(&sd, &unknown.validate().unwrap(), &mut |_| Flow::Continue).unwrap_err();
    assert!(err.to_string().contains("unknown hires upscaler"), "{err}");
}

fn run_hd(sd: &StableDiffusion, req: &GenerationRequest, start: Option<&RgbImage>) -> RgbImage {
    let opts = HdOptions {
        passes: 1,
        overlap: 16,
        detail_steps: Some(6),
        ..Default::default()
    };
    let gen = req.validate().expect("valid request");
    hd(sd, &gen, start, &Upscaler::Lanczos, &opts, &mut |_| {
        Flow::Continue
    })
    .expect("hd")
    .expect("not stopped")
    .image
}

#[test]
fn hd_doubles_square_and_non_square_images_reproducibly() {
    let sd = tiny();
    let square = run_hd(&sd, &base_request(), None);
    assert_eq!(square.dimensions(), (128, 128));
    let again = run_hd(&sd, &base_request(), None);
    common::assert_images_close("hd same seed", &square, &again, 0);

    let wide = GenerationRequest {
        width: 64,
        height: 40,
        ..base_request()
    };
    assert_eq!(run_hd(&sd, &wide, None).dimensions(), (128, 80));

    // From a picture (rounded down to 8): 70×50 → 64×48 → 128×96, redrawn in 64×40 tiles.
    let start = RgbImage::from_fn(70, 50, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, 90])
    });
    let out = run_hd(&sd, &wide, Some(&start));
    assert_eq!(out.dimensions(), (128, 96));
    // The redraw changes the picture, but at strength 0.3 it stays near the enlarged start.
    let enlarged = resize_lanczos(&resize_lanczos(&start, 64, 48), 128, 96);
    let mad: f64 = out
        .as_raw()
        .iter()
        .zip(enlarged.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / out.as_raw().len() as f64;
    assert!(mad > 0.5 && mad < 60.0, "mean |hd − enlarged| = {mad}");
}

#[test]
fn hd_refuses_sizes_and_overlaps_it_cannot_do() {
    let err = final_size(512, 512, 5).unwrap_err().to_string();
    assert!(err.contains("16384x16384"), "{err}");
    assert_eq!(final_size(512, 384, 2).expect("fits"), (2048, 1536));
    let sd = tiny();
    let opts = HdOptions {
        overlap: 64,
        ..Default::default()
    };
    let err = hd(
        &sd,
        &base_request().validate().unwrap(),
        None,
        &Upscaler::Lanczos,
        &opts,
        &mut |_| Flow::Continue,
    )
    .expect_err("overlap = tile must fail")
    .to_string();
    assert!(err.contains("overlap"), "{err}");
    assert_eq!(tile_seed(1000, 0, 0), 1001);
    assert_eq!(tile_seed(1000, 1, 3), 11004);
}

/// The VAE of the checkpoint named by `SDRS_FULL_MODEL`.
fn full_size_vae() -> sdrs::models::vae::AutoencoderKL {
    let Some(path) = std::env::var_os("SDRS_FULL_MODEL") else {
        panic!("set SDRS_FULL_MODEL to a full-size checkpoint");
    };
    let ckpt = sdrs::weights::Checkpoint::open(std::path::Path::new(&path)).expect("open");
    let vae_config = ckpt.vae_config().clone();
    sdrs::models::vae::AutoencoderKL::new(
        ckpt.vae(DType::F32, &Device::Cpu).expect("vae weights"),
        &vae_config,
    )
    .expect("vae")
}

/// The full-size figure for the README: a 1024² decode (128² latent) with the default tiling
/// against the whole-image decode, on the checkpoint named by `SDRS_FULL_MODEL` (the random
/// full-size SD 1.5 of `tools/make_fixtures.py --full-size`). Needs ~14 GB for the whole decode.
#[test]
#[ignore = "needs SDRS_FULL_MODEL, a full-size checkpoint, and minutes"]
fn full_size_tiled_decode_of_1024_pixels_stays_close() {
    let vae = full_size_vae();
    let latent = TorchRng::new(11, Default::default())
        .sample(&[1, 4, 128, 128], &Device::Cpu)
        .expect("latent");
    let tiled = vae_tiling::decode(&vae, 8, &latent, &VaeTiling::default()).expect("tiled");
    let whole = vae.decode(&latent).expect("whole");
    let mad = mean_abs_diff(&tiled, &whole);
    let spread = mean_abs_diff(&whole, &whole.zeros_like().expect("zeros"));
    eprintln!("1024² tiled decode: MAD {mad:.5} on [-1, 1] (mean |x| {spread:.4})");
    assert!(mad < 0.5 * spread, "MAD {mad} vs mean |x| {spread}");
}

/// The peak memory of a 2048² tiled decode (256² latent) with the full-size VAE named by
/// `SDRS_FULL_MODEL`: prints the process's peak RSS (VmHWM) after decoding.
#[test]
#[ignore = "needs SDRS_FULL_MODEL, a full-size checkpoint, and about 20 minutes"]
fn full_size_tiled_decode_of_2048_pixels_reports_its_peak_memory() {
    let vae = full_size_vae();
    let latent = TorchRng::new(12, Default::default())
        .sample(&[1, 4, 256, 256], &Device::Cpu)
        .expect("latent");
    let image = vae_tiling::decode(&vae, 8, &latent, &VaeTiling::default()).expect("tiled");
    assert_eq!(image.dims(), &[1, 3, 2048, 2048]);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?");
    eprintln!("2048² tiled decode: {peak}");
}
