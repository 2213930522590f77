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

/// The size ids go into the UNet as asked (diffusers' order: original, crop, target), for the
/// prompt and the negative alike; an empty negative has zero text but keeps them; a request's
/// own ids reach the conditioning of its pass and survive its JSON.
#[test]
fn size_ids_and_the_empty_negative_are_conditioned_as_a1111_and_diffusers_do() {
    use sdrs::pipeline::{GenerationRequest, SizeIds};
    use sdrs::prompt::PromptSyntax;
    let sd = common::load_model("tiny-sdxl.safetensors");
    let ids = SizeIds {
        original_size: [1024, 768],
        crops_coords_top_left: [16, 8],
        target_size: [512, 640],
    };
    let c = sd
        .conditioning("a fox", "", PromptSyntax::A1111, 4, 1, ids)
        .expect("conditioning");
    let (cond, uncond) = (c.parts[0].at(0), c.uncond.at(0));
    let want = [1024.0, 768.0, 16.0, 8.0, 512.0, 640.0];
    for condition in [cond, uncond] {
        let added = condition
            .added
            .as_ref()
            .expect("SDXL conditions on size ids");
        let got = added
            .time_ids
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }
    let zero = |t: &candle_core::Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0
    };
    let added = uncond.added.as_ref().unwrap();
    assert!(zero(&uncond.context) && zero(&added.text_embeds));
    assert!(!zero(&cond.context) && !zero(&cond.added.as_ref().unwrap().text_embeds));
    assert_eq!(cond.context.dims(), [1, 77, 12]);

    let request = GenerationRequest {
        original_size: Some([1024, 768]),
        crops_coords_top_left: [16, 8],
        target_size: Some([512, 640]),
        ..Default::default()
    };
    let json = serde_json::to_string(&request).unwrap();
    let back: GenerationRequest = serde_json::from_str(&json).unwrap();
    assert_eq!(back, request);
    assert!(json.contains("\"crops_coords_top_left\":[16,8]"), "{json}");
}

/// The hires fix, `sdrs hd` and the tiled VAE run on SDXL as on SD: the sizes they promise,
/// and a tiled decode close to the whole one.
#[test]
fn hires_fix_hd_and_tiled_vae_work_on_sdxl() {
    use sdrs::pipeline::{hd, GenerationRequest, HdOptions, LoadOptions, TilingMode, VaeTiling};
    use sdrs::upscale::Upscaler;
    let request = GenerationRequest {
        prompt: "a tiny red fox in the snow".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 4,
        cfg_scale: 5.0,
        sampler_name: "Euler".into(),
        seed: 42,
        ..Default::default()
    };
    let sd = common::load_model("tiny-sdxl");
    let hires = GenerationRequest {
        enable_hr: true,
        hr_scale: 2.0,
        hr_second_pass_steps: 2,
        denoising_strength: 0.5,
        ..request.clone()
    };
    let gen = hires.validate().unwrap();
    let image = txt2img(&sd, &gen, &mut |_| Flow::Continue).unwrap().images[0]
        .image
        .clone();
    assert_eq!(image.dimensions(), (128, 128));
    let opts = HdOptions {
        passes: 1,
        overlap: 16,
        detail_steps: Some(4),
        ..Default::default()
    };
    let gen = request.validate().unwrap();
    let doubled = hd(&sd, &gen, None, &Upscaler::Lanczos, &opts, &mut |_| {
        Flow::Continue
    })
    .unwrap()
    .expect("not stopped")
    .image;
    assert_eq!(doubled.dimensions(), (128, 128));

    let whole = txt2img(&sd, &gen, &mut |_| Flow::Continue).unwrap().images[0]
        .image
        .clone();
    let tiled = common::load_model_with(
        "tiny-sdxl",
        LoadOptions {
            vae_tiling: VaeTiling {
                mode: TilingMode::Always,
                tile: 4,
                overlap: 2,
            },
            ..Default::default()
        },
    );
    let image = txt2img(&tiled, &gen, &mut |_| Flow::Continue)
        .unwrap()
        .images[0]
        .image
        .clone();
    // Tiles of 4 latent cells on a random VAE: close, not equal (as the SD test's bound).
    let n = whole.as_raw().len() as f64;
    let mean = whole.as_raw().iter().map(|&v| v as f64).sum::<f64>() / n;
    let spread = whole
        .as_raw()
        .iter()
        .map(|&v| (v as f64 - mean).abs())
        .sum::<f64>()
        / n;
    let mad = image
        .as_raw()
        .iter()
        .zip(whole.as_raw())
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum::<f64>()
        / n;
    assert!(
        mad > 0.0 && mad < 0.5 * spread,
        "tiled decode {mad} levels from the whole one on average (spread {spread})"
    );
}

