//! LoRA files and tags made to hurt the LoRA reader and the merge, built here at run time
//! (safetensors below, torch zips by `hostile_files`' writers): each is refused quickly with an
//! error naming the file and the problem — no panic, no allocation sized by an unchecked shape,
//! no NaN merged — and the model then makes the baseline image of tests/fixtures/reference/
//! lora.json unchanged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;
use crate::hostile_files::writers::{f32_bytes, torch_zip, Pickle, TensorSpec};
use sdrs::limits::{MAX_LORAS, MAX_LORA_RANK};
use sdrs::pipeline::{txt2img, GenerationRequest, LoadOptions, StableDiffusion};
use sdrs::sampling::Flow;

/// A text-encoder layer of the tiny SD 1 model ([32, 32]), a UNet linear layer ([64, 64]) and
/// a UNet 3×3 convolution ([32, 32, 3, 3]), in kohya's names.
const TE_Q: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
const UNET_Q: &str = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q";
const UNET_CONV: &str = "lora_unet_down_blocks_0_resnets_0_conv1";

/// One tensor of a crafted safetensors file: name, shape, float32 values (as many as the
/// shape says, or not: the header is written as given).
struct T(String, Vec<u64>, Vec<f32>);

fn t(name: impl Into<String>, shape: &[u64], values: Vec<f32>) -> T {
    T(name.into(), shape.to_vec(), values)
}

/// `len` values 0.01, 0.02, … (small, so that a merged layer changes the image visibly but
/// stays finite).
fn ramp(len: usize) -> Vec<f32> {
    (0..len).map(|i| 0.01 * (i % 7 + 1) as f32).collect()
}

/// A float32 safetensors file holding `tensors`, each at the data offsets its values take.
fn safetensors(tensors: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for T(name, shape, values) in tensors {
        let start = data.len();
        data.extend(f32_bytes(values));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data);
    bytes
}

/// A good change of the text encoder's `q_proj` (rank 4): in every hostile file, so that a
/// merge that stopped half way would leave the text encoder changed.
fn good_te_layer() -> Vec<T> {
    let strong: Vec<f32> = ramp(128).iter().map(|v| v * 10.0).collect();
    vec![
        t(format!("{TE_Q}.lora_up.weight"), &[32, 4], strong.clone()),
        t(format!("{TE_Q}.lora_down.weight"), &[4, 32], strong),
        t(format!("{TE_Q}.alpha"), &[], vec![4.0]),
    ]
}

/// The good text-encoder layer and `more`.
fn with_good(more: Vec<T>) -> Vec<u8> {
    let mut all = good_te_layer();
    all.extend(more);
    safetensors(&all)
}

