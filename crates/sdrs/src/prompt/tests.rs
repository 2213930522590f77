//! The plan: AND, blends, and the decisions of the Auto rule.

use super::*;
use crate::embeddings::Embeddings;

fn blend_of(plan: &PromptPlan) -> Vec<(String, f32)> {
    assert_eq!(plan.parts.len(), 1);
    assert_eq!(plan.parts[0].edits.len(), 1);
    plan.parts[0].edits[0].blend.clone()
}

fn b(pairs: &[(&str, f32)]) -> Vec<(String, f32)> {
    pairs.iter().map(|(t, w)| (t.to_string(), *w)).collect()
}

fn s(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|(t, w)| (t.to_string(), *w)).collect()
}

// DESIGN.md §6 and optimizedSD's `split_weighted_subprompts`.
#[test]
fn optimized_split_design_vector_and_quirks() {
    assert_eq!(
        split_weighted_subprompts("tabby cat:0.25 white duck:0.75 hybrid"),
        s(&[("tabby cat", 0.25), ("white duck", 0.75), ("hybrid", 1.0)])
    );
    assert_eq!(
        split_weighted_subprompts("cute dog:0.95 cyborg:0.85 hybrid character"),
        s(&[
            ("cute dog", 0.95),
            ("cyborg", 0.85),
            ("hybrid character", 1.0)
        ])
    );
    // An empty weight (the colon is followed by a space) is 1; the space is eaten.
    assert_eq!(
        split_weighted_subprompts("a cat : 2 dog"),
        s(&[("a cat ", 1.0), ("2 dog", 1.0)])
    );
    // A weight that is not a number is 1, and its word is lost.
    assert_eq!(
        split_weighted_subprompts("cat:big dog"),
        s(&[("cat", 1.0), ("dog", 1.0)])
    );
    assert_eq!(split_weighted_subprompts("x:"), s(&[("x", 1.0)]));
    assert_eq!(split_weighted_subprompts(""), s(&[]));
    assert_eq!(
        split_weighted_subprompts("a:-1 b:2"),
        s(&[("a", -1.0), ("b", 2.0)])
    );
}

#[test]
fn optimized_plan_normalises_and_keeps_single_prompts_as_typed() {
    let plan = plan(
        "tabby cat:0.25 white duck:0.75 hybrid",
        PromptSyntax::Optimized,
        20,
    )
    .unwrap();
    assert_eq!(
        blend_of(&plan),
        b(&[("tabby cat", 0.125), ("white duck", 0.375), ("hybrid", 0.5)])
    );
    // One sub-prompt: optimizedSD encodes the prompt exactly as typed.
    for text in ["x:", "a cat:2", "no colon"] {
        let plan = super::plan(text, PromptSyntax::Optimized, 20).unwrap();
        assert_eq!(blend_of(&plan), b(&[(text, 1.0)]));
    }
    let plan = super::plan("a:-1 b:3", PromptSyntax::Optimized, 20).unwrap();
    assert_eq!(blend_of(&plan), b(&[("a", -0.5), ("b", 1.5)]));
}

#[test]
fn zero_total_weight_is_an_invalid_request() {
    for syntax in [PromptSyntax::Optimized, PromptSyntax::Auto] {
        let err = plan("a:1 b:-1", syntax, 20).expect_err("zero total");
        assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
        assert!(err.to_string().contains("sum to 0"), "{err}");
    }
}

#[test]
fn auto_reads_documented_optimized_blends() {
    let plan = plan(
        "cute dog:0.95 cyborg:0.85 hybrid character",
        PromptSyntax::Auto,
        20,
    )
    .unwrap();
    let total = 0.95 + 0.85 + 1.0;
    assert_eq!(
        blend_of(&plan),
        vec![
            ("cute dog".to_string(), (0.95 / total) as f32),
            ("cyborg".to_string(), (0.85 / total) as f32),
            ("hybrid character".to_string(), (1.0 / total) as f32),
        ]
    );
    let plan = super::plan("a:-1 b:2", PromptSyntax::Auto, 20).unwrap();
    assert_eq!(blend_of(&plan), b(&[("a", -1.0), ("b", 2.0)]));
}

