//! The tokenizer against transformers' `CLIPTokenizer` ids, written by
//! `tools/tokenizer_reference.py` into `tests/fixtures/tokenizer/corpus.json`.

use std::path::PathBuf;

use sdrs::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Corpus {
    source: String,
    max_len: usize,
    pad: u32,
    prompts: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    text: String,
    ids: Vec<u32>,
    padded: Vec<u32>,
}

fn corpus() -> Corpus {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer/corpus.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Token strings around `pos`, to show what differs.
fn context(tok: &Tokenizer, ids: &[u32], pos: usize) -> String {
    let from = pos.saturating_sub(2);
    let to = (pos + 3).min(ids.len());
    let shown: Vec<String> = ids[from..to]
        .iter()
        .map(|&id| format!("{id} {:?}", tok.token(id).unwrap_or("?")))
        .collect();
    format!("[{from}..{to}] {}", shown.join(", "))
}

/// Fails with the prompt, the first differing position and the tokens around it on both sides.
fn assert_same_ids(tok: &Tokenizer, what: &str, text: &str, expected: &[u32], got: &[u32]) {
    let Some(pos) = (0..expected.len().max(got.len())).find(|&i| expected.get(i) != got.get(i))
    else {
        return;
    };
    panic!(
        "{what} of {text:?} differs at position {pos} (lengths: expected {}, got {})\n  expected {}\n  got      {}",
        expected.len(),
        got.len(),
        context(tok, expected, pos),
        context(tok, got, pos),
    );
}

#[test]
fn encode_matches_transformers_on_corpus() {
    let tok = Tokenizer::new().unwrap();
    let corpus = corpus();
    assert!(
        corpus.prompts.len() >= 300,
        "corpus from {} too small",
        corpus.source
    );
    for entry in &corpus.prompts {
        assert_same_ids(
            &tok,
            "encode",
            &entry.text,
            &entry.ids,
            &tok.encode(&entry.text),
        );
    }
}

#[test]
fn encode_padded_matches_transformers_max_length_padding_on_corpus() {
    let tok = Tokenizer::new().unwrap();
    let corpus = corpus();
    for entry in &corpus.prompts {
        let got = tok.encode_padded(&entry.text, corpus.max_len, corpus.pad);
        assert_same_ids(&tok, "encode_padded", &entry.text, &entry.padded, &got);
    }
}

#[test]
fn cached_words_encode_the_same_as_fresh_ones() {
    let tok = Tokenizer::new().unwrap();
    let corpus = corpus();
    // The first pass fills the word cache; the second reads from it.
    for entry in &corpus.prompts {
        tok.encode(&entry.text);
    }
    for entry in &corpus.prompts {
        assert_same_ids(
            &tok,
            "cached encode",
            &entry.text,
            &entry.ids,
            &tok.encode(&entry.text),
        );
    }
}

/// Every Unicode scalar value, through a probe string that shows its class, NFC and lowercase.
/// Slow and needs a 110 MB file; run:
/// `/opt/venv/bin/python tools/tokenizer_reference.py --codepoints /tmp/codepoints.txt &&
///  SDRS_CODEPOINTS=/tmp/codepoints.txt cargo test -p sdrs --release --test it tokenizer:: -- --ignored`
#[test]
#[ignore]
fn every_codepoint_matches_reference() {
    let path = std::env::var("SDRS_CODEPOINTS").expect("SDRS_CODEPOINTS names the probe file");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let tok = Tokenizer::new().unwrap();
    let mut mismatches = Vec::new();
    for line in text.lines() {
        let mut fields = line.split(' ');
        let cp = u32::from_str_radix(fields.next().unwrap_or(""), 16).expect("hex codepoint");
        let expected: Vec<u32> = fields.map(|f| f.parse().expect("token id")).collect();
        let c = char::from_u32(cp).expect("scalar value");
        // Must stay the same as `codepoint_probe` in tools/tokenizer_reference.py.
        let probe = format!("A{c}b{c}{c}1{c}.{c}");
        let got = tok.encode(&probe);
        if got != expected {
            mismatches.push(format!("U+{cp:04X} (expected {expected:?}, got {got:?})"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} codepoints differ: {}",
        mismatches.len(),
        mismatches.join(" ")
    );
}