/// A scratch LoRA folder for one test, emptied.
fn folder(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sdrs-hostile-loras")
        .join(test)
        .join("loras");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn model(dir: &Path) -> StableDiffusion {
    common::load_model_with(
        "tiny-sd1.safetensors",
        LoadOptions {
            lora_dir: Some(dir.to_path_buf()),
            ..Default::default()
        },
    )
}

/// The first case of lora.json: no LoRA.
fn base_request() -> GenerationRequest {
    let manifest = common::reference_json("lora.json");
    common::request(&manifest["cases"][0])
}

fn run(sd: &StableDiffusion, req: &GenerationRequest) -> sdrs::Result<image::RgbImage> {
    let gen = req.validate()?;
    let mut images = txt2img(sd, &gen, &mut |_| Flow::Continue)?.images;
    Ok(images.remove(0).image)
}

/// The model makes the baseline image, as loaded: whatever was refused left nothing behind.
fn assert_baseline(sd: &StableDiffusion, after: &str) {
    let image = run(sd, &base_request()).unwrap_or_else(|e| panic!("after {after}: {e}"));
    let want = common::reference_image("lora/base.png");
    common::assert_images_close(&format!("baseline after {after}"), &image, &want, 1);
}

/// The error generating with `tags` added to the baseline prompt, which must come quickly and
/// mention every needle.
fn refused(sd: &StableDiffusion, tags: &str, needles: &[&str]) -> String {
    let mut req = base_request();
    req.prompt = format!("{} {tags}", req.prompt);
    let start = Instant::now();
    let err = match run(sd, &req) {
        Ok(_) => panic!("{tags}: generated"),
        Err(e) => e.to_string(),
    };
    let took = start.elapsed();
    eprintln!("{tags}: {err}");
    assert!(took < Duration::from_secs(20), "{tags}: took {took:?}");
    for needle in needles {
        assert!(err.contains(needle), "{tags}: {err:?} lacks {needle:?}");
    }
    err
}

/// Writes each file into a fresh LoRA folder, asks for it by name, and checks the refusal
/// names the file and the problem, and that the baseline comes out after it.
fn refuse_each(test: &str, cases: Vec<(&str, Vec<u8>, &[&str])>) {
    let dir = folder(test);
    let sd = model(&dir);
    // The good layer every hostile file carries changes the image on its own.
    std::fs::write(dir.join("good_te.safetensors"), with_good(vec![])).unwrap();
    sd.loras().refresh();
    let mut req = base_request();
    req.prompt = format!("{} <lora:good_te:1>", req.prompt);
    let changed = run(&sd, &req).expect("the good text-encoder layer");
    let base = common::reference_image("lora/base.png");
    let worst = changed
        .as_raw()
        .iter()
        .zip(base.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(
        worst > 16,
        "the good layer changes the image by {worst}/255 only"
    );
    for (file, bytes, needles) in cases {
        std::fs::write(dir.join(file), &bytes).unwrap();
        sd.loras().refresh();
        let name = Path::new(file).file_stem().unwrap().to_str().unwrap();
        let mut all = vec![file];
        all.extend_from_slice(needles);
        refused(&sd, &format!("<lora:{name}:1>"), &all);
        assert_baseline(&sd, file);
    }
}

/// A torch zip whose `lora_down` is `[0, 2⁴⁰, 2⁴⁰]` over an empty storage.
fn empty_huge_pickle() -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b'}').op(b'(');
    p.str(&format!("{UNET_Q}.lora_down.weight"))
        .tensor(&TensorSpec {
            class: "FloatStorage",
            key: "0".into(),
            numel: 0,
            offset: 0,
            shape: vec![0, 1 << 40, 1 << 40],
            stride: vec![0, 0, 1],
        });
    let pickle = p.op(b'u').finish();
    torch_zip(&pickle, &[("0", &[])])
}

