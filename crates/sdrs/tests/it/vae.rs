//! The VAE against diffusers' `AutoencoderKL` on the tiny fixture.

use crate::common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs::models::vae::{AutoencoderKL, VaeConfig};
use sdrs::weights::Checkpoint;

fn load_vae() -> AutoencoderKL {
    let dir = common::fixtures().join("tiny-sd1/vae");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg: VaeConfig = serde_json::from_str(&config).expect("VAE config");
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .expect("weights");
    AutoencoderKL::new(vb, &cfg).expect("model")
}

#[test]
fn decode_matches_diffusers_for_square_latent() {
    let (vae, reference) = (load_vae(), common::reference("vae.safetensors"));
    let start = Instant::now();
    let decoded = vae.decode(&reference["latent"]).expect("decode");
    println!("decode 8x8 latent in {:?}", start.elapsed());
    common::assert_close("decoded", &decoded, &reference["decoded"], 1e-4);
}

#[test]
fn decode_matches_diffusers_for_non_square_latent() {
    let (vae, reference) = (load_vae(), common::reference("vae.safetensors"));
    let decoded = vae.decode(&reference["latent_ns"]).expect("decode");
    common::assert_close("decoded_ns", &decoded, &reference["decoded_ns"], 1e-4);
}

#[test]
fn encode_matches_diffusers_mean_and_std() {
    let (vae, reference) = (load_vae(), common::reference("vae.safetensors"));
    let start = Instant::now();
    let dist = vae.encode(&reference["image"]).expect("encode");
    println!("encode 64x64 image in {:?}", start.elapsed());
    common::assert_close("encoded_mean", &dist.mean, &reference["encoded_mean"], 1e-4);
    common::assert_close("encoded_std", &dist.std, &reference["encoded_std"], 1e-4);
}

#[test]
fn encode_then_decode_keeps_every_multiple_of_8_size() {
    let vae = load_vae();
    for (height, width) in [(8, 8), (24, 40), (56, 16)] {
        let image = Tensor::zeros((2, 3, height, width), DType::F32, &Device::Cpu).unwrap();
        let dist = vae.encode(&image).expect("encode");
        assert_eq!(dist.mean.dims(), &[2, 4, height / 8, width / 8]);
        assert_eq!(dist.std.dims(), dist.mean.dims());
        let decoded = vae.decode(&dist.mean).expect("decode");
        assert_eq!(decoded.dims(), &[2, 3, height, width]);
    }
}

#[test]
fn encode_rejects_size_not_multiple_of_8() {
    let vae = load_vae();
    let image = Tensor::zeros((1, 3, 64, 60), DType::F32, &Device::Cpu).unwrap();
    let err = vae.encode(&image).expect_err("60 is not a multiple of 8");
    assert!(err.to_string().contains("64"), "{err}");
}

/// Full-size SD VAE with zero weights: checks shapes and prints the decode time at 512²
/// (run with `cargo test -p sdrs --test it vae:: -- --ignored --nocapture`).
#[test]
#[ignore = "full-size VAE decode, about a minute on 2 cores"]
fn full_size_decode_of_64x64_latent_gives_512x512_image() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let vae = AutoencoderKL::new(vb, &VaeConfig::sd()).expect("model");
    let latent = Tensor::zeros((1, 4, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let start = Instant::now();
    let decoded = vae.decode(&latent).expect("decode");
    println!("full-size decode 512x512 in {:?}", start.elapsed());
    assert_eq!(decoded.dims(), &[1, 3, 512, 512]);
}

#[test]
fn separate_vae_file_decodes_like_diffusers() {
    let mut ckpt = Checkpoint::open(&common::fixtures().join("tiny-sd1")).expect("checkpoint");
    ckpt.set_vae_file(&common::fixtures().join("tiny-vae.safetensors"))
        .expect("VAE file");
    let vae = AutoencoderKL::new(
        ckpt.vae(DType::F32, &Device::Cpu).unwrap(),
        ckpt.vae_config(),
    )
    .unwrap();
    let latent = &common::reference("vae.safetensors")["latent"];
    let decoded = vae.decode(latent).unwrap();
    common::assert_close(
        "alt VAE decode",
        &decoded,
        &common::reference("vae_alt.safetensors")["decoded"],
        1e-4,
    );
}

/// SDXL's VAE layout (tools/make_sdxl_fixtures.py): the raw decoder output against diffusers,
/// and its own scaling factor, 0.13025, read from the config.
#[test]
fn sdxl_vae_decodes_as_diffusers_and_keeps_its_scaling_factor() {
    let dir = common::fixtures().join("tiny-sdxl/vae");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg: VaeConfig = serde_json::from_str(&config).expect("VAE config");
    assert_eq!(cfg.scaling_factor, 0.13025);
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .expect("weights");
    let vae = AutoencoderKL::new(vb, &cfg).expect("model");
    let reference = common::reference("sdxl.safetensors");
    let decoded = vae.decode(&reference["vae_latent"]).expect("decode");
    common::assert_close("SDXL decoded", &decoded, &reference["vae_decoded"], 1e-4);
}