#[test]
fn auto_keeps_a1111_colons_and_treats_other_colons_as_text() {
    for text in [
        "a (house:1.3) on a hill",
        "a [cat:dog:0.5] on a hill",
        r"\(a:0.5\) b",
        "cat:big dog",
        "a cat : 2 dog",
        "x:",
        "cat:0.5, dog",
        "(a cat:0.5 dog:0.5 x",
    ] {
        let plan = plan(text, PromptSyntax::Auto, 20).unwrap();
        assert_eq!(plan.parts.len(), 1, "{text}");
        assert_eq!(plan.parts[0].weight, 1.0, "{text}");
        for entry in &plan.parts[0].edits {
            assert_eq!(entry.blend.len(), 1, "{text}");
            assert_eq!(entry.blend[0].1, 1.0, "{text}");
        }
    }
    // An escaped bracket does not hide a blend colon.
    let plan = plan(r"\(a:0.5 b", PromptSyntax::Auto, 20).unwrap();
    assert_eq!(blend_of(&plan), b(&[(r"\(a", 1.0 / 3.0), ("b", 2.0 / 3.0)]));
}

#[test]
fn auto_single_trailing_weight_is_a1111_part_weight() {
    // As in A1111, a trailing `:number` is the part's weight even after other colons.
    let time = plan("time: 5:30", PromptSyntax::Auto, 20).unwrap();
    assert_eq!(time.parts[0].weight, 30.0);
    assert_eq!(time.parts[0].edits[0].blend, b(&[("time: 5", 1.0)]));
    for text in ["a cat:1.5", "a cat :1.5 ", "a cat: 1.5"] {
        let plan = plan(text, PromptSyntax::Auto, 20).unwrap();
        assert_eq!(plan.parts.len(), 1);
        assert_eq!(plan.parts[0].weight, 1.5, "{text}");
        assert_eq!(plan.parts[0].edits[0].blend, b(&[("a cat", 1.0)]), "{text}");
    }
}

#[test]
fn and_parts_take_their_trailing_weights() {
    for syntax in [PromptSyntax::Auto, PromptSyntax::A1111] {
        let plan = plan("a cat:0.5 dog :1.2 AND a bird AND sky: -0.7", syntax, 20).unwrap();
        let parts: Vec<(f32, String)> = plan
            .parts
            .iter()
            .map(|p| (p.weight, p.edits[0].blend[0].0.clone()))
            .collect();
        assert_eq!(
            parts,
            vec![
                (1.2, "a cat:0.5 dog".to_string()),
                (1.0, " a bird".to_string()),
                (-0.7, " sky".to_string()),
            ]
        );
    }
    // `AND` must be a word; `ANDROID` is text.
    let plan = plan("ANDROID:0.5 robot:0.5", PromptSyntax::Auto, 20).unwrap();
    assert_eq!(blend_of(&plan), b(&[("ANDROID", 0.5), ("robot", 0.5)]));
}

#[test]
fn forced_a1111_never_blends_and_plain_reads_nothing() {
    let plan = plan(
        "tabby cat:0.25 white duck:0.75 hybrid",
        PromptSyntax::A1111,
        20,
    )
    .unwrap();
    assert_eq!(plan.parts[0].weight, 1.0);
    assert_eq!(
        plan.parts[0].edits[0].blend,
        b(&[("tabby cat:0.25 white duck:0.75 hybrid", 1.0)])
    );
    let text = "a [cat:dog:5] AND b:0.5";
    let plan = super::plan(text, PromptSyntax::Plain, 20).unwrap();
    assert_eq!(blend_of(&plan), b(&[(text, 1.0)]));
}