/// A copy of the tiny SDXL single file with `change` applied to its tensors, in a scratch file.
fn altered(
    name: &str,
    change: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> std::path::PathBuf {
    let mut tensors = candle_core::safetensors::load(
        common::fixtures().join("tiny-sdxl.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    change(&mut tensors);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdrs-sdxl-test");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// SDXL files whose shapes do not add up are refused with a reason when they open, or fail
/// their generation with one; nothing panics.
#[test]
fn inconsistent_sdxl_files_are_refused_with_a_reason() {
    use candle_core::{DType, Device, Tensor};
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F16, &Device::Cpu).unwrap();
    let projection = "conditioner.embedders.1.model.text_projection";
    let label = "model.diffusion_model.label_emb.0.0.weight";
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        (
            "text_projection of the wrong width",
            altered("projection.safetensors", |t| {
                t.insert(projection.into(), zeros(&[5, 6]));
            }),
            "text_projection has shape",
        ),
        (
            "text_projection that is not a matrix",
            altered("projection-rank.safetensors", |t| {
                t.insert(projection.into(), zeros(&[8]));
            }),
            "text_projection has shape",
        ),
        (
            "label_emb narrower than the pooled text",
            altered("label-narrow.safetensors", |t| {
                t.insert(label.into(), zeros(&[32, 4]));
            }),
            "label_emb takes 4 values",
        ),
        (
            "label_emb whose size ids do not come in six",
            altered("label-odd.safetensors", |t| {
                t.insert(label.into(), zeros(&[32, 13]));
            }),
            "six",
        ),
    ];
    for (what, path, reason) in cases {
        match Checkpoint::open(&path) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => assert!(e.to_string().contains(reason), "{what}: {e}"),
        }
    }
    // Without label_emb the UNet takes no pooled text: the file opens, and its generation
    // fails saying so.
    let path = altered("no-label.safetensors", |t| {
        t.retain(|k, _| !k.contains("label_emb"));
    });
    let ckpt = Checkpoint::open(&path).expect("opens");
    let sd = sdrs::pipeline::StableDiffusion::load(&ckpt, &Device::Cpu).expect("loads");
    let request = sdrs::pipeline::GenerationRequest {
        prompt: "a fox".into(),
        width: 64,
        height: 64,
        steps: 1,
        ..Default::default()
    };
    let err = txt2img(&sd, &request.validate().unwrap(), &mut |_| Flow::Continue)
        .expect_err("a UNet without add_embedding given pooled text");
    assert!(err.to_string().contains("takes no pooled text"), "{err}");
}

/// An A1111 SDXL embedding (`clip_l` and `clip_g` in one file) named in the prompt: each
/// encoder gets its own vectors, as diffusers' `load_textual_inversion` into both encoders
/// (tools/make_sdxl_embedding_fixtures.py) gives them.
#[test]
fn an_sdxl_embedding_conditions_both_encoders_as_diffusers_does() {
    use sdrs::pipeline::{LoadOptions, SizeIds};
    use sdrs::prompt::PromptSyntax;
    let manifest = common::reference_json("embeddings_sdxl.json");
    let case = &manifest["cases"][0];
    let reference = common::reference("embeddings_sdxl.safetensors");
    for layout in LAYOUTS {
        let options = LoadOptions {
            embeddings_dir: Some(common::fixtures().join("embeddings-sdxl")),
            ..Default::default()
        };
        let sd = common::load_model_with(layout, options);
        assert_eq!(sd.text_width(), 12);
        let skipped: Vec<String> = sd
            .embeddings()
            .skipped()
            .iter()
            .map(|s| s.reason.clone())
            .collect();
        assert_eq!(sd.embeddings().loaded().len(), 1, "{layout}: {skipped:?}");
        let prompt = case["prompt"].as_str().unwrap();
        let c = sd
            .conditioning(prompt, "", PromptSyntax::A1111, 8, 1, SizeIds::of(64, 64))
            .expect("conditioning");
        let cond = c.parts[0].at(0);
        common::assert_close(layout, &cond.context, &reference["prompt_embeds"], 1e-5);
        let pooled = &cond.added.as_ref().unwrap().text_embeds;
        common::assert_close(layout, pooled, &reference["pooled_prompt_embeds"], 1e-5);
        let file = case["file"].as_str().unwrap();
        let gen = common::request(case).validate().unwrap();
        let images = txt2img(&sd, &gen, &mut |_| Flow::Continue).unwrap().images;
        common::assert_images_close(file, &images[0].image, &common::reference_image(file), 2);
        assert!(images[0].infotext.contains("TI hashes: \"sdrsxlfox: "));
    }
}

/// An SDXL embedding whose two halves disagree on the vector count is skipped with the reason.
#[test]
fn an_sdxl_embedding_with_uneven_halves_is_skipped_with_the_reason() {
    use candle_core::{DType, Device, Tensor};
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdrs-sdxl-embeddings");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("uneven.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> = [
        (
            "clip_l",
            Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "clip_g",
            Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let tokenizer = sdrs::tokenizer::Tokenizer::new().unwrap();
    let set = sdrs::embeddings::Embeddings::load_files(&[path], &tokenizer, 12);
    assert!(set.loaded().is_empty());
    let reason = &set.skipped()[0].reason;
    assert!(
        reason.contains("not the same number of vectors"),
        "{reason}"
    );
}