#[test]
fn lora_layers_of_impossible_shapes_are_refused_before_merging() {
    let up = |layer: &str, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        t(format!("{layer}.lora_up.weight"), shape, ramp(n))
    };
    let down = |layer: &str, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        t(format!("{layer}.lora_down.weight"), shape, ramp(n))
    };
    let part = |layer: &str, part: &str, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        t(format!("{layer}.{part}"), shape, ramp(n))
    };
    let big = MAX_LORA_RANK as u64 + 1;
    let rank_limit = format!("over the limit of {MAX_LORA_RANK} (MAX_LORA_RANK)");
    refuse_each(
        "shapes",
        vec![
            (
                "ranks_that_do_not_multiply.safetensors",
                with_good(vec![up(UNET_Q, &[64, 4]), down(UNET_Q, &[3, 64])]),
                &["attn2_to_q", "[64, 4] and [3, 64] do not multiply"],
            ),
            (
                "rank_over_the_limit.safetensors",
                with_good(vec![up(UNET_Q, &[64, big]), down(UNET_Q, &[big, 64])]),
                &["is 4097", &rank_limit],
            ),
            (
                "rank_zero.safetensors",
                with_good(vec![up(UNET_Q, &[64, 0]), down(UNET_Q, &[0, 64])]),
                &["rank of 0"],
            ),
            (
                "one_d_down.safetensors",
                with_good(vec![up(UNET_Q, &[64, 64]), down(UNET_Q, &[64])]),
                &["lora_down is 1-D [64]"],
            ),
            (
                "five_d_down.safetensors",
                with_good(vec![up(UNET_Q, &[64, 4]), down(UNET_Q, &[4, 64, 1, 1, 1])]),
                &["lora_down is 5-D [4, 64, 1, 1, 1]"],
            ),
            (
                // Zero values, dimensions whose product overflows 64 bits.
                "overflowing_dims.safetensors",
                with_good(vec![
                    up(UNET_Q, &[64, 4]),
                    t(
                        format!("{UNET_Q}.lora_down.weight"),
                        &[4, 1 << 40, 1 << 40, 0],
                        vec![],
                    ),
                ]),
                &["overflowing_dims"],
            ),
            (
                // No values, but sides whose strides overflow 64 bits (a panic in candle
                // with overflow checks on, found by the lora fuzz target).
                "empty_with_huge_sides.safetensors",
                with_good(vec![
                    up(UNET_Q, &[64, 4]),
                    t(
                        format!("{UNET_Q}.lora_down.weight"),
                        &[0, 1 << 40, 1 << 40],
                        vec![],
                    ),
                ]),
                &["multiply past 64 bits"],
            ),
            (
                "empty_with_huge_sides_pickle.pt",
                empty_huge_pickle(),
                &["reaches past its storage"],
            ),
            (
                "tucker_core_3d.safetensors",
                with_good(vec![
                    up(UNET_CONV, &[32, 4, 1, 1]),
                    down(UNET_CONV, &[4, 32, 1, 1]),
                    part(UNET_CONV, "lora_mid.weight", &[4, 4, 9]),
                ]),
                &["lora_mid is 3-D [4, 4, 9]"],
            ),
            (
                "tucker_core_wrong_ranks.safetensors",
                with_good(vec![
                    up(UNET_CONV, &[32, 4, 1, 1]),
                    down(UNET_CONV, &[4, 32, 1, 1]),
                    part(UNET_CONV, "lora_mid.weight", &[5, 4, 3, 3]),
                ]),
                &["Tucker core [5, 4, 3, 3] does not fit"],
            ),
            (
                // 2¹⁶ × 2¹⁶ floats (16 GiB) from a 512 KiB file, were w1 built before its
                // size is checked.
                "lokr_factor_bomb.safetensors",
                with_good(vec![
                    part(UNET_Q, "lokr_w1_a", &[1 << 16, 1]),
                    part(UNET_Q, "lokr_w1_b", &[1, 1 << 16]),
                    part(UNET_Q, "lokr_w2", &[1, 1]),
                ]),
                &["the change is [4294967296, 1]", "[64, 64]"],
            ),
            (
                "lokr_wrong_kronecker_size.safetensors",
                with_good(vec![
                    part(UNET_Q, "lokr_w1", &[4, 4]),
                    part(UNET_Q, "lokr_w2", &[4, 4]),
                ]),
                &["the change is [16, 16]", "[64, 64]"],
            ),
            (
                "lokr_tucker_wrong_ranks.safetensors",
                with_good(vec![
                    part(UNET_CONV, "lokr_w1", &[4, 4]),
                    part(UNET_CONV, "lokr_w2_a", &[2, 8]),
                    part(UNET_CONV, "lokr_w2_b", &[3, 8]),
                    part(UNET_CONV, "lokr_t2", &[2, 2, 3, 3]),
                ]),
                &["Tucker core [2, 2, 3, 3] does not fit"],
            ),
            (
                "loha_wrong_size.safetensors",
                with_good(vec![
                    part(UNET_Q, "hada_w1_a", &[64, 2]),
                    part(UNET_Q, "hada_w1_b", &[2, 64]),
                    part(UNET_Q, "hada_w2_a", &[64, 2]),
                    part(UNET_Q, "hada_w2_b", &[2, 63]),
                ]),
                &["the change is [64, 63]"],
            ),
            (
                "loha_tucker_core_5d.safetensors",
                with_good(vec![
                    part(UNET_CONV, "hada_w1_a", &[2, 32]),
                    part(UNET_CONV, "hada_w1_b", &[2, 32]),
                    part(UNET_CONV, "hada_w2_a", &[2, 32]),
                    part(UNET_CONV, "hada_w2_b", &[2, 32]),
                    part(UNET_CONV, "hada_t1", &[2, 2, 3, 3, 1]),
                    part(UNET_CONV, "hada_t2", &[2, 2, 3, 3]),
                ]),
                &["hada_t1 is 5-D"],
            ),
            (
                "diff_wrong_size.safetensors",
                with_good(vec![part(UNET_Q, "diff", &[63, 64])]),
                &["the change is [63, 64]"],
            ),
            (
                "diff_b_wrong_size.safetensors",
                with_good(vec![
                    part(UNET_Q, "diff", &[64, 64]),
                    part(UNET_CONV, "diff_b", &[31]),
                ]),
                &["the bias change is [31]"],
            ),
        ],
    );
}

