//! The UNet against diffusers on the tiny model (fixtures/reference/unet.safetensors).

use crate::common;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs::models::unet::{UNet2DConditionModel, UNetConfig};

fn tiny_unet_dir() -> std::path::PathBuf {
    common::fixtures().join("tiny-sd1/unet")
}

fn tiny_config() -> UNetConfig {
    let path = tiny_unet_dir().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tiny_unet() -> UNet2DConditionModel {
    let weights = tiny_unet_dir().join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while mapped. The weights are stored in f16
    // and widened to f32 here, as the default loading mode does.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .unwrap();
    UNet2DConditionModel::new(vb, &tiny_config()).unwrap()
}

#[test]
fn unet_matches_diffusers_at_integer_and_fractional_timesteps() {
    let unet = tiny_unet();
    let r = common::reference("unet.safetensors");
    for (t, key) in [(999.0, "out_999"), (500.5, "out_500_5"), (1.0, "out_1")] {
        let start = Instant::now();
        let got = unet
            .forward(&r["sample"], t, &r["encoder_hidden_states"])
            .unwrap();
        eprintln!(
            "forward {:?} at t={t}: {:?}",
            r["sample"].dims(),
            start.elapsed()
        );
        common::assert_close(&format!("UNet at t={t}"), &got, &r[key], 1e-4);
    }
}

#[test]
fn unet_handles_latents_not_divisible_by_its_downsampling() {
    let unet = tiny_unet();
    let r = common::reference("unet.safetensors");
    let context = r["encoder_hidden_states"].narrow(0, 0, 1).unwrap();
    let got = unet.forward(&r["sample_ns"], 321.0, &context).unwrap();
    common::assert_close("UNet on a 10×6 latent", &got, &r["out_ns"], 1e-4);
}

#[test]
fn unet_runs_on_a_one_by_one_latent() {
    let unet = tiny_unet();
    let r = common::reference("unet.safetensors");
    let context = r["encoder_hidden_states"].narrow(0, 0, 1).unwrap();
    let sample = Tensor::ones((1, 4, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let got = unet.forward(&sample, 10.0, &context).unwrap();
    assert_eq!(got.dims(), &[1, 4, 1, 1]);
}

#[test]
fn missing_weights_are_an_error_naming_the_tensor() {
    let weights = tiny_unet_dir().join("diffusion_pytorch_model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let missing = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    assert!(
        tensors.remove(missing).is_some(),
        "the fixture should have {missing}"
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    match UNet2DConditionModel::new(vb, &tiny_config()) {
        Ok(_) => panic!("a UNet without {missing} was built"),
        Err(e) => assert!(
            e.to_string().contains(missing),
            "error does not name the tensor: {e}"
        ),
    }
}

#[test]
fn an_empty_var_builder_is_an_error_for_the_full_sd1_config() {
    let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    assert!(UNet2DConditionModel::new(vb, &UNetConfig::sd1()).is_err());
}

/// Speed of one full-size SD 1.x forward at a 64×64 latent (512×512 image), batch 2 as with
/// CFG, on random weights. Slow (a minute or more, 3.5 GB); run with
/// `cargo test --release -p sdrs --test it unet:: -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_size_sd1_unet_forward_at_64x64_latent() {
    let unet = random_full_size_sd1_unet();
    let sample = Tensor::randn(0f32, 1., (2, 4, 64, 64), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1., (2, 77, 768), &Device::Cpu).unwrap();
    let start = Instant::now();
    let out = unet.forward(&sample, 999.0, &context).unwrap();
    eprintln!(
        "full-size SD1 UNet, batch 2, 64×64 latent: {:?}",
        start.elapsed()
    );
    assert_eq!(out.dims(), &[2, 4, 64, 64]);
}

/// The SD 1.x UNet with random weights. Random rather than zero weights, as zero pages would
/// all share one physical page and flatter the timing; detached from the `VarMap`, as
/// variables make candle keep every activation alive for a backward pass.
fn random_full_size_sd1_unet() -> UNet2DConditionModel {
    let cfg = UNetConfig::sd1();
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap();
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

/// SDXL's UNet (tools/make_sdxl_fixtures.py): no attention at the first level, two
/// transformer blocks at the last, linear projections, and the `text_time` add embedding of
/// the pooled text and six size ids, against diffusers' `UNet2DConditionModel` (each batch row
/// at its own timestep; the second row's size ids are not the defaults).
#[test]
fn sdxl_unet_with_text_time_matches_diffusers() {
    let dir = common::fixtures().join("tiny-sdxl/unet");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: UNetConfig = serde_json::from_str(&text).unwrap();
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let r = common::reference("sdxl.safetensors");
    let timesteps = r["unet_timesteps"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (b, t) in timesteps.iter().enumerate() {
        let row = |key: &str| r[key].narrow(0, b, 1).unwrap();
        let added = sdrs::models::unet::AddedCondition {
            text_embeds: row("unet_text_embeds"),
            time_ids: row("unet_time_ids"),
        };
        let got = unet
            .forward_with(
                &row("unet_sample"),
                *t as f64,
                &row("unet_encoder_hidden_states"),
                Some(&added),
            )
            .unwrap();
        common::assert_close(&format!("SDXL UNet row {b}"), &got, &row("unet_out"), 1e-4);
        // Without the added condition the same UNet refuses, rather than guessing.
        assert!(unet
            .forward(
                &row("unet_sample"),
                *t as f64,
                &row("unet_encoder_hidden_states")
            )
            .is_err());
    }
}
