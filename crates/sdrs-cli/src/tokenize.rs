//! `sdrs tokenize`: the CLIP token ids of a prompt and how the prompt language reads it, as JSON;
//! its `<lora:…>` tags (taken out first, as generation does) listed apart.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sdrs::embeddings::Embeddings;
use sdrs::prompt::{report, EditClock, EditTimeline, PromptSyntax, CHUNK_TOKENS};
use sdrs::tokenizer::{Tokenizer, EOS};

/// Arguments of `sdrs tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// The prompt to tokenize.
    prompt: String,
    /// How to read the prompt: auto, a1111, optimized, plain.
    #[arg(long = "prompt-syntax", default_value = "auto")]
    prompt_syntax: PromptSyntax,
    /// Sampling steps, for the texts prompt editing gives each step.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// How `when` in [from:to:when] is read: current (A1111 ≥ 1.6) or old.
    #[arg(long = "edit-timeline", default_value = "current")]
    edit_timeline: EditTimeline,
    /// A folder of textual-inversion embeddings whose names the report shows as embeddings.
    #[arg(long = "embeddings-dir", value_name = "DIR")]
    embeddings_dir: Option<PathBuf>,
    /// The text encoder width the embeddings must have: 768 (SD 1), 1024 (SD 2).
    #[arg(long = "embeddings-width", default_value_t = 768)]
    embeddings_width: usize,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = Tokenizer::new()?;
    // `<lora:…>` and the other extra-network tags come out first, as generation takes them
    // out: the text encoder never sees them.
    let stripped = sdrs::lora::strip_tags("prompt", &args.prompt)?;
    let text = stripped.text.as_str();
    let ids = tokenizer.encode(text);
    let tokens: Vec<&str> = ids
        .iter()
        .map(|&id| tokenizer.token(id).unwrap_or(""))
        .collect();
    let beyond_first_chunk = (ids.len() > CHUNK_TOKENS).then(|| {
        tokens[CHUNK_TOKENS..]
            .concat()
            .replace("</w>", " ")
            .trim_end()
            .to_string()
    });
    let embeddings = match &args.embeddings_dir {
        Some(dir) => Embeddings::load_dir(dir, &tokenizer, args.embeddings_width)
            .with_context(|| format!("loading embeddings from {}", dir.display()))?,
        None => Embeddings::default(),
    };
    let parsed = report(
        &tokenizer,
        &embeddings,
        text,
        args.prompt_syntax,
        EditClock::new(args.steps, args.edit_timeline),
        EOS,
    )?;
    let out = serde_json::json!({
        "prompt": args.prompt,
        "text": text,
        "loras": stripped.loras,
        "ignored_tags": stripped.ignored,
        "ids": ids,
        "tokens": tokens,
        "count": ids.len(),
        "chunk_size": CHUNK_TOKENS,
        "fits_one_chunk": ids.len() <= CHUNK_TOKENS,
        "beyond_first_chunk": beyond_first_chunk,
        "parsed": parsed,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
