//! Textual-inversion embeddings (tools/make_embedding_fixtures.py): the three file layouts,
//! conditioning and DDIM images against diffusers' `load_textual_inversion` on tiny SD 1 and
//! SD 2 models, and what only A1111 does (matching on token ids, moving an embedding to the
//! next chunk, emphasis over it, `TI hashes`) against hand-derived expectations.

use std::path::{Path, PathBuf};

use crate::common;

use sdrs::embeddings::Embeddings;
use sdrs::pipeline::{infotext, txt2img, LoadOptions, SizeIds, StableDiffusion};
use sdrs::prompt::{chunks, report, EditClock, EditTimeline, PromptSyntax};
use sdrs::sampling::Flow;
use sdrs::tokenizer::{Tokenizer, BOS, EOS};
use sdrs::weights::file_hash::sha256_file;

/// The tiny text encoders' width.
const WIDTH: usize = 32;

fn folder() -> PathBuf {
    common::fixtures().join("embeddings")
}

fn with_embeddings(model: &str) -> StableDiffusion {
    common::load_model_with(
        model,
        LoadOptions {
            embeddings_dir: Some(folder()),
            ..LoadOptions::default()
        },
    )
}

/// A fresh folder under the temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-emb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One embedding of the fixtures, copied into `dir` under another file name.
fn copy_as(dir: &Path, fixture: &str, name: &str) {
    std::fs::copy(folder().join(fixture), dir.join(name)).unwrap();
}

