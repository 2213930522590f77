//! `<lora:NAME:MULT>` in a prompt, read as A1111's extra-networks syntax reads it.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::limits::{exceeded, MAX_LORAS};
use crate::{Error, Result};

/// One `<lora:…>` (or `<lyco:…>`) tag: which LoRA, and how strongly it changes each network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraTag {
    /// The name as written: a file stem in the LoRA folder, or an alias its metadata gives.
    pub name: String,
    /// The multiplier of the text encoder's changes (A1111's `te`; 1 when not given).
    pub te: f32,
    /// The multiplier of the UNet's changes (A1111's `unet`; the text encoder's when not given).
    pub unet: f32,
    /// Only the first `dyn` ranks of plain LoRA layers (A1111's `dyn`).
    pub dyn_dim: Option<usize>,
}

/// A1111's `re_extra_net`: `<kind:args>`.
fn tag_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<(\w+):([^>]+)>").unwrap_or_else(|e| panic!("{e}")))
}

/// A prompt with its extra-network tags taken out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stripped {
    /// The text the text encoder sees: the prompt without any `<kind:…>` tag.
    pub text: String,
    /// The LoRA tags, in order.
    pub loras: Vec<LoraTag>,
    /// The kinds of the other tags (`hypernet`, …), removed as A1111 removes them, unused.
    pub ignored: Vec<String>,
}

/// Takes every `<kind:args>` tag out of `prompt`, as A1111 does before it reads anything else
/// (so a tag inside prompt editing applies for the whole run). `lora` and its alias `lyco`
/// become [`LoraTag`]s; other kinds are listed in [`Stripped::ignored`]. `what` names the
/// prompt in errors ("prompt", "negative prompt").
pub fn strip_tags(what: &str, prompt: &str) -> Result<Stripped> {
    let mut out = Stripped::default();
    let mut last = 0;
    for caps in tag_regex().captures_iter(prompt) {
        let (Some(whole), Some(kind), Some(args)) = (caps.get(0), caps.get(1), caps.get(2)) else {
            continue;
        };
        out.text.push_str(&prompt[last..whole.start()]);
        last = whole.end();
        match kind.as_str() {
            "lora" | "lyco" => {
                if out.loras.len() == MAX_LORAS {
                    return Err(exceeded(
                        format!("the LoRA tags of the {what}"),
                        MAX_LORAS + 1,
                        "MAX_LORAS",
                        MAX_LORAS,
                    ));
                }
                let tag = parse_args(args.as_str()).map_err(|why| {
                    Error::InvalidRequest(format!(
                        "the {what}'s {} at byte {}: {why}",
                        whole.as_str(),
                        whole.start()
                    ))
                })?;
                out.loras.push(tag);
            }
            other => out.ignored.push(other.to_string()),
        }
    }
    out.text.push_str(&prompt[last..]);
    Ok(out)
}

/// `name[:te[:unet[:dyn]]]` with `te=`, `unet=`, `dyn=` allowed anywhere (A1111's
/// `ExtraNetworkParams`: an item with exactly one `=` is named).
fn parse_args(args: &str) -> std::result::Result<LoraTag, String> {
    let mut positional = Vec::new();
    let mut named = Vec::new();
    for item in args.split(':') {
        match item.split_once('=') {
            Some((key, value)) if !value.contains('=') => named.push((key, value)),
            _ => positional.push(item),
        }
    }
    let name = positional
        .first()
        .filter(|n| !n.trim().is_empty())
        .ok_or("no LoRA name")?;
    let mut te = positional.get(1).map(|v| multiplier(v)).transpose()?;
    let mut unet = positional.get(2).map(|v| multiplier(v)).transpose()?;
    let mut dyn_dim = positional.get(3).map(|v| rank(v)).transpose()?;
    for (key, value) in named {
        match key {
            "te" => te = Some(multiplier(value)?),
            "unet" => unet = Some(multiplier(value)?),
            "dyn" => dyn_dim = Some(rank(value)?),
            other => return Err(format!("unknown option {other:?} (valid: te, unet, dyn)")),
        }
    }
    let te = te.unwrap_or(1.0);
    Ok(LoraTag {
        name: name.to_string(),
        te,
        unet: unet.unwrap_or(te),
        dyn_dim,
    })
}

/// A multiplier as Python's `float()` reads it, finite.
fn multiplier(text: &str) -> std::result::Result<f32, String> {
    let t = text.trim();
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() && v.abs() <= f32::MAX as f64 => Ok(v as f32),
        _ => Err(format!("{t:?} is not a finite number")),
    }
}

/// A rank for `dyn`: a positive integer.
fn rank(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    match t.parse::<usize>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(format!("dyn {t:?} is not a positive integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, te: f32, unet: f32) -> LoraTag {
        LoraTag {
            name: name.into(),
            te,
            unet,
            dyn_dim: None,
        }
    }

    #[test]
    fn positional_and_named_multipliers_follow_a1111() {
        let s = strip_tags(
            "prompt",
            "a <lora:one:0.5> cat, <lora:two:0.3:0.7> <lyco:three> <lora:four:unet=0.2:te=0.4>",
        )
        .unwrap();
        assert_eq!(s.text, "a  cat,   ");
        assert_eq!(
            s.loras,
            vec![
                tag("one", 0.5, 0.5),
                tag("two", 0.3, 0.7),
                tag("three", 1.0, 1.0),
                tag("four", 0.4, 0.2),
            ]
        );
        let d = strip_tags("prompt", "<lora:x:1:1:8>").unwrap();
        assert_eq!(d.loras[0].dyn_dim, Some(8));
    }

    #[test]
    fn other_kinds_are_removed_and_listed() {
        let s = strip_tags("prompt", "x <hypernet:h:1> y <lora:l:1>").unwrap();
        assert_eq!(s.text, "x  y ");
        assert_eq!(s.ignored, vec!["hypernet".to_string()]);
        assert_eq!(s.loras.len(), 1);
    }

    #[test]
    fn a_tag_inside_prompt_editing_leaves_the_edit() {
        let s = strip_tags("prompt", "[cat:<lora:l:1>dog:5]").unwrap();
        assert_eq!(s.text, "[cat:dog:5]");
        assert_eq!(s.loras, vec![tag("l", 1.0, 1.0)]);
    }

    #[test]
    fn bad_multipliers_say_where() {
        let e = strip_tags("negative prompt", "ab <lora:x:abc>").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("negative prompt"), "{msg}");
        assert!(msg.contains("byte 3"), "{msg}");
        assert!(msg.contains("\"abc\""), "{msg}");
        for bad in [
            "<lora:x:nan>",
            "<lora:x:inf>",
            "<lora::1>",
            "<lora:x:1:1:0>",
            "<lora:x:foo=1>",
        ] {
            assert!(strip_tags("prompt", bad).is_err(), "{bad}");
        }
        let many = "<lora:x:1>".repeat(MAX_LORAS + 1);
        assert!(strip_tags("prompt", &many).is_err());
    }

    #[test]
    fn text_without_tags_is_unchanged() {
        let text = "a <b> c <d:> e:1 <lora:>";
        assert_eq!(strip_tags("prompt", text).unwrap().text, text);
    }
}
