//! Checkpoint loading against the tiny fixtures: every layout of the same model must give the
//! diffusers folder's configs and, name for name, the diffusers folder's tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs::weights::{Checkpoint, ModelFamily};
use sdrs::Error;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A scratch path in cargo's per-target temporary folder (overwritten run after run).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdrs-weights-test");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The diffusers folder's tensors per model, under the names the models ask for.
fn reference() -> [(&'static str, HashMap<String, Tensor>); 3] {
    let dir = fixture("tiny-sd1");
    let clip = load(&dir.join("text_encoder/model.safetensors"))
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    [
        ("text_encoder", clip),
        (
            "unet",
            load(&dir.join("unet/diffusion_pytorch_model.safetensors")),
        ),
        (
            "vae",
            load(&dir.join("vae/diffusion_pytorch_model.safetensors")),
        ),
    ]
}

/// The diffusers folder's VAE tensors.
fn vae_reference() -> HashMap<String, Tensor> {
    let [_, _, (_, vae)] = reference();
    vae
}

/// Largest absolute difference and where it is, for a readable failure.
fn max_error(a: &Tensor, b: &Tensor) -> (f32, usize) {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold(
            (0.0, 0),
            |best, (i, e)| if e > best.0 { (e, i) } else { best },
        )
}

fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (err, at) = max_error(got, want);
    assert!(err == 0.0, "{what}: max error {err} at flat index {at}");
}

fn builders(ckpt: &Checkpoint, dtype: DType) -> [VarBuilder<'static>; 3] {
    let cpu = Device::Cpu;
    [
        ckpt.text_encoder(dtype, &cpu).unwrap(),
        ckpt.unet(dtype, &cpu).unwrap(),
        ckpt.vae(dtype, &cpu).unwrap(),
    ]
}

/// Every tensor of the diffusers folder, read through `ckpt`'s VarBuilders, is identical.
fn assert_same_weights(ckpt: &Checkpoint) {
    for ((model, tensors), vb) in reference().iter().zip(builders(ckpt, DType::F32)) {
        for (name, want) in tensors {
            let got = vb
                .get(want.dims(), name)
                .unwrap_or_else(|e| panic!("{model}: {name}: {e}"));
            assert_eq!(got.dtype(), DType::F32);
            assert_same(&format!("{model}: {name}"), &got, want);
        }
    }
}

/// The configs equal those in the diffusers folder's config.json files.
fn assert_same_configs(ckpt: &Checkpoint) {
    let folder = Checkpoint::open(&fixture("tiny-sd1")).unwrap();
    assert_eq!(ckpt.clip_config(), folder.clip_config());
    assert_eq!(ckpt.unet_config(), folder.unet_config());
    assert_eq!(ckpt.vae_config(), folder.vae_config());
    assert_eq!(ckpt.family(), ModelFamily::Sd1);
}

fn assert_layout_matches_folder(name: &str) {
    let ckpt = Checkpoint::open(&fixture(name)).unwrap();
    assert_same_configs(&ckpt);
    assert_same_weights(&ckpt);
}

#[test]
fn diffusers_folder_f16_serves_every_tensor_as_f32() {
    assert_layout_matches_folder("tiny-sd1");
}

#[test]
fn diffusers_folder_bf16_bin_matches_safetensors_folder() {
    // Only the text encoder is a `.bin` (unet/ and vae/ link to tiny-sd1/): the pickle reader is
    // the same for every component.
    let text_encoder = fixture("tiny-sd1-bin/text_encoder");
    assert!(text_encoder.join("pytorch_model.bin").is_file());
    assert!(!text_encoder.join("model.safetensors").exists());
    assert_layout_matches_folder("tiny-sd1-bin");
}

#[test]
fn compvis_safetensors_f16_matches_diffusers_folder() {
    assert_layout_matches_folder("tiny-sd1.safetensors");
}

#[test]
fn compvis_ckpt_bf16_in_state_dict_matches_diffusers_folder() {
    assert_layout_matches_folder("tiny-sd1.ckpt");
}

