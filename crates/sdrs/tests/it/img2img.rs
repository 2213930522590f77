//! img2img on the tiny model against diffusers (DDIM) and k-diffusion with A1111's img2img
//! start (fixtures/reference/img2img.json, made by tools/make_img2img_fixtures.py): within
//! 1/255 per channel, 2/255 on at most 0.1%. The init-image preparation (alpha flattening,
//! the three resize modes) is compared with Pillow/A1111 exactly.

use crate::common;

use candle_core::Device;
use sdrs::image_io::{flatten_alpha, load_image, resize_for_mode, ResizeMode};
use sdrs::pipeline::{img2img, GenerationRequest, StableDiffusion};
use sdrs::sampling::Flow;
use sdrs::weights::Checkpoint;

#[test]
fn ddim_and_k_samplers_match_the_python_reference_at_both_strengths() {
    let ckpt = Checkpoint::open(&common::fixtures().join("tiny-sd1")).expect("open tiny model");
    let sd = StableDiffusion::load(&ckpt, &Device::Cpu).expect("load tiny model");
    let manifest = common::reference_json("img2img.json");
    let init = load_image(
        &common::fixtures()
            .join("reference")
            .join(manifest["init"].as_str().expect("init")),
    )
    .expect("init image");
    let cases = manifest["cases"].as_array().expect("img2img.json: cases");
    let mut samplers = std::collections::BTreeSet::new();
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let images = img2img(
            &sd,
            &common::request(case).validate().unwrap(),
            &init,
            &mut |_| Flow::Continue,
        )
        .expect(file)
        .images;
        assert_eq!(images.len(), 1);
        common::assert_images_close(file, &images[0].image, &common::reference_image(file), 2);
        let info = sdrs::pipeline::infotext::parse(&images[0].infotext);
        assert_eq!(
            info.to_request().denoising_strength,
            case["strength"].as_f64().unwrap(),
            "{file}: infotext"
        );
        samplers.insert(case["name"].as_str().unwrap_or_default().to_string());
    }
    assert!(cases.len() >= 18, "only {} reference cases", cases.len());
    assert!(
        samplers.contains("strength0") && samplers.len() >= 4,
        "{samplers:?}"
    );
}

#[test]
fn strength_zero_is_the_decoded_init_latent_for_every_sampler() {
    let ckpt = Checkpoint::open(&common::fixtures().join("tiny-sd1.safetensors")).expect("open");
    let sd = StableDiffusion::load(&ckpt, &Device::Cpu).expect("load");
    let init = load_image(&common::fixtures().join("reference/img2img/init.png")).expect("init");
    let want = common::reference_image("img2img/strength0_s0.0_seed42.png");
    for sampler in ["DDIM", "PLMS", "Euler a", "Heun"] {
        let req = GenerationRequest {
            width: 64,
            height: 64,
            steps: 8,
            sampler_name: sampler.into(),
            seed: 42,
            denoising_strength: 0.0,
            ..Default::default()
        };
        let mut steps = 0;
        let images = img2img(&sd, &req.validate().unwrap(), &init, &mut |e| {
            if matches!(e, sdrs::pipeline::Event::Step { .. }) {
                steps += 1;
            }
            Flow::Continue
        })
        .expect(sampler)
        .images;
        assert_eq!(steps, 0, "{sampler}: no sampling step at strength 0");
        common::assert_images_close(sampler, &images[0].image, &want, 2);
    }
}

#[test]
fn alpha_flattening_matches_pillow_alpha_composite_on_white() {
    let manifest = common::reference_json("img2img.json");
    let resize = &manifest["resize"];
    let path = common::fixtures()
        .join("reference")
        .join(resize["source"].as_str().expect("source"));
    let rgba = image::open(&path).expect("source").to_rgba8();
    let want = common::reference_image(resize["flattened"].as_str().expect("flattened"));
    common::assert_images_close("flatten", &flatten_alpha(&rgba), &want, 0);
    // Loading a file with alpha flattens it the same way.
    common::assert_images_close("load_image", &load_image(&path).expect("load"), &want, 0);
}

#[test]
fn resize_modes_match_a1111_resize_image_exactly() {
    let manifest = common::reference_json("img2img.json");
    let resize = &manifest["resize"];
    let flat = common::reference_image(resize["flattened"].as_str().expect("flattened"));
    let cases = resize["cases"].as_array().expect("resize cases");
    for case in cases {
        let mode: ResizeMode = case["mode"].as_str().unwrap().parse().expect("mode");
        let (w, h) = (
            case["width"].as_u64().unwrap(),
            case["height"].as_u64().unwrap(),
        );
        let file = case["file"].as_str().unwrap();
        let got = resize_for_mode(&flat, mode, w as u32, h as u32);
        common::assert_images_close(file, &got, &common::reference_image(file), 0);
    }
    assert_eq!(cases.len(), 9);
}