#[test]
fn bad_alphas_and_non_finite_values_are_refused_not_merged() {
    let layer = |alpha: T, up_values: Option<Vec<f32>>| {
        with_good(vec![
            t(
                format!("{UNET_Q}.lora_up.weight"),
                &[64, 2],
                up_values.unwrap_or_else(|| ramp(128)),
            ),
            t(format!("{UNET_Q}.lora_down.weight"), &[2, 64], ramp(128)),
            alpha,
        ])
    };
    let alpha = |shape: &[u64], values: Vec<f32>| t(format!("{UNET_Q}.alpha"), shape, values);
    let mut nan_up = ramp(128);
    nan_up[77] = f32::NAN;
    refuse_each(
        "alphas",
        vec![
            (
                "alpha_of_two_values.safetensors",
                layer(alpha(&[2], vec![1.0, 2.0]), None),
                &["alpha holds 2 values, not one"],
            ),
            (
                "alpha_nan.safetensors",
                layer(alpha(&[], vec![f32::NAN]), None),
                &[".alpha holds NaN or infinite values"],
            ),
            (
                "alpha_inf.safetensors",
                layer(alpha(&[], vec![f32::INFINITY]), None),
                &[".alpha holds NaN or infinite values"],
            ),
            (
                "weight_nan.safetensors",
                layer(alpha(&[], vec![1.0]), Some(nan_up)),
                &["lora_up.weight holds NaN or infinite values"],
            ),
            (
                // Finite, but alpha / rank times the weights overflows f32.
                "alpha_huge.safetensors",
                layer(alpha(&[], vec![3e38]), Some(vec![1e30; 128])),
                &["NaN or infinite", "too large an alpha"],
            ),
        ],
    );
    // A finite multiplier that makes a finite change overflow.
    let dir = folder("multiplier");
    let big = safetensors(&[t(format!("{UNET_Q}.diff"), &[64, 64], vec![1e30; 4096])]);
    std::fs::write(dir.join("big.safetensors"), big).unwrap();
    let sd = model(&dir);
    refused(
        &sd,
        "<lora:big:1e10>",
        &["big.safetensors", "NaN or infinite"],
    );
    assert_baseline(&sd, "a multiplier of 1e10");
}

/// A torch zip state dict of float32 `tensors` (name, shape, values) and `extra` entries.
fn torch_lora(tensors: &[(&str, &[i64], Vec<f32>)], extra: impl FnOnce(&mut Pickle)) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b'}').op(b'(');
    let mut storages = Vec::new();
    for (i, (name, shape, values)) in tensors.iter().enumerate() {
        let mut stride = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        let spec = TensorSpec {
            class: "FloatStorage",
            key: i.to_string(),
            numel: values.len() as i64,
            offset: 0,
            shape: shape.to_vec(),
            stride,
        };
        p.str(name).tensor(&spec);
        storages.push((i.to_string(), f32_bytes(values)));
    }
    extra(&mut p);
    let pickle = p.op(b'u').finish();
    let storages: Vec<(&str, &[u8])> = storages
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    torch_zip(&pickle, &storages)
}

