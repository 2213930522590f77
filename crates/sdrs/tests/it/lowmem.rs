//! One network resident at a time (`--lowmem`): the others are freed when one is asked for, and
//! the images stay those of the Python reference with the UNet's and VAE's weights kept in f16
//! and widened per layer (the tiny model's files are f16, as most real checkpoints are, so no
//! weight is rounded; the bound is the foundation's).

use crate::common;

use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;
use sdrs::image_io::load_image;
use sdrs::pipeline::{img2img, txt2img, LoadOptions, NetworkOptions, Residency, StableDiffusion};
use sdrs::sampling::Flow;
use sdrs::weights::Checkpoint;

fn load(residency: Residency) -> StableDiffusion {
    let ckpt = Checkpoint::open(&common::fixtures().join("tiny-sd1")).expect("open tiny model");
    StableDiffusion::load_with(
        &ckpt,
        &Device::Cpu,
        LoadOptions {
            networks: NetworkOptions {
                residency,
                fast: false,
            },
            ..LoadOptions::default()
        },
    )
    .expect("load tiny model")
}

#[test]
fn asking_for_one_network_frees_the_others() {
    let sd = load(Residency::OneAtATime);
    let encoder = Arc::downgrade(&sd.text_encoder().unwrap());
    let unet = sd.unet().unwrap();
    assert!(
        encoder.upgrade().is_none(),
        "the text encoder outlived the UNet's turn"
    );
    // Asked again while resident: the same network, not a rebuild.
    assert!(Arc::ptr_eq(&unet, &sd.unet().unwrap()));
    let weak = Arc::downgrade(&unet);
    drop(unet);
    let vae = sd.vae().unwrap();
    assert!(weak.upgrade().is_none(), "the UNet outlived the VAE's turn");
    drop(vae);
    assert!(sd.unet().is_ok());

    let all = load(Residency::All);
    let unet = Arc::downgrade(&all.unet().unwrap());
    let _ = all.vae().unwrap();
    let _ = all.text_encoder().unwrap();
    assert!(unet.upgrade().is_some());
}

/// The foundation's bound (measured: at most 1/255 on every case).
const F16_TOLERANCE: u8 = 2;

#[test]
fn txt2img_and_img2img_match_the_python_reference_one_network_at_a_time() {
    let sd = load(Residency::OneAtATime);
    let manifest = common::reference_json("txt2img.json");
    let mut ran = 0;
    for case in manifest["cases"].as_array().unwrap().iter().step_by(3) {
        let file = case["file"].as_str().unwrap();
        let images = txt2img(&sd, &common::request(case).validate().unwrap(), &mut |_| {
            Flow::Continue
        })
        .expect(file)
        .images;
        let want: RgbImage = common::reference_image(file);
        common::assert_images_close(file, &images[0].image, &want, F16_TOLERANCE);
        ran += 1;
    }
    assert!(ran >= 6);

    // img2img turns to the VAE (encode), the UNet, and the VAE again (decode) for each image.
    let manifest = common::reference_json("img2img.json");
    let init = load_image(
        &common::fixtures()
            .join("reference")
            .join(manifest["init"].as_str().unwrap()),
    )
    .unwrap();
    for case in manifest["cases"].as_array().unwrap().iter().step_by(6) {
        let file = case["file"].as_str().unwrap();
        let images = img2img(
            &sd,
            &common::request(case).validate().unwrap(),
            &init,
            &mut |_| Flow::Continue,
        )
        .expect(file)
        .images;
        common::assert_images_close(
            file,
            &images[0].image,
            &common::reference_image(file),
            F16_TOLERANCE,
        );
    }
}
