//! The CLIP text encoder against transformers' `CLIPTextModel` on the tiny fixtures.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs::models::clip::{ClipConfig, ClipTextTransformer};

fn load_clip(dir: &str) -> (ClipTextTransformer, ClipConfig) {
    let dir = common::fixtures().join(dir);
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg: ClipConfig = serde_json::from_str(&config).expect("CLIP config");
    let weights = dir.join("model.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .expect("weights");
    // transformers 5 stores the tensors without the `text_model.` prefix; the loader strips it for us.
    let model = ClipTextTransformer::new(vb, &cfg).expect("model");
    (model, cfg)
}

fn check_against_reference(model_dir: &str, reference_file: &str) {
    let (model, cfg) = load_clip(model_dir);
    let reference = common::reference(reference_file);
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let start = std::time::Instant::now();
    let last = model.forward(&ids, 1).expect("forward clip_skip 1");
    println!(
        "{model_dir}: forward {:?} in {:?}",
        ids.dims(),
        start.elapsed()
    );
    common::assert_close(
        &format!("{model_dir} last_hidden_state"),
        &last,
        &reference["last_hidden_state"],
        1e-4,
    );
    let skip2 = model.forward(&ids, 2).expect("forward clip_skip 2");
    common::assert_close(
        &format!("{model_dir} clip_skip2"),
        &skip2,
        &reference["clip_skip2"],
        1e-4,
    );
    assert_eq!(skip2.dim(2).unwrap(), cfg.hidden_size);
}

#[test]
fn one_head_clip_matches_transformers_last_and_penultimate_layer() {
    check_against_reference("tiny-sd1/text_encoder", "clip.safetensors");
}

#[test]
fn four_head_clip_matches_transformers_last_and_penultimate_layer() {
    check_against_reference("tiny-clip-4heads", "clip4.safetensors");
}

#[test]
fn clip_skip_out_of_range_is_an_error_not_a_panic() {
    let (model, cfg) = load_clip("tiny-sd1/text_encoder");
    let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).unwrap();
    for skip in [0, cfg.num_hidden_layers + 1] {
        let err = model
            .forward(&ids, skip)
            .expect_err("clip_skip out of range");
        assert!(err.to_string().contains("clip_skip"), "{err}");
    }
}

#[test]
fn too_many_tokens_is_an_error_not_a_panic() {
    let (model, _) = load_clip("tiny-sd1/text_encoder");
    let ids = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&ids, 1).expect_err("78 tokens");
    assert!(err.to_string().contains("78 tokens"), "{err}");
}

/// SDXL's two encoders (tools/make_sdxl_fixtures.py): penultimate hidden states without the
/// final LayerNorm for both, and the second's pooled output through its text projection,
/// against transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[test]
fn sdxl_encoders_give_transformers_penultimate_states_and_projected_pooled_output() {
    let reference = common::reference("sdxl.safetensors");
    for (dir, ids, want) in [
        ("tiny-sdxl/text_encoder", "te1_input_ids", "te1_penultimate"),
        (
            "tiny-sdxl/text_encoder_2",
            "te2_input_ids",
            "te2_penultimate",
        ),
    ] {
        let path = common::fixtures().join(dir);
        let config = std::fs::read_to_string(path.join("config.json")).expect("config.json");
        let cfg: ClipConfig = serde_json::from_str(&config).expect("CLIP config");
        // SAFETY: the fixture file is not modified while the test runs.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[path.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .expect("weights");
        let root = if vb.contains_tensor("text_model.final_layer_norm.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let model = ClipTextTransformer::new(root, &cfg).expect("model");
        let ids = reference[ids].to_dtype(DType::U32).unwrap();
        let hidden = model
            .hidden_states(&ids, &[], cfg.num_hidden_layers - 1)
            .expect("penultimate");
        common::assert_close(dir, &hidden, &reference[want], 1e-5);
        if dir.ends_with("_2") {
            let projection = sdrs::models::clip::TextProjection::new(
                vb.pp("text_projection"),
                cfg.hidden_size,
                6,
            )
            .expect("projection");
            let pooled = projection
                .forward(&model.pooled(&ids).expect("pooled"))
                .expect("project");
            common::assert_close("text_embeds", &pooled, &reference["te2_text_embeds"], 1e-5);
            // The same in one pass, as the conditioner runs it.
            let (hidden, pooled) = model
                .hidden_and_pooled(&ids, &[], cfg.num_hidden_layers - 1)
                .expect("one pass");
            common::assert_close("one pass", &hidden, &reference[want], 1e-5);
            let pooled = projection.forward(&pooled).expect("project");
            common::assert_close("one pass", &pooled, &reference["te2_text_embeds"], 1e-5);
        }
    }
}