#[test]
fn every_layout_loads_and_another_width_is_skipped() {
    let tokenizer = Tokenizer::new().unwrap();
    let db = Embeddings::load_dir(&folder(), &tokenizer, WIDTH).unwrap();
    let manifest = common::reference_json("embeddings.json");
    let want = manifest["embeddings"].as_object().unwrap();
    assert_eq!(db.loaded().len(), want.len());
    for (name, facts) in want {
        let e = db.get(name).unwrap_or_else(|| panic!("{name} not loaded"));
        assert_eq!(
            e.info.vectors as u64,
            facts["vectors"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(e.info.width, WIDTH);
        assert_eq!(e.vectors.dims(), [e.info.vectors, WIDTH]);
        assert_eq!(e.info.shorthash().map(str::len), Some(12));
    }
    let fox = &db.get("sdrsfox").unwrap().info;
    assert_eq!(fox.step, Some(500));
    assert_eq!(fox.sd_checkpoint.as_deref(), Some("0123456789"));
    assert_eq!(fox.sd_checkpoint_name.as_deref(), Some("tiny-sd1"));
    assert_eq!(db.get("sdrssnow").unwrap().info.step, None);
    let [skipped] = db.skipped() else {
        panic!("skipped: {:?}", db.skipped());
    };
    assert_eq!(skipped.name, "sdrswide");
    assert!(skipped.reason.contains("width 48"), "{}", skipped.reason);
    assert_eq!(skipped.info.as_ref().map(|i| i.width), Some(48));
}

#[test]
fn conditioning_matches_diffusers_load_textual_inversion() {
    let manifest = common::reference_json("embeddings.json");
    let reference = common::reference("embeddings/conditioning.safetensors");
    for (key, model) in manifest["models"].as_object().unwrap() {
        let sd = with_embeddings(model.as_str().unwrap());
        for (i, prompt) in manifest["prompts"].as_array().unwrap().iter().enumerate() {
            let c = sd
                .conditioning(
                    prompt.as_str().unwrap(),
                    "",
                    PromptSyntax::A1111,
                    8,
                    1,
                    SizeIds::of(64, 64),
                )
                .unwrap();
            let name = format!("{key}.{i}");
            common::assert_close(&name, &c.parts[0].at(0).context, &reference[&name], 1e-5);
        }
    }
}

#[test]
fn ddim_images_with_embeddings_match_diffusers() {
    let manifest = common::reference_json("embeddings.json");
    for case in manifest["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let sd = with_embeddings(case["model"].as_str().unwrap());
        let generation = common::request(case).validate().unwrap();
        let images = txt2img(&sd, &generation, &mut |_| Flow::Continue)
            .expect(file)
            .images;
        common::assert_images_close(file, &images[0].image, &common::reference_image(file), 1);
    }
}

#[test]
fn infotext_names_the_embeddings_used_with_their_hashes_and_reads_back() {
    let sd = with_embeddings("tiny-sd1");
    let manifest = common::reference_json("embeddings.json");
    let case = &manifest["cases"][0];
    let mut request = common::request(case);
    request.steps = 1;
    let images = txt2img(&sd, &request.validate().unwrap(), &mut |_| Flow::Continue)
        .unwrap()
        .images;
    let hash = |file: &str| sha256_file(&folder().join(file)).unwrap()[..12].to_string();
    // The prompt's embeddings first, then the negative prompt's, each once.
    let want = format!(
        "TI hashes: \"sdrsred: {}, sdrssnow: {}, sdrsglow: {}\"",
        hash("sdrsred.bin"),
        hash("sdrssnow.safetensors"),
        hash("sdrsglow.safetensors")
    );
    let text = &images[0].infotext;
    assert!(text.contains(&want), "{text}");
    let parsed = infotext::parse(text);
    assert!(parsed.get("TI hashes").unwrap().starts_with("sdrsred: "));
    assert_eq!(parsed.to_request().prompt, case["prompt"].as_str().unwrap());
}

#[test]
fn a_name_that_is_a_word_is_the_embedding_matched_on_token_ids() {
    let dir = scratch("word");
    copy_as(&dir, "sdrsred.bin", "cat.bin");
    let tokenizer = Tokenizer::new().unwrap();
    let db = Embeddings::load_dir(&dir, &tokenizer, WIDTH).unwrap();
    let a = tokenizer.encode("a")[0];
    let got = chunks(&tokenizer, &db, "a CAT", PromptSyntax::A1111, EOS).unwrap();
    // "CAT" lower-cases to the ids of "cat": the embedding, at id 0, after "a".
    assert_eq!(&got[0].ids[..4], &[BOS, a, 0, EOS]);
    assert_eq!(got[0].fixes.len(), 1);
    assert_eq!(got[0].fixes[0].offset, 1);
    // "cats" is other ids: a plain word.
    let got = chunks(&tokenizer, &db, "a cats", PromptSyntax::A1111, EOS).unwrap();
    assert!(got[0].fixes.is_empty());
    assert_eq!(got[0].ids[1..3], tokenizer.encode("a cats")[..]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_embedding_that_does_not_fit_moves_whole_to_the_next_chunk() {
    let tokenizer = Tokenizer::new().unwrap();
    let db = Embeddings::load_dir(&folder(), &tokenizer, WIDTH).unwrap();
    let a = tokenizer.encode("a")[0];
    // 74 tokens, then a 2-vector embedding: 74 + 2 > 75.
    let text = format!("{}sdrsfox", "a ".repeat(74));
    let got = chunks(&tokenizer, &db, &text, PromptSyntax::A1111, 0).unwrap();
    assert_eq!(got.len(), 2);
    assert!(got[0].fixes.is_empty());
    assert_eq!(got[0].ids[75], EOS);
    assert_eq!(got[0].ids[76], 0, "SD 2 pads after the first EOS");
    assert!(got[0].ids[1..75].iter().all(|&id| id == a));
    assert_eq!(&got[1].ids[..4], &[BOS, 0, 0, EOS]);
    assert_eq!(got[1].fixes.len(), 1);
    assert_eq!(got[1].fixes[0].offset, 0);
    assert_eq!(got[1].fixes[0].embedding.info.name, "sdrsfox");
    // 73 tokens: it fits in the first chunk, at positions 74 and 75.
    let text = format!("{}sdrsfox", "a ".repeat(73));
    let got = chunks(&tokenizer, &db, &text, PromptSyntax::A1111, 0).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].fixes[0].offset, 73);
}

#[test]
fn emphasis_weighs_every_vector_of_an_embedding() {
    let tokenizer = Tokenizer::new().unwrap();
    let db = Embeddings::load_dir(&folder(), &tokenizer, WIDTH).unwrap();
    let got = chunks(
        &tokenizer,
        &db,
        "(sdrsfox:1.5) [sdrsred]",
        PromptSyntax::A1111,
        EOS,
    )
    .unwrap();
    let chunk = &got[0];
    assert_eq!(&chunk.ids[..5], &[BOS, 0, 0, 0, EOS]);
    // `[x]` is ÷1.1 in Python floats, then f32.
    assert_eq!(
        &chunk.weights[..5],
        &[1.0, 1.5, 1.5, (1.0f64 / 1.1) as f32, 1.0]
    );
    let offsets: Vec<(usize, &str)> = chunk
        .fixes
        .iter()
        .map(|f| (f.offset, f.embedding.info.name.as_str()))
        .collect();
    assert_eq!(offsets, [(0, "sdrsfox"), (2, "sdrsred")]);
    // Emphasis on an embedding changes the conditioning as on any token.
    let sd = with_embeddings("tiny-sd1");
    let plain = sd
        .conditioning(
            "sdrsfox",
            "",
            PromptSyntax::A1111,
            8,
            1,
            SizeIds::of(64, 64),
        )
        .unwrap();
    let strong = sd
        .conditioning(
            "(sdrsfox:1.5)",
            "",
            PromptSyntax::A1111,
            8,
            1,
            SizeIds::of(64, 64),
        )
        .unwrap();
    let diff = (plain.parts[0].at(0).context.clone() - strong.parts[0].at(0).context.clone())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-3, "{diff}");
}

#[test]
fn the_prompt_report_shows_embeddings() {
    let tokenizer = Tokenizer::new().unwrap();
    let db = Embeddings::load_dir(&folder(), &tokenizer, WIDTH).unwrap();
    let r = report(
        &tokenizer,
        &db,
        "a sdrsfox",
        PromptSyntax::A1111,
        EditClock::new(10, EditTimeline::Current),
        0,
    )
    .unwrap();
    let tokens: Vec<&str> = r.parts[0].edits[0].texts[0].chunks[0]
        .tokens
        .iter()
        .map(|t| t.token.as_str())
        .collect();
    assert_eq!(tokens, ["a</w>", "<sdrsfox> 1/2", "<sdrsfox> 2/2"]);
}

#[test]
fn hostile_embedding_files_are_skipped_with_a_reason() {
    let dir = scratch("hostile");
    std::fs::write(dir.join("garbage.pt"), b"PK\x03\x04 not really a zip").unwrap();
    std::fs::write(dir.join("text.safetensors"), b"hello").unwrap();
    std::fs::write(dir.join("empty.bin"), b"").unwrap();
    std::fs::write(dir.join("ignored.txt"), b"not looked at").unwrap();
    // A safetensors header promising 76 vectors.
    let header = br#"{"emb_params":{"dtype":"F32","shape":[76,32],"data_offsets":[0,9728]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + 9728, 0);
    std::fs::write(dir.join("long.safetensors"), bytes).unwrap();
    // Bigger than MAX_EMBEDDING_BYTES.
    let big = std::fs::File::create(dir.join("big.safetensors")).unwrap();
    big.set_len(sdrs::limits::MAX_EMBEDDING_BYTES + 1).unwrap();
    copy_as(&dir, "sdrsfox.pt", "good.pt");
    let tokenizer = Tokenizer::new().unwrap();
    let db = Embeddings::load_dir(&dir, &tokenizer, WIDTH).unwrap();
    assert_eq!(db.loaded().len(), 1);
    assert_eq!(db.loaded()[0].info.name, "good");
    let mut reasons: Vec<(&str, &str)> = db
        .skipped()
        .iter()
        .map(|s| (s.name.as_str(), s.reason.as_str()))
        .collect();
    reasons.sort();
    let names: Vec<&str> = reasons.iter().map(|r| r.0).collect();
    assert_eq!(names, ["big", "garbage", "long", "text"], "{reasons:?}");
    assert!(reasons[0].1.contains("MAX_EMBEDDING_BYTES"), "{reasons:?}");
    assert!(
        reasons[2].1.contains("MAX_EMBEDDING_VECTORS"),
        "{reasons:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reloading_picks_up_new_files() {
    let dir = scratch("reload");
    copy_as(&dir, "sdrsfox.pt", "sdrsfox.pt");
    let sd = common::load_model_with(
        "tiny-sd1",
        LoadOptions {
            embeddings_dir: Some(dir.clone()),
            ..LoadOptions::default()
        },
    );
    assert_eq!(sd.embeddings().loaded().len(), 1);
    copy_as(&dir, "sdrsglow.safetensors", "sdrsglow.safetensors");
    assert_eq!(sd.embeddings().loaded().len(), 1);
    let db = sd.reload_embeddings().unwrap();
    assert_eq!(db.loaded().len(), 2);
    assert_eq!(sd.embeddings().loaded().len(), 2);
    std::fs::remove_dir_all(&dir).ok();
}