#[test]
fn vae_ckpt_f16_without_wrapper_replaces_the_checkpoint_vae() {
    let mut ckpt = Checkpoint::open(&fixture("tiny-sd1.safetensors")).unwrap();
    // A different VAE first, so that equality below shows the `.ckpt`'s tensors are served.
    ckpt.set_vae_file(&fixture("tiny-vae.safetensors")).unwrap();
    ckpt.set_vae_file(&fixture("tiny-vae-nowrap.ckpt")).unwrap();
    let vb = ckpt.vae(DType::F32, &Device::Cpu).unwrap();
    for (name, want) in &vae_reference() {
        let got = vb.get(want.dims(), name).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_same(name, &got, want);
    }
}

#[test]
fn half_precision_is_served_when_asked() {
    // Stored as bf16, served as f16: a real conversion (the weights are exact in both).
    let ckpt = Checkpoint::open(&fixture("tiny-sd1.ckpt")).unwrap();
    for ((model, tensors), vb) in reference().iter().zip(builders(&ckpt, DType::F16)) {
        for (name, want) in tensors {
            let got = vb.get(want.dims(), name).unwrap();
            assert_eq!(got.dtype(), DType::F16, "{model}: {name}");
            assert_same(
                &format!("{model}: {name}"),
                &got,
                &want.to_dtype(DType::F16).unwrap(),
            );
        }
    }
}

#[test]
fn vae_file_with_bare_compvis_names_replaces_the_checkpoint_vae() {
    let path = fixture("tiny-vae.safetensors");
    let raw = load(&path);
    // The one fixture stored in f32.
    assert!(raw.values().all(|t| t.dtype() == DType::F32));
    let mut ckpt = Checkpoint::open(&fixture("tiny-sd1.safetensors")).unwrap();
    ckpt.set_vae_file(&path).unwrap();
    let vb = ckpt.vae(DType::F32, &Device::Cpu).unwrap();
    let levels = ckpt.vae_config().block_out_channels.len();
    // Decoder levels are numbered in opposite orders; attention 1×1 convs become linears.
    let pairs = [
        (
            "encoder.conv_in.weight".to_string(),
            "encoder.conv_in.weight".to_string(),
        ),
        (
            "decoder.up_blocks.0.resnets.0.conv1.weight".into(),
            format!("decoder.up.{}.block.0.conv1.weight", levels - 1),
        ),
        (
            "decoder.up_blocks.0.upsamplers.0.conv.bias".into(),
            format!("decoder.up.{}.upsample.conv.bias", levels - 1),
        ),
        (
            "encoder.mid_block.attentions.0.to_q.weight".into(),
            "encoder.mid.attn_1.q.weight".into(),
        ),
        (
            "decoder.mid_block.attentions.0.to_out.0.weight".into(),
            "decoder.mid.attn_1.proj_out.weight".into(),
        ),
        (
            "post_quant_conv.weight".into(),
            "post_quant_conv.weight".into(),
        ),
    ];
    for (diffusers, compvis) in pairs {
        let want = &raw[&compvis];
        let dims: Vec<usize> = if compvis.contains("attn_1") {
            want.dims()[..2].to_vec()
        } else {
            want.dims().to_vec()
        };
        let got = vb.get(dims.as_slice(), &diffusers).unwrap();
        assert_same(
            &diffusers,
            &got.flatten_all().unwrap(),
            &want.flatten_all().unwrap(),
        );
    }
}

#[test]
fn vae_file_with_prefixed_or_old_diffusers_names_loads() {
    let vae_reference = vae_reference();
    // The old diffusers attention names.
    let old: HashMap<String, Tensor> = vae_reference
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v.clone())
        })
        .collect();
    let old_path = scratch("old-diffusers-vae.safetensors");
    candle_core::safetensors::save(&old, &old_path).unwrap();
    let mut ckpt = Checkpoint::open(&fixture("tiny-sd1.ckpt")).unwrap();
    // `first_stage_model.*` names, as inside a full checkpoint.
    for vae_file in [old_path.as_path(), &fixture("tiny-sd1.safetensors")] {
        ckpt.set_vae_file(vae_file).unwrap();
        let vb = ckpt.vae(DType::F32, &Device::Cpu).unwrap();
        for (name, want) in &vae_reference {
            assert_same(name, &vb.get(want.dims(), name).unwrap(), want);
        }
    }
}