#[test]
fn broken_lora_files_are_refused_with_their_name() {
    let good = with_good(vec![]);
    let checkpoint = std::fs::read(common::fixtures().join("tiny-sd1.safetensors")).unwrap();
    let up = format!("{UNET_Q}.lora_up.weight");
    let down = format!("{UNET_Q}.lora_down.weight");
    let alpha = format!("{UNET_Q}.alpha");
    // `alpha` as a string, beside good up and down: the reader says which entry it is.
    let pickle_with_text = torch_lora(
        &[(&up, &[64, 2], ramp(128)), (&down, &[2, 64], ramp(128))],
        |p| {
            p.str(&alpha).str("four");
        },
    );
    let pickle_nan = torch_lora(
        &[
            (&up, &[64, 2], vec![f32::NAN; 128]),
            (&down, &[2, 64], ramp(128)),
        ],
        |_| {},
    );
    // A state dict's values that are no tensors are passed over (checkpoints hold step counts
    // and names beside their tensors), `alpha` included: the LoRA merges at scale 1.
    let dir = folder("text_alpha");
    std::fs::write(dir.join("text_alpha.pt"), pickle_with_text).unwrap();
    let sd = model(&dir);
    let mut req = base_request();
    req.prompt = format!("{} <lora:text_alpha:1>", req.prompt);
    let image = run(&sd, &req).expect("a pickle with a text alpha");
    assert_ne!(image, common::reference_image("lora/base.png"));
    assert_baseline(&sd, "a pickle with a text alpha");

    refuse_each(
        "broken",
        vec![
            (
                "no_known_keys.safetensors",
                safetensors(&[t("model.foo.weight", &[2], vec![1.0, 2.0])]),
                &["changes no layer of this model", "model.foo.weight"],
            ),
            (
                "no_tensors.safetensors",
                safetensors(&[]),
                &["changes no layer of this model"],
            ),
            ("empty.safetensors", Vec::new(), &[]),
            (
                "truncated.safetensors",
                good[..good.len() / 2].to_vec(),
                &[],
            ),
            ("header_only.safetensors", good[..12].to_vec(), &[]),
            (
                "nan_pickle.pt",
                pickle_nan,
                &["lora_up.weight holds NaN or infinite values"],
            ),
            (
                // A whole checkpoint (hundreds of tensors) named like a LoRA.
                "a_checkpoint.safetensors",
                checkpoint,
                &["changes no layer of this model"],
            ),
        ],
    );
}

#[test]
fn lora_tags_reach_only_the_folders_files() {
    let root = folder("tags");
    let dir = root.join("inner");
    std::fs::create_dir_all(&dir).unwrap();
    let locon = common::fixtures().join("lora/kohya_locon.safetensors");
    // Real LoRAs beside the folder and above it: no tag may reach them.
    std::fs::copy(&locon, root.join("outside.safetensors")).unwrap();
    std::fs::copy(&locon, dir.join("狐_λ.safetensors")).unwrap();
    let sd = model(&dir);
    for tag in [
        "<lora:../outside:1>",
        "<lora:../outside.safetensors:1>",
        "<lora:../../loras/outside:1>",
        "<lora:/etc/passwd:1>",
        "<lora:../../../../../../etc/passwd:1>",
        "<lora:..\\outside:1>",
        "<lora:inner/../../outside:1>",
        "<lora:.:1>",
        "<lora:..:1>",
    ] {
        refused(&sd, tag, &["no LoRA called"]);
    }
    assert_baseline(&sd, "names with path separators");

    // Unicode names: found when spelled right, close names offered when not, no panic on
    // combining marks, right-to-left overrides or a name cut inside a character.
    let image = run(
        &sd,
        &GenerationRequest {
            prompt: format!("{} <lora:狐_λ:1>", base_request().prompt),
            ..base_request()
        },
    )
    .expect("a unicode name");
    assert_ne!(image, common::reference_image("lora/base.png"));
    refused(&sd, "<lora:狐_μ:1>", &["狐_μ", "close names: 狐_λ"]);
    for tag in [
        "<lora:\u{202e}λ_狐:1>",
        "<lora:狐\u{301}\u{301}_λ:1>",
        "<lora:🦊:1>",
    ] {
        refused(&sd, tag, &["no LoRA called"]);
    }
    assert_baseline(&sd, "unicode names");

    // One tag too many, in the prompt or across both prompts.
    let tags = |n: usize| "<lora:狐_λ:0.01>".repeat(n);
    refused(&sd, &tags(MAX_LORAS + 1), &["MAX_LORAS"]);
    let mut req = base_request();
    req.prompt = format!("{} {}", req.prompt, tags(MAX_LORAS / 2 + 1));
    req.negative_prompt = format!("{} {}", req.negative_prompt, tags(MAX_LORAS / 2));
    let err = run(&sd, &req).expect_err("33 tags").to_string();
    assert!(err.contains("MAX_LORAS"), "{err}");
    assert_baseline(&sd, "too many tags");
}