#[test]
fn blends_edit_at_the_union_of_their_sub_prompts_steps() {
    let plan = plan(
        "a [cat:dog:5]:1 b [x|y]:3 c [p:q:0.5]:0",
        PromptSyntax::Auto,
        4,
    )
    .unwrap();
    let part = &plan.parts[0];
    let steps: Vec<usize> = part.edits.iter().map(|s| s.until_step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(
        part.edits[1].blend,
        b(&[("a cat", 0.25), ("b y", 0.75), ("c p", 0.0)])
    );
    assert_eq!(
        part.edits[2].blend,
        b(&[("a cat", 0.25), ("b x", 0.75), ("c q", 0.0)])
    );
}

#[test]
fn at_step_follows_a1111_end_at_step() {
    let plan = plan("a [b:3]", PromptSyntax::A1111, 10).unwrap();
    let part = &plan.parts[0];
    let texts: Vec<&str> = (0..10)
        .map(|s| part.at_step(s).blend[0].0.as_str())
        .collect();
    assert_eq!(
        texts,
        ["a ", "a ", "a ", "a ", "a b", "a b", "a b", "a b", "a b", "a b"]
    );
}

#[test]
fn syntax_names_round_trip() {
    for name in PromptSyntax::NAMES {
        let syntax: PromptSyntax = name.parse().unwrap();
        assert_eq!(syntax.to_string(), name);
        assert_eq!(
            serde_json::to_string(&syntax).unwrap(),
            format!("\"{name}\"")
        );
    }
    assert_eq!(PromptSyntax::default(), PromptSyntax::Auto);
    assert!("compel".parse::<PromptSyntax>().is_err());
    assert!(plan("a", PromptSyntax::Auto, 0).is_err());
}

#[test]
fn deep_nesting_is_refused_by_name_and_the_limit_itself_parses() {
    for opener in ["(", "["] {
        let deep = format!("{}x", opener.repeat(40_000));
        for syntax in [PromptSyntax::Auto, PromptSyntax::A1111] {
            let err = plan(&deep, syntax, 20).unwrap_err().to_string();
            assert!(
                err.contains("MAX_PROMPT_NESTING") && err.contains("40000"),
                "{err}"
            );
        }
        let err = parse_attention(&deep).unwrap_err().to_string();
        assert!(err.contains("MAX_PROMPT_NESTING"), "{err}");
        let err = prompt_edits(&deep, 20).unwrap_err().to_string();
        assert!(err.contains("MAX_PROMPT_NESTING"), "{err}");
    }
    // At the limit both parsers run: emphasis multiplies, editing nests.
    let n = crate::limits::MAX_PROMPT_NESTING;
    let at_limit = format!("{}x{}", "(".repeat(n), ")".repeat(n));
    let segments = parse_attention(&at_limit).unwrap();
    assert_eq!(segments.len(), 1);
    assert!((segments[0].1 - 1.1f64.powi(n as i32)).abs() < 1e-6 * segments[0].1);
    let edits = format!("{}x{}", "[a:".repeat(n), ":5]".repeat(n));
    assert_eq!(prompt_edits(&edits, 10).unwrap().len(), 2);
    // Escaped and closed brackets do not count.
    let flat = format!("{}{}", r"\(".repeat(1000), "(x)".repeat(1000));
    assert!(plan(&flat, PromptSyntax::Auto, 20).is_ok());
}

#[test]
fn too_many_parts_are_refused_by_name() {
    let parts = crate::limits::MAX_PROMPT_PARTS;
    let ok = vec!["cat"; parts].join(" AND ");
    assert_eq!(
        plan(&ok, PromptSyntax::Auto, 20).unwrap().parts.len(),
        parts
    );
    let many = vec!["cat"; parts + 1].join(" AND ");
    let err = plan(&many, PromptSyntax::Auto, 20).unwrap_err().to_string();
    assert!(err.contains("MAX_PROMPT_PARTS"), "{err}");
    let blend: String = (0..=parts).map(|i| format!("cat{i}:1 ")).collect();
    for syntax in [PromptSyntax::Auto, PromptSyntax::Optimized] {
        let err = plan(&blend, syntax, 20).unwrap_err().to_string();
        assert!(err.contains("MAX_PROMPT_PARTS"), "{syntax}: {err}");
    }
}

#[test]
fn long_prompts_are_capped_in_bytes_and_chunks() {
    let long = "a ".repeat(crate::limits::MAX_PROMPT_BYTES);
    let err = plan(&long, PromptSyntax::Auto, 20).unwrap_err().to_string();
    assert!(err.contains("MAX_PROMPT_BYTES"), "{err}");
    let tok = crate::tokenizer::Tokenizer::new().unwrap();
    let limit = crate::limits::MAX_PROMPT_CHUNKS;
    let fits = "cat ".repeat(CHUNK_TOKENS * limit);
    assert_eq!(
        chunks(&tok, &Embeddings::default(), &fits, PromptSyntax::A1111, 0)
            .unwrap()
            .len(),
        limit
    );
    let over = "cat ".repeat(CHUNK_TOKENS * limit + 1);
    let err = chunks(&tok, &Embeddings::default(), &over, PromptSyntax::A1111, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("MAX_PROMPT_CHUNKS"), "{err}");
    let breaks = "x BREAK ".repeat(limit + 1);
    assert!(chunks(
        &tok,
        &Embeddings::default(),
        &breaks,
        PromptSyntax::Plain,
        0
    )
    .is_ok());
    assert!(chunks(
        &tok,
        &Embeddings::default(),
        &breaks,
        PromptSyntax::A1111,
        0
    )
    .is_err());
}

#[test]
fn alternation_edits_every_step_once() {
    let prompt = "[a|b] ".repeat(5_000);
    let edits = prompt_edits(&prompt, 1000).unwrap();
    assert_eq!(edits.len(), 1000);
    assert!(edits[0].1.starts_with("a a") && edits[1].1.starts_with("b b"));
}
