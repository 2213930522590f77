//! LoRAs through whole txt2img runs (tools/make_lora_fixtures.py): every layout and kind of
//! tests/fixtures/lora merged by `<lora:…>` tags and compared with diffusers' fused pipeline
//! (kohya LoCon, PEFT) or with the A1111/LyCORIS formulas applied to the diffusers model
//! (LoHa, LoKr, full diff, CompVis names, pickles, the old processor format, SD 2). One model
//! runs every case in turn, so each case also checks that the last one's changes came out.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::common;
use sdrs::pipeline::{txt2img, GenerationRequest, LoadOptions, StableDiffusion};
use sdrs::sampling::Flow;

fn model(file: &str) -> StableDiffusion {
    common::load_model_with(
        file,
        LoadOptions {
            lora_dir: Some(common::fixtures().join("lora")),
            ..Default::default()
        },
    )
}

fn run(
    sd: &StableDiffusion,
    req: &GenerationRequest,
) -> sdrs::Result<sdrs::pipeline::GeneratedImage> {
    let gen = req.validate()?;
    let mut images = txt2img(sd, &gen, &mut |_| Flow::Continue)?.images;
    Ok(images.remove(0))
}

#[test]
fn every_lora_layout_matches_its_reference_and_comes_out_again() {
    let manifest = common::reference_json("lora.json");
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20);
    for model_file in ["tiny-sd1.safetensors", "tiny-sd2-openclip.safetensors"] {
        let sd = model(model_file);
        let mine: Vec<_> = cases.iter().filter(|c| c["model"] == model_file).collect();
        // Baseline last as well as first: what the LoRAs changed must be gone.
        let base = mine[0];
        for case in mine.iter().chain([&base]) {
            let file = case["file"].as_str().expect("file");
            let image = run(&sd, &common::request(case)).unwrap_or_else(|e| panic!("{file}: {e}"));
            common::assert_images_close(file, &image.image, &common::reference_image(file), 1);
        }
    }
}

/// kohya's "addnet" hash: SHA-256 of what follows the safetensors header, first 12 digits.
fn addnet_hash(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read");
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let digest = Sha256::digest(&bytes[8 + header..]);
    digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..12]
        .to_string()
}

#[test]
fn the_infotext_names_each_lora_with_a1111s_hash_and_reads_it_back() {
    let sd = model("tiny-sd1.safetensors");
    let req = GenerationRequest {
        prompt: "a fox <lora:loha:0.5>, snow <lora:kohya_locon:0.3:0.2>".into(),
        width: 64,
        height: 64,
        steps: 2,
        seed: 1,
        sampler_name: "Euler".into(),
        ..Default::default()
    };
    let image = run(&sd, &req).expect("run");
    let lora = common::fixtures().join("lora");
    let want = format!(
        "Lora hashes: \"loha: {}, kohya_locon: {}\"",
        addnet_hash(&lora.join("loha.safetensors")),
        addnet_hash(&lora.join("kohya_locon.safetensors"))
    );
    assert!(image.infotext.contains(&want), "{}", image.infotext);
    // The prompt keeps its tags, as A1111 writes it.
    assert!(
        image.infotext.starts_with("a fox <lora:loha:0.5>"),
        "{}",
        image.infotext
    );
    let back = sdrs::pipeline::infotext::parse(&image.infotext).to_request();
    assert_eq!(back.lora_hashes.len(), 2);
    assert_eq!(
        back.lora_hashes["loha"],
        addnet_hash(&lora.join("loha.safetensors"))
    );

    // A name this folder lacks is found by the hash the infotext gave.
    let renamed = GenerationRequest {
        prompt: "a fox <lora:my_old_loha_name:0.5>, snow <lora:kohya_locon:0.3:0.2>".into(),
        lora_hashes: [(
            "my_old_loha_name".to_string(),
            back.lora_hashes["loha"].clone(),
        )]
        .into_iter()
        .collect(),
        ..req.clone()
    };
    let again = run(&sd, &renamed).expect("run by hash");
    assert_eq!(again.image.as_raw(), image.image.as_raw());
}

#[test]
fn bad_loras_are_refused_with_the_file_and_the_layer() {
    let sd = model("tiny-sd1.safetensors");
    let req = |prompt: &str| GenerationRequest {
        prompt: prompt.into(),
        width: 64,
        height: 64,
        steps: 1,
        seed: 1,
        sampler_name: "Euler".into(),
        ..Default::default()
    };
    let manifest = common::reference_json("lora.json");
    let err = run(&sd, &req("a fox <lora:sd2_for_sd1_mismatch:1>"))
        .expect_err("a LoRA of other shapes")
        .to_string();
    assert!(err.contains("sd2_for_sd1_mismatch.safetensors"), "{err}");
    assert!(
        err.contains("attn2.to_k") || err.contains("attn2.to_v"),
        "{err}"
    );
    assert!(
        err.contains("64"),
        "{err} (expected: {})",
        manifest["mismatch"]["expect"]
    );

    let err = run(&sd, &req("a fox <lora:kohya_locn:1>"))
        .expect_err("unknown name")
        .to_string();
    assert!(err.contains("kohya_locn"), "{err}");
    assert!(err.contains("close names: kohya_locon"), "{err}");

    let err = req("a fox <lora:loha:1.2.3>")
        .validate()
        .expect_err("bad number")
        .to_string();
    assert!(
        err.contains("<lora:loha:1.2.3>") && err.contains("byte 6"),
        "{err}"
    );

    // After the refusals the model is as loaded: the baseline image comes out.
    let base = &manifest["cases"][0];
    let image = run(&sd, &common::request(base)).expect("baseline");
    let file = base["file"].as_str().unwrap();
    common::assert_images_close(file, &image.image, &common::reference_image(file), 1);
}