/// A scratch copy of the diffusers fixture folder.
fn copy_folder(name: &str) -> PathBuf {
    let from = fixture("tiny-sd1");
    let to = scratch(name);
    for sub in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(sub).join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(from.join("model_index.json"), to.join("model_index.json")).unwrap();
    to
}

/// A copy of the diffusers folder with the text encoder's names rewritten by `rename`.
fn folder_with_text_encoder_names(name: &str, rename: impl Fn(&str) -> String) -> PathBuf {
    let dir = copy_folder(name);
    let weights = dir.join("text_encoder/model.safetensors");
    let renamed: HashMap<String, Tensor> = load(&weights)
        .into_iter()
        .map(|(k, v)| (rename(&k), v))
        .collect();
    candle_core::safetensors::save(&renamed, &weights).unwrap();
    dir
}

#[test]
fn text_encoder_names_with_or_without_text_model_prefix_load() {
    // transformers 4 writes `text_model.*`, transformers 5 does not.
    let strip = |k: &str| k.strip_prefix("text_model.").unwrap_or(k).to_string();
    let add = |k: &str| format!("text_model.{}", strip(k));
    for (name, rename) in [
        ("prefixed", &add as &dyn Fn(&str) -> String),
        ("bare", &strip),
    ] {
        let ckpt = Checkpoint::open(&folder_with_text_encoder_names(name, rename)).unwrap();
        assert_same_weights(&ckpt);
    }
    // Older CompVis files lack `text_model.` under `cond_stage_model.transformer.`.
    let old: HashMap<String, Tensor> = load(&fixture("tiny-sd1.safetensors"))
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace(
                    "cond_stage_model.transformer.text_model.",
                    "cond_stage_model.transformer.",
                ),
                v,
            )
        })
        .collect();
    let path = scratch("old-clip-names.safetensors");
    candle_core::safetensors::save(&old, &path).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_same_configs(&ckpt);
    assert_same_weights(&ckpt);
}

