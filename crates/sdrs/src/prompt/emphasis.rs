//! A1111 emphasis: `(x)`, `[x]`, `(x:w)`, escapes and `BREAK`, the semantics of
//! `parse_prompt_attention` in AUTOMATIC1111's `modules/prompt_parser.py`.

use std::sync::OnceLock;

use regex::Regex;

use crate::{Error, Result};

/// Weight of a `BREAK` marker segment, as A1111 writes it (`["BREAK", -1]`).
pub(crate) const BREAK_WEIGHT: f64 = -1.0;
const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;

/// One piece of a prompt with its emphasis, in A1111's representation: `("BREAK", -1.0)` marks a
/// chunk break. Weights stay f64 (Python floats) until they are put into a chunk.
pub type Segment = (String, f64);

/// Splits `text` into segments with their emphasis multipliers.
///
/// Quirks kept from A1111: a lone backslash vanishes; unmatched `)` / `]` are text; brackets still
/// open at the end apply to the end; a `BREAK` inside brackets gets multiplied too and then no
/// longer counts as a break (it is the word "BREAK"); adjacent segments of equal weight merge; a
/// `(x:w)` whose `w` is not a number (`1.2.3`) is an error, where A1111 raises.
/// A prompt nested deeper than [`crate::limits::MAX_PROMPT_NESTING`] is refused: each open
/// bracket multiplies every segment after it once.
pub fn parse_attention(text: &str) -> Result<Vec<Segment>> {
    super::check_nesting(text)?;
    let mut res: Vec<Segment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Segment>, start: usize, m: f64| {
        for seg in &mut res[start..] {
            seg.1 *= m;
        }
    };

    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (token, weight) = next_token(rest);
        rest = &rest[token.len()..];
        let closes_round = token == ")" || weight.is_some();
        if c == '\\' {
            res.push((token[1..].to_string(), 1.0));
        } else if token == "(" {
            round.push(res.len());
        } else if token == "[" {
            square.push(res.len());
        } else if let (true, Some(start)) = (closes_round, round.last().copied()) {
            let multiplier = match weight {
                Some(w) => w.parse().map_err(|_| {
                    Error::InvalidRequest(format!(
                        "emphasis weight {w:?} in {token:?} is not a number"
                    ))
                })?,
                None => ROUND_MULTIPLIER,
            };
            round.pop();
            multiply(&mut res, start, multiplier);
        } else if let (true, Some(start)) = (token == "]", square.last().copied()) {
            square.pop();
            multiply(&mut res, start, SQUARE_MULTIPLIER);
        } else {
            for (i, part) in break_regex().split(token).enumerate() {
                if i > 0 {
                    res.push(("BREAK".to_string(), BREAK_WEIGHT));
                }
                res.push((part.to_string(), 1.0));
            }
        }
    }
    // Outermost first, all round before all square, as A1111 does: float products depend on order.
    for start in round {
        multiply(&mut res, start, ROUND_MULTIPLIER);
    }
    for start in square {
        multiply(&mut res, start, SQUARE_MULTIPLIER);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<Segment> = Vec::with_capacity(res.len());
    for seg in res {
        match merged.last_mut() {
            Some(last) if last.1 == seg.1 => last.0.push_str(&seg.0),
            _ => merged.push(seg),
        }
    }
    Ok(merged)
}

/// The next token of A1111's `re_attention` at the start of `s` (non-empty), and the weight text
/// of a `:w)` token.
fn next_token(s: &str) -> (&str, Option<&str>) {
    let mut chars = s.char_indices();
    let (_, c) = chars.next().unwrap_or((0, ' '));
    let after = chars.next();
    match c {
        '\\' => match after {
            Some((i, n)) if matches!(n, '(' | ')' | '[' | ']' | '\\') => {
                (&s[..i + n.len_utf8()], None)
            }
            _ => (&s[..1], None),
        },
        '(' | '[' | ')' | ']' => (&s[..1], None),
        ':' => match weight_close_regex().captures(s) {
            Some(m) => (
                m.get(0).map_or(&s[..1], |t| t.as_str()),
                m.get(1).map(|w| w.as_str()),
            ),
            None => (&s[..1], None),
        },
        _ => {
            let end = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (&s[..end], None)
        }
    }
}

/// `:w)` closing a weighted round bracket (A1111: `:\s*([+-]?[.\d]+)\s*\)`).
fn weight_close_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^:\s*([+-]?[.\d]+)\s*\)").unwrap_or_else(|e| panic!("{e}")))
}

/// `BREAK` as a word with the whitespace around it.
fn break_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?s)\s*\bBREAK\b\s*").unwrap_or_else(|e| panic!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Vec<(String, f64)> {
        parse_attention(text).unwrap()
    }

    fn s(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    // The doctests of `parse_prompt_attention` (AUTOMATIC1111 modules/prompt_parser.py).
    #[test]
    fn a1111_doctests() {
        assert_eq!(p("normal text"), s(&[("normal text", 1.0)]));
        assert_eq!(
            p("an (important) word"),
            s(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(p("(unbalanced"), s(&[("unbalanced", 1.1)]));
        assert_eq!(p(r"\(literal\]"), s(&[("(literal]", 1.0)]));
        assert_eq!(p("(unnecessary)(parens)"), s(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            s(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn square_brackets_divide_and_weights_allow_spaces() {
        assert_eq!(p("[x]"), s(&[("x", 1.0 / 1.1)]));
        assert_eq!(p("(x: 1.3 )"), s(&[("x", 1.3)]));
        assert_eq!(p("(x:-1)"), s(&[("x", -1.0)]));
    }

    #[test]
    fn break_splits_and_is_kept_as_a_marker() {
        assert_eq!(
            p("a BREAK b"),
            s(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(p("BREAK"), s(&[("", 1.0), ("BREAK", -1.0), ("", 1.0)]));
        // Not a word of its own: plain text.
        assert_eq!(p("BREAKFAST"), s(&[("BREAKFAST", 1.0)]));
        // Inside brackets the marker is multiplied and becomes text, as in A1111.
        assert_eq!(
            p("(a BREAK b)"),
            s(&[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])
        );
    }

    #[test]
    fn escapes_stray_closers_and_lone_backslashes() {
        assert_eq!(p(r"a\\b"), s(&[(r"a\b", 1.0)]));
        assert_eq!(p(r"a\b"), s(&[("ab", 1.0)]));
        assert_eq!(p("a) b] c:"), s(&[("a) b] c:", 1.0)]));
        assert_eq!(p(""), s(&[("", 1.0)]));
        assert_eq!(p(":1.2)"), s(&[(":1.2)", 1.0)]));
    }

    #[test]
    fn malformed_weight_is_an_error() {
        assert!(matches!(
            parse_attention("(a:1.2.3)"),
            Err(Error::InvalidRequest(_))
        ));
    }
}
