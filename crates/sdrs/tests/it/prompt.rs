//! Prompt conditioning against `tools/make_prompt_fixtures.py` (A1111's chunking and emphasis,
//! optimizedSD's blend, over the tiny CLIP), plus the documented parse vectors.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs::embeddings::Embeddings;
use sdrs::models::clip::{ClipConfig, ClipTextTransformer};
use sdrs::prompt::{
    chunks, encode_batch, encode_blend, parse_attention, plan, report, EditClock, EditTimeline,
    EmbeddingFix, EncoderOutput, PromptSyntax,
};
use sdrs::tokenizer::{Tokenizer, EOS};
use serde_json::Value;

fn load_clip() -> ClipTextTransformer {
    let dir = common::fixtures().join("tiny-sd1/text_encoder");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg: ClipConfig = serde_json::from_str(&config).expect("CLIP config");
    let weights = dir.join("model.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .expect("weights");
    ClipTextTransformer::new(vb, &cfg).expect("model")
}

/// The tiny CLIP's last hidden state through the fixed per-channel affine map of
/// `tools/make_prompt_fixtures.py` (`1 + (i mod 5)/8`, `((i mod 7) − 2)/16`), which gives the
/// output the non-zero mean that A1111's emphasis restores (the tiny model's averages to ~0).
fn text_encoder(
    model: &ClipTextTransformer,
) -> impl FnMut(&Tensor, &[EmbeddingFix]) -> sdrs::Result<EncoderOutput> + '_ {
    let hidden = 32;
    let scale: Vec<f32> = (0..hidden).map(|i| 1.0 + (i % 5) as f32 / 8.0).collect();
    let shift: Vec<f32> = (0..hidden).map(|i| ((i % 7) as f32 - 2.0) / 16.0).collect();
    let scale = Tensor::from_vec(scale, (1, 1, hidden), &Device::Cpu).unwrap();
    let shift = Tensor::from_vec(shift, (1, 1, hidden), &Device::Cpu).unwrap();
    move |ids: &Tensor, _: &[EmbeddingFix]| {
        let z = model.forward(ids, 1)?;
        Ok(z.broadcast_mul(&scale)?.broadcast_add(&shift)?.into())
    }
}

/// Compares with the reference and prints the relative error, for the record.
fn check(what: &str, got: &Tensor, want: &Tensor) {
    common::assert_close(what, got, want, 1e-5);
    let rel = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let err = rel((got - want).unwrap()) / rel(want.clone());
    println!(
        "{what}: {:?}, max error {err:.2e} of the output scale",
        got.dims()
    );
}

fn cases(kind: &str) -> Vec<Value> {
    let json = common::reference_json("prompt.json");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect()
}

fn syntax_of(case: &Value) -> PromptSyntax {
    case["syntax"]
        .as_str()
        .expect("syntax")
        .parse()
        .expect("syntax name")
}

fn pad_of(case: &Value) -> u32 {
    case["pad"].as_u64().expect("pad") as u32
}

