//! Models built with f16-resident weights (`ModelOptions::half_weights`) against diffusers on
//! the tiny model. The fixture stores f16 weights, so widening per call must give the same
//! numbers as widening at load: same tolerance as the f32 parity tests.

use crate::common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sdrs::models::unet::{UNet2DConditionModel, UNetConfig};
use sdrs::models::vae::{AutoencoderKL, VaeConfig};
use sdrs::models::ModelOptions;

const HALF: ModelOptions = ModelOptions {
    half_weights: true,
    fast: false,
};

/// The weights and parsed config of one model folder of the tiny fixture.
fn part<C: serde::de::DeserializeOwned>(name: &str) -> (VarBuilder<'static>, C) {
    let dir = common::fixtures().join("tiny-sd1").join(name);
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg = serde_json::from_str(&text).expect("config");
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .expect("weights");
    (vb, cfg)
}

#[test]
fn unet_with_half_weights_matches_diffusers() {
    let (vb, cfg): (_, UNetConfig) = part("unet");
    let unet = UNet2DConditionModel::new_with(vb, &cfg, HALF).expect("model");
    let r = common::reference("unet.safetensors");
    let got = unet
        .forward(&r["sample"], 500.5, &r["encoder_hidden_states"])
        .expect("forward");
    assert_eq!(got.dtype(), DType::F32);
    common::assert_close("UNet, f16 weights", &got, &r["out_500_5"], 1e-4);
}

#[test]
fn vae_with_half_weights_matches_diffusers() {
    let (vb, cfg): (_, VaeConfig) = part("vae");
    let vae = AutoencoderKL::new_with(vb, &cfg, HALF).expect("model");
    let r = common::reference("vae.safetensors");
    let decoded = vae.decode(&r["latent"]).expect("decode");
    common::assert_close("VAE decode, f16 weights", &decoded, &r["decoded"], 1e-4);
}
