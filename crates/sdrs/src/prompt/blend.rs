//! optimizedSD's sub-prompt blend `"tabby cat:0.25 white duck:0.75 hybrid"`: the original
//! `split_weighted_subprompts` and the strict form of it that `PromptSyntax::Auto` uses.

use std::sync::OnceLock;

use regex::Regex;

/// optimizedSD's `split_weighted_subprompts`, quirks included: the text up to each `:` is a
/// sub-prompt; the weight runs from the colon to the next space (or the end), and that space is
/// eaten too; a weight that is not a number counts as 1 and its word is dropped
/// (`"cat:big dog"` → cat, dog); an empty weight is 1 (`"a cat : 2 dog"` → "a cat ", "2 dog");
/// text after the last weight is a sub-prompt of weight 1.
pub fn split_weighted_subprompts(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else {
            out.push((rest.to_string(), 1.0));
            break;
        };
        let prompt = &rest[..colon];
        rest = &rest[colon + 1..];
        let end = rest.find(' ').unwrap_or(rest.len());
        let weight = python_float(&rest[..end]).unwrap_or(1.0);
        rest = rest.get(end + 1..).unwrap_or("");
        out.push((prompt.to_string(), weight));
    }
    out
}

/// The blend `PromptSyntax::Auto` sees: it splits only at colons outside every bracket that
/// are followed by a plain decimal number ending at a space or at the end of the prompt. A
/// whitespace-only tail is dropped. `None` when that leaves fewer than two sub-prompts.
pub fn split_auto(text: &str) -> Option<Vec<(String, f64)>> {
    let mut out = Vec::new();
    let mut start = 0;
    let (mut round, mut square) = (0usize, 0usize);
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '(' => round += 1,
            ')' => round = round.saturating_sub(1),
            '[' => square += 1,
            ']' => square = square.saturating_sub(1),
            ':' if round == 0 && square == 0 => {
                let after = &text[i + 1..];
                let Some(m) = weight_regex().find(after) else {
                    continue;
                };
                if !matches!(after[m.end()..].chars().next(), None | Some(' ')) {
                    continue;
                }
                let weight = python_float(m.as_str())?;
                out.push((text[start..i].to_string(), weight));
                // The number and the space after it are consumed, as optimizedSD does.
                start = (i + 1 + m.end() + 1).min(text.len());
            }
            _ => {}
        }
    }
    let tail = &text[start..];
    if !tail.trim().is_empty() {
        out.push((tail.to_string(), 1.0));
    }
    (out.len() >= 2).then_some(out)
}

/// A plain decimal at the start of the text (after the colon).
fn weight_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)").unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Python's `float(s)` for what optimizedSD feeds it: surrounding whitespace ignored; `inf`,
/// `nan`, exponents and `_` between digits accepted.
fn python_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let b = t.as_bytes();
    let digit_at = |i: Option<usize>| i.and_then(|i| b.get(i)).is_some_and(u8::is_ascii_digit);
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' && !(digit_at(i.checked_sub(1)) && digit_at(Some(i + 1))) {
            return None;
        }
    }
    t.replace('_', "").parse::<f64>().ok()
}
