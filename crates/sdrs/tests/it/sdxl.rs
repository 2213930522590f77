//! SDXL on a tiny random model (tools/make_sdxl_fixtures.py): both layouts (the SGM single
//! file and the diffusers folder) open as SDXL with the same architecture, and whole images
//! (txt2img with several samplers, a non-square size, an empty negative prompt, img2img and
//! a one-step turbo run) match the Python references within 1/255 per channel, 2/255 on at
//! most 0.1%.

use crate::common;

use sdrs::image_io::load_image;
use sdrs::pipeline::{img2img, txt2img};
use sdrs::sampling::Flow;
use sdrs::weights::{Checkpoint, ModelFamily};

const LAYOUTS: [&str; 2] = ["tiny-sdxl.safetensors", "tiny-sdxl"];

#[test]
fn both_layouts_open_as_the_same_sdxl() {
    let [file, folder] = LAYOUTS.map(|p| Checkpoint::open(&common::fixtures().join(p)).unwrap());
    for ckpt in [&file, &folder] {
        assert_eq!(ckpt.family(), ModelFamily::Sdxl);
        assert_eq!(ckpt.pad_tokens(), vec![sdrs::tokenizer::EOS, 0]);
        assert_eq!(ckpt.vae_config().scaling_factor, 0.13025);
        assert_eq!(ckpt.text_encoder_config(1).unwrap().1, Some(6));
        assert!(ckpt.text_encoder_config(2).is_none());
    }
    for i in 0..2 {
        assert_eq!(
            file.text_encoder_config(i).unwrap(),
            folder.text_encoder_config(i).unwrap(),
            "text encoder {i}"
        );
    }
    let (a, b) = (file.unet_config(), folder.unet_config());
    assert_eq!(a.block_out_channels, b.block_out_channels);
    assert_eq!(a.down_block_types, b.down_block_types);
    assert_eq!(a.cross_attention_dim, 12);
    assert_eq!(a.addition_time_embed_dim, Some(4));
    assert_eq!(a.projection_class_embeddings_input_dim, Some(30));
    for i in 0..3 {
        assert_eq!(a.heads(i), b.heads(i), "heads of level {i}");
        assert_eq!(
            a.transformer_layers_per_block.get(i),
            b.transformer_layers_per_block.get(i),
            "depth of level {i}"
        );
    }
}

#[test]
fn sdxl_images_match_the_python_references_from_both_layouts() {
    let manifest = common::reference_json("sdxl.json");
    let cases: Vec<&serde_json::Value> = manifest["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["schedule"] != "leading")
        .collect();
    assert!(cases.len() >= 8, "{} cases", cases.len());
    for layout in LAYOUTS {
        let sd = common::load_model(layout);
        for case in &cases {
            let file = case["file"].as_str().expect("file");
            let gen = common::request(case).validate().expect(file);
            let images = match case["init"].as_str() {
                Some(init) => {
                    let init = load_image(&common::fixtures().join("reference").join(init))
                        .expect("init image");
                    img2img(&sd, &gen, &init, &mut |_| Flow::Continue)
                }
                None => txt2img(&sd, &gen, &mut |_| Flow::Continue),
            }
            .expect(file)
            .images;
            let name = format!("{layout}: {file}");
            common::assert_images_close(&name, &images[0].image, &common::reference_image(file), 2);
        }
    }
}

/// A kohya SDXL LoRA (`lora_te1_`, `lora_te2_`, `lora_unet_` under CompVis names, LoCon convs,
/// `label_emb`) named in the prompt gives tools/make_sdxl_lora_fixtures.py's image, which
/// diffusers' own `load_lora_weights` reproduces.
#[test]
fn an_sdxl_lora_changes_all_three_networks_as_the_reference_does() {
    let manifest = common::reference_json("lora_sdxl.json");
    let case = &manifest["cases"][0];
    let file = case["file"].as_str().expect("file");
    for layout in LAYOUTS {
        let options = sdrs::pipeline::LoadOptions {
            lora_dir: Some(common::fixtures().join("lora-sdxl")),
            ..Default::default()
        };
        let sd = common::load_model_with(layout, options);
        let gen = common::request(case).validate().expect(file);
        let images = txt2img(&sd, &gen, &mut |_| Flow::Continue)
            .expect(file)
            .images;
        let name = format!("{layout}: {file}");
        common::assert_images_close(&name, &images[0].image, &common::reference_image(file), 2);
        assert!(images[0].infotext.contains("Lora hashes: \"sdxl_kohya: "));
    }
}
