//! SD 2 on a tiny model (tools/make_sd2_fixtures.py): the single-file OpenCLIP text encoder
//! under `cond_stage_model.model.*` (fused q/k/v, GELU, penultimate layer + ln_final, "!"
//! padding) against transformers' CLIPTextModel, and whole txt2img images from the single file
//! (ε) and from the diffusers-layout folder (v-prediction, padding from its tokenizer config).

use crate::common;

use candle_core::{DType, Device};
use sdrs::models::clip::ClipTextTransformer;
use sdrs::models::unet::Prediction;
use sdrs::pipeline::txt2img;
use sdrs::sampling::Flow;
use sdrs::tokenizer::Tokenizer;
use sdrs::weights::{Checkpoint, ModelFamily};

const FILE: &str = "tiny-sd2-openclip.safetensors";

#[test]
fn openclip_text_encoder_gives_sd2s_penultimate_conditioning() {
    let ckpt = Checkpoint::open(&common::fixtures().join(FILE)).expect("open");
    assert_eq!(ckpt.family(), ModelFamily::Sd2);
    assert_eq!(ckpt.pad_token(), 0);
    // Three resblocks in the file; SD 2 stops at the penultimate one.
    assert_eq!(ckpt.clip_config().num_hidden_layers, 2);
    let clip = ClipTextTransformer::new(
        ckpt.text_encoder(DType::F32, &Device::Cpu)
            .expect("weights"),
        ckpt.clip_config(),
    )
    .expect("model");
    let reference = common::reference("sd2/text.safetensors");
    let ids = reference["ids"].to_dtype(DType::U32).expect("ids");
    let ours = Tokenizer::new().expect("tokenizer").encode_padded(
        "a tiny red fox in the snow",
        77,
        ckpt.pad_token(),
    );
    assert_eq!(ids.flatten_all().unwrap().to_vec1::<u32>().unwrap(), ours);
    let hidden = clip.forward(&ids, 1).expect("forward");
    common::assert_close("SD 2 conditioning", &hidden, &reference["hidden"], 1e-4);
}

#[test]
fn sd2_file_and_folder_txt2img_match_the_python_reference() {
    let manifest = common::reference_json("sd2.json");
    let cases = manifest["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let sd = common::load_model(case["model"].as_str().expect("model"));
        assert_eq!(sd.pad_token(), 0, "{file}");
        let v = file.contains("_v_");
        assert_eq!(
            sd.prediction(),
            if v {
                Prediction::V
            } else {
                Prediction::Epsilon
            }
        );
        let images = txt2img(&sd, &common::request(case).validate().unwrap(), &mut |_| {
            Flow::Continue
        })
        .expect(file)
        .images;
        common::assert_images_close(file, &images[0].image, &common::reference_image(file), 2);
    }
}