#[test]
fn chunks_match_a1111_tokenize_line() {
    let tokenizer = Tokenizer::new().unwrap();
    for case in cases("encode") {
        let name = case["name"].as_str().unwrap();
        for (text, want) in case["texts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["chunks"].as_array().unwrap())
        {
            let got = chunks(
                &tokenizer,
                &Embeddings::default(),
                text.as_str().unwrap(),
                syntax_of(&case),
                pad_of(&case),
            )
            .unwrap();
            let want = want.as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{name}: chunk count");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let ids: Vec<u32> = w["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                let weights: Vec<f32> = w["weights"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(g.ids, ids, "{name} chunk {i}: ids");
                assert_eq!(g.weights, weights, "{name} chunk {i}: weights");
            }
        }
    }
}

#[test]
fn weighted_long_break_and_batched_conditioning_match_a1111() {
    let tokenizer = Tokenizer::new().unwrap();
    let model = load_clip();
    let reference = common::reference("prompt.safetensors");
    let mut encoder = text_encoder(&model);
    let encode_cases = cases("encode");
    assert!(encode_cases.len() >= 6);
    for case in encode_cases {
        let name = case["name"].as_str().unwrap();
        let texts: Vec<&str> = case["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let got = encode_batch(
            &tokenizer,
            &Embeddings::default(),
            &texts,
            syntax_of(&case),
            pad_of(&case),
            &mut encoder,
        )
        .unwrap();
        for (i, z) in got.iter().enumerate() {
            check(
                &format!("{name}.{i}"),
                &z.context,
                &reference[&format!("{name}.{i}")],
            );
        }
    }
}

#[test]
fn blended_conditioning_matches_optimized_sd() {
    let tokenizer = Tokenizer::new().unwrap();
    let model = load_clip();
    let reference = common::reference("prompt.safetensors");
    let mut encoder = text_encoder(&model);
    for case in cases("blend") {
        let name = case["name"].as_str().unwrap();
        let syntax = syntax_of(&case);
        let plan = plan(case["text"].as_str().unwrap(), syntax, 20).unwrap();
        assert_eq!(plan.parts.len(), 1, "{name}");
        let blend = &plan.parts[0].edits[0].blend;
        let want: Vec<(String, f32)> = case["blend"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_f64().unwrap() as f32,
                )
            })
            .collect();
        assert_eq!(blend, &want, "{name}: sub-prompts and normalised weights");
        let z = encode_blend(
            &tokenizer,
            &Embeddings::default(),
            blend,
            syntax,
            pad_of(&case),
            &mut encoder,
        )
        .unwrap();
        check(name, &z.context, &reference[name]);
        // A short blend without emphasis reads the same in Auto as in optimizedSD.
        if name == "blend" {
            let auto = encode_blend(
                &tokenizer,
                &Embeddings::default(),
                blend,
                PromptSyntax::Auto,
                EOS,
                &mut encoder,
            )
            .unwrap();
            check("blend (auto)", &auto.context, &reference[name]);
        }
    }
}

// DESIGN.md §6: the emphasis vector.
#[test]
fn design_emphasis_vector() {
    let got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).").unwrap();
    let want = [
        ("a ", 1.0),
        ("house", 1.573),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641),
        (".", 1.1),
    ];
    assert_eq!(got.len(), want.len());
    for ((text, w), (want_text, want_w)) in got.iter().zip(want) {
        assert_eq!(text, want_text);
        assert!((w - want_w).abs() < 1e-12, "{text}: {w} vs {want_w}");
    }
}

// DESIGN.md §6: the optimizedSD vector, through the Auto rule.
#[test]
fn design_blend_vector() {
    let plan = plan(
        "tabby cat:0.25 white duck:0.75 hybrid",
        PromptSyntax::Auto,
        20,
    )
    .unwrap();
    let blend = &plan.parts[0].edits[0].blend;
    assert_eq!(
        blend,
        &vec![
            ("tabby cat".to_string(), 0.125),
            ("white duck".to_string(), 0.375),
            ("hybrid".to_string(), 0.5),
        ]
    );
}

#[test]
fn report_shows_chunks_and_schedule() {
    let tokenizer = Tokenizer::new().unwrap();
    let r = report(
        &tokenizer,
        &Embeddings::default(),
        "a (cat:1.2) BREAK [dog:bird:0.5] AND sky:0.3",
        PromptSyntax::Auto,
        EditClock::new(10, EditTimeline::Current),
        EOS,
    )
    .unwrap();
    assert_eq!(r.reading, "a1111");
    assert_eq!(r.parts.len(), 2);
    assert_eq!(r.parts[1].weight, 0.3);
    let first = &r.parts[0];
    assert_eq!(
        first.edits.iter().map(|s| s.until_step).collect::<Vec<_>>(),
        [5, 10]
    );
    let text = &first.edits[0].texts[0];
    assert_eq!(text.chunks.len(), 2);
    let tokens: Vec<(&str, f32)> = text.chunks[0]
        .tokens
        .iter()
        .map(|t| (t.token.as_str(), t.weight))
        .collect();
    assert_eq!(tokens, [("a</w>", 1.0), ("cat</w>", 1.2)]);
    assert_eq!(text.chunks[0].padding, 73);
    assert_eq!(text.chunks[1].tokens[0].token, "dog</w>");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["syntax"], "auto");
}