#[test]
fn missing_tensors_are_listed_by_diffusers_name() {
    let mut tensors = load(&fixture("tiny-sd1.safetensors"));
    tensors.retain(|k, _| {
        !k.starts_with("model.diffusion_model.output_blocks.2.")
            && k != "first_stage_model.quant_conv.bias"
    });
    let path = scratch("incomplete.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert!(ckpt.text_encoder(DType::F32, &Device::Cpu).is_ok());
    match ckpt.unet(DType::F32, &Device::Cpu) {
        Err(Error::MissingTensors(names)) => {
            assert!(
                names.contains(&"up_blocks.0.resnets.2.conv1.weight".to_string()),
                "{names:?}"
            );
            assert!(
                names.contains(&"up_blocks.0.upsamplers.0.conv.bias".to_string()),
                "{names:?}"
            );
            assert!(
                names.len() >= 12,
                "all missing names are listed, got {names:?}"
            );
        }
        other => panic!("expected MissingTensors, got {:?}", other.err()),
    }
    match ckpt.vae(DType::F32, &Device::Cpu) {
        Err(Error::MissingTensors(names)) => assert_eq!(names, ["quant_conv.bias"]),
        other => panic!("expected MissingTensors, got {:?}", other.err()),
    }
}

fn open_error(path: &Path) -> Error {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_files_give_clear_errors() {
    assert!(matches!(
        open_error(&scratch("does-not-exist.safetensors")),
        Error::Io { .. }
    ));
    let empty = write("empty.safetensors", b"");
    let png = write("image.ckpt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR");
    let text = write("notes.safetensors", b"just some text, not weights");
    for (name, source) in [
        ("truncated.safetensors", "tiny-sd1.safetensors"),
        ("truncated.ckpt", "tiny-sd1.ckpt"),
    ] {
        let bytes = std::fs::read(fixture(source)).unwrap();
        let path = write(name, &bytes[..bytes.len() / 2]);
        let err = open_error(&path);
        assert!(matches!(err, Error::NotACheckpoint { .. }), "{name}: {err}");
    }
    for path in [empty, png, text] {
        let err = open_error(&path);
        assert!(
            matches!(err, Error::NotACheckpoint { .. }),
            "{}: {err}",
            path.display()
        );
    }
    // A VAE alone is not a checkpoint.
    let err = open_error(&fixture("tiny-vae.safetensors"));
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
}

fn synthetic(name: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let tensors: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, shape)| {
            (
                k.to_string(),
                Tensor::zeros(*shape, DType::F16, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let path = scratch(name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn inpainting_the_sdxl_refiner_and_a_partial_sdxl_are_refused_by_name() {
    let unet = (
        "model.diffusion_model.input_blocks.0.0.weight",
        &[32, 4, 3, 3][..],
    );
    let label_emb = (
        "model.diffusion_model.label_emb.0.0.weight",
        &[128, 256][..],
    );
    let refiner = synthetic(
        "refiner.safetensors",
        &[
            unet,
            label_emb,
            (
                "conditioner.embedders.0.model.token_embedding.weight",
                &[16, 32],
            ),
        ],
    );
    let partial = synthetic(
        "sdxl.safetensors",
        &[
            unet,
            label_emb,
            (
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                &[16, 32],
            ),
        ],
    );
    let inpainting = synthetic(
        "inpainting.safetensors",
        &[(
            "model.diffusion_model.input_blocks.0.0.weight",
            &[32, 9, 3, 3],
        )],
    );
    for (path, detected) in [
        (inpainting, "SD 1.x inpainting"),
        (refiner, "the SDXL refiner"),
        (partial, "SDXL without its two text encoders"),
    ] {
        match open_error(&path) {
            Error::UnsupportedCheckpoint { detected: d } => {
                assert!(d.starts_with(detected), "{d}")
            }
            other => panic!("{}: {other}", path.display()),
        }
    }
}

#[test]
fn an_inpainting_folder_is_refused_by_name_and_an_sdxl_folder_names_what_it_lacks() {
    let inpainting = copy_folder("inpainting-folder");
    let config = inpainting.join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["in_channels"] = 9.into();
    std::fs::write(&config, json.to_string()).unwrap();
    match open_error(&inpainting) {
        Error::UnsupportedCheckpoint { detected } => assert_eq!(detected, "SD 1.x inpainting"),
        other => panic!("{}: {other}", inpainting.display()),
    }
    // An SD 1 folder with an empty text_encoder_2 reads as SDXL, which lacks the config.
    let sdxl = copy_folder("sdxl-folder");
    std::fs::create_dir_all(sdxl.join("text_encoder_2")).unwrap();
    let message = open_error(&sdxl).to_string();
    assert!(message.contains("text_encoder_2/config.json"), "{message}");
}

#[test]
fn sd2_single_file_is_detected_and_a_partial_text_encoder_names_what_it_lacks() {
    let mut tensors = load(&fixture("tiny-sd1.safetensors"));
    tensors.retain(|k, _| !k.starts_with("cond_stage_model."));
    for (name, shape) in [
        ("token_embedding.weight", &[100, 64][..]),
        ("positional_embedding", &[77, 64]),
        ("transformer.resblocks.0.mlp.c_fc.weight", &[256, 64]),
        ("transformer.resblocks.1.mlp.c_fc.weight", &[256, 64]),
    ] {
        let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        tensors.insert(format!("cond_stage_model.model.{name}"), t);
    }
    let path = scratch("sd2.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.family(), ModelFamily::Sd2);
    let clip = ckpt.clip_config();
    assert_eq!(
        (
            clip.hidden_size,
            clip.num_hidden_layers,
            clip.intermediate_size
        ),
        // Two resblocks; SD 2 conditions on the penultimate one.
        (64, 1, 256)
    );
    match ckpt.text_encoder(DType::F32, &Device::Cpu) {
        Err(Error::MissingTensors(names)) => {
            assert!(
                names.contains(&"encoder.layers.0.self_attn.q_proj.weight".to_string())
                    && names.contains(&"final_layer_norm.weight".to_string()),
                "{names:?}"
            );
            assert!(
                !names.iter().any(|n| n.starts_with("embeddings.")),
                "{names:?}"
            );
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a text encoder without its layers loaded"),
    }
    assert!(ckpt.unet(DType::F32, &Device::Cpu).is_ok());
}

fn sha256_prefix(path: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..10]
        .to_string()
}

#[test]
fn name_and_model_hash_follow_a1111() {
    let file = Checkpoint::open(&fixture("tiny-sd1.safetensors")).unwrap();
    assert_eq!(file.name(), "tiny-sd1");
    assert_eq!(
        file.hash().unwrap(),
        sha256_prefix(&fixture("tiny-sd1.safetensors"))
    );
    let folder = Checkpoint::open(&fixture("tiny-sd1")).unwrap();
    assert_eq!(folder.name(), "tiny-sd1");
    let unet = fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    assert_eq!(folder.hash().unwrap(), sha256_prefix(&unet));
}

/// Resident memory of this process in MiB (Linux).
fn resident_mib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap()
        / 1024
}

/// A full-size random SD 1.5 single file, made by
/// `tools/make_fixtures.py --full-size /tmp/sd15-random.safetensors` (2.1 GB; path overridable
/// with `SDRS_FULL_SIZE`). Run with `cargo test -p sdrs --test it weights:: -- --ignored`.
#[test]
#[ignore]
fn full_size_sd15_opens_lazily_with_sd1_configs() {
    let path = std::env::var("SDRS_FULL_SIZE").unwrap_or("/tmp/sd15-random.safetensors".into());
    let before = resident_mib();
    let ckpt = Checkpoint::open(Path::new(&path)).unwrap();
    let [clip, unet, vae] = builders(&ckpt, DType::F32);
    let grown = resident_mib().saturating_sub(before);
    assert!(grown < 64, "opening read {grown} MiB");
    assert_eq!(ckpt.family(), ModelFamily::Sd1);
    assert_eq!(ckpt.clip_config(), &sdrs::models::clip::ClipConfig::sd1());
    assert_eq!(ckpt.unet_config(), &sdrs::models::unet::UNetConfig::sd1());
    assert_eq!(ckpt.vae_config(), &sdrs::models::vae::VaeConfig::sd());
    let q = vae
        .get((512, 512), "decoder.mid_block.attentions.0.to_q.weight")
        .unwrap();
    assert_eq!(q.dtype(), DType::F32);
    unet.get(
        (320, 768),
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
    )
    .unwrap();
    clip.get((49408, 768), "embeddings.token_embedding.weight")
        .unwrap();
}

#[test]
fn the_hash_cache_remembers_a_file_until_it_changes() {
    use sdrs::weights::file_hash::{sha256_file, HashCache};
    // hashlib.sha256 of the fixture.
    let want = "a20f424f9800fca6fa11ac11030d5f41cecc520db6cc2084ea9c4511c7e45ef0";
    let dir = std::env::temp_dir().join(format!("sdrs-hash-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    std::fs::copy(fixture("tiny-sd1.safetensors"), &file).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), want);

    let cache = HashCache::at(&dir.join("cache"));
    assert_eq!(cache.sha256(&file).unwrap(), want);
    // The remembered value is what a second call returns: plant another to see it read.
    let json = dir.join("cache/hashes.json");
    let planted = std::fs::read_to_string(&json)
        .unwrap()
        .replace(want, &"f".repeat(64));
    std::fs::write(&json, planted).unwrap();
    assert_eq!(cache.sha256(&file).unwrap(), "f".repeat(64));
    // A newer modification time means the file may have changed: hashed again.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert_eq!(cache.sha256(&file).unwrap(), want);
    // An unreadable cache is passed over.
    std::fs::write(&json, b"not json").unwrap();
    assert_eq!(cache.sha256(&file).unwrap(), want);
    let _ = std::fs::remove_dir_all(&dir);
}
