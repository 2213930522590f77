//! A1111 prompt editing `[from:to:when]` and alternation `[a|b]`: the semantics of
//! `get_learned_conditioning_prompt_schedules` in AUTOMATIC1111's `modules/prompt_parser.py`
//! (its lark grammar, and both of its timelines for `when`: see [`EditTimeline`]).
//!
//! The grammar, as this recursive-descent parser reads it:
//! - top level: text, bracket constructs, and stray `( ) [ ] :` kept as text; a `|` outside any
//!   construct, or a `\` that ends the prompt (or precedes a newline), makes the whole prompt
//!   unparseable, and then it is used unchanged for every step;
//! - a construct is balanced: `(p)`, `(p:p)` and `[p]` are emphasis (kept verbatim for the
//!   emphasis parser), `[to:N]` / `[from:to:N]` is editing (`N` a signed number, spaces allowed
//!   around it), `[a|b|…]` is alternation (alternatives may be empty); inside a construct every
//!   bracket must belong to a construct, so an odd bracket makes the enclosing construct fall
//!   back to plain text at the top level.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How `when` in `[from:to:when]` becomes a step: A1111's "prompt editing timelines".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditTimeline {
    /// A1111 since 1.6: a number written with a decimal point is a fraction of the steps
    /// (`[a:b:1.0]` keeps `a` throughout), an integer is a step. The hires fix's second pass
    /// continues the timeline: fractions from 1 to 2, steps counted on from the first pass's.
    #[default]
    Current,
    /// A1111 before 1.6 (its `use_old_scheduling` option): below 1 a fraction of the steps,
    /// else a step; the hires fix's second pass reads the first pass's timeline again.
    Old,
}

impl FromStr for EditTimeline {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "current" | "new" => Ok(EditTimeline::Current),
            "old" => Ok(EditTimeline::Old),
            other => Err(crate::Error::InvalidRequest(format!(
                "unknown prompt editing timeline {other:?}: use current or old"
            ))),
        }
    }
}

impl fmt::Display for EditTimeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EditTimeline::Current => "current",
            EditTimeline::Old => "old",
        })
    }
}

/// The steps a prompt's edits are laid out over: a pass of `steps` steps, the first pass's
/// steps when this is the hires fix's second pass, and the timeline rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EditClock {
    /// Steps of the pass the edits are for.
    pub steps: usize,
    /// The first pass's steps, when the edits are for the hires fix's second pass.
    pub first_pass: Option<usize>,
    /// How `when` is read.
    pub timeline: EditTimeline,
}

impl EditClock {
    /// A run's (first) pass of `steps` steps.
    pub fn new(steps: usize, timeline: EditTimeline) -> Self {
        Self {
            steps,
            first_pass: None,
            timeline,
        }
    }

    /// The hires fix's second pass of `steps` steps after a first pass of `first_pass`.
    pub fn second_pass(first_pass: usize, steps: usize, timeline: EditTimeline) -> Self {
        Self {
            steps,
            first_pass: Some(first_pass),
            timeline,
        }
    }

    /// The steps the edits span (A1111's `steps` in the schedule): the old timeline lays the
    /// second pass out over the first pass's steps.
    pub fn span(self) -> usize {
        match (self.timeline, self.first_pass) {
            (EditTimeline::Old, Some(first)) => first,
            _ => self.steps,
        }
    }

    /// The step at which an edit written `when` switches: truncated, at most the span.
    fn switch_step(self, when: &str) -> i64 {
        let v: f64 = when.parse().unwrap_or(0.0);
        let span = self.span() as f64;
        let v = match self.timeline {
            EditTimeline::Old => {
                if v < 1.0 {
                    v * span
                } else {
                    v
                }
            }
            EditTimeline::Current => {
                // The second pass counts on: fractions from 1, steps from the first pass's.
                let (step_offset, fraction_offset) = match self.first_pass {
                    Some(first) => (first as f64, 1.0),
                    None => (0.0, 0.0),
                };
                if when.contains('.') {
                    (v - fraction_offset) * span
                } else {
                    v - step_offset
                }
            }
        };
        // Python's int() truncates toward zero; an infinite value is clamped instead of raising.
        (v.trunc().clamp(i64::MIN as f64, i64::MAX as f64) as i64).min(span as i64)
    }
}

/// A parsed prompt piece.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Text kept as written (including emphasis brackets).
    Text(String),
    /// `[before:after:when]`: `before` up to step `when`, `after` from then on; `when` is the
    /// number as written.
    Switch {
        before: Vec<Node>,
        after: Vec<Node>,
        when: String,
    },
    /// `[a|b|…]`.
    Alternate(Vec<Vec<Node>>),
}

/// The texts a prompt is edited into over a run of `steps` steps on the current timeline:
/// `(end_at_step, text)`, ordered, the last ending at `steps` (A1111's `[[10, 'a b']]` lists).
/// A prompt nested deeper than [`crate::limits::MAX_PROMPT_NESTING`] is refused, which bounds
/// the parser's recursion.
pub fn prompt_edits(prompt: &str, steps: usize) -> crate::Result<Vec<(usize, String)>> {
    prompt_edits_with(prompt, EditClock::new(steps, EditTimeline::Current))
}

/// [`prompt_edits`] on `clock`: the last text ends at [`EditClock::span`].
pub fn prompt_edits_with(prompt: &str, clock: EditClock) -> crate::Result<Vec<(usize, String)>> {
    super::check_nesting(prompt)?;
    let steps = clock.span();
    if steps > crate::limits::MAX_STEPS {
        return Err(crate::limits::exceeded(
            "steps",
            steps,
            "MAX_STEPS",
            crate::limits::MAX_STEPS,
        ));
    }
    let chars: Vec<char> = prompt.chars().collect();
    let Some(nodes) = parse_top(&chars) else {
        return Ok(vec![(steps, prompt.to_string())]);
    };
    let mut ends = vec![steps];
    if collect_steps(&nodes, clock, &mut ends) {
        // An alternation changes the text at every step.
        ends = (1..=steps).collect();
    }
    ends.sort_unstable();
    ends.dedup();
    Ok(ends
        .into_iter()
        .map(|step| {
            let mut text = String::new();
            render(&nodes, step, clock, &mut text);
            (step, text)
        })
        .collect())
}

fn parse_top(chars: &[char]) -> Option<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut pos = 0;
    while pos < chars.len() {
        match chars[pos] {
            '|' => return None,
            '(' | '[' => match parse_construct(chars, pos) {
                Some((node, end)) => {
                    nodes.extend(node);
                    pos = end;
                }
                None => {
                    nodes.push(Node::Text(chars[pos].to_string()));
                    pos += 1;
                }
            },
            ')' | ']' | ':' => {
                nodes.push(Node::Text(chars[pos].to_string()));
                pos += 1;
            }
            _ => {
                let end = plain_end(chars, pos)?;
                nodes.push(Node::Text(chars[pos..end].iter().collect()));
                pos = end;
            }
        }
    }
    Some(nodes)
}

/// End of the plain text starting at `pos` (a `\` takes the next character with it); `None` for
/// a `\` with nothing (or a newline) after it, which the grammar cannot read.
fn plain_end(chars: &[char], mut pos: usize) -> Option<usize> {
    while pos < chars.len() {
        match chars[pos] {
            '\\' => match chars.get(pos + 1) {
                Some(&c) if c != '\n' => pos += 2,
                _ => return None,
            },
            '(' | ')' | '[' | ']' | ':' | '|' => break,
            _ => pos += 1,
        }
    }
    Some(pos)
}

/// A prompt inside a construct: text and constructs up to `: | ) ]` or the end.
fn parse_prompt(chars: &[char], mut pos: usize) -> Option<(Vec<Node>, usize)> {
    let mut nodes = Vec::new();
    while pos < chars.len() {
        match chars[pos] {
            ':' | '|' | ')' | ']' => break,
            '(' | '[' => {
                let (node, end) = parse_construct(chars, pos)?;
                nodes.extend(node);
                pos = end;
            }
            _ => {
                let end = plain_end(chars, pos)?;
                nodes.push(Node::Text(chars[pos..end].iter().collect()));
                pos = end;
            }
        }
    }
    Some((nodes, pos))
}

/// The construct opening at `pos`, as nodes, and the position after it.
fn parse_construct(chars: &[char], pos: usize) -> Option<(Vec<Node>, usize)> {
    let round = chars[pos] == '(';
    let mut parts: Vec<Vec<Node>> = Vec::new();
    let mut separators: Vec<char> = Vec::new();
    let mut cur = pos + 1;
    loop {
        let (nodes, end) = parse_prompt(chars, cur)?;
        parts.push(nodes);
        match chars.get(end) {
            Some(&c) if c == if round { ')' } else { ']' } => {
                cur = end + 1;
                break;
            }
            Some(&c) if c == ':' || (c == '|' && !round) => {
                separators.push(c);
                cur = end + 1;
            }
            _ => return None,
        }
    }
    let text = |s: &str| Node::Text(s.to_string());
    let verbatim = |open: &str, close: &str, parts: Vec<Vec<Node>>| {
        let mut out = vec![text(open)];
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 {
                out.push(text(":"));
            }
            out.extend(part);
        }
        out.push(text(close));
        out
    };
    if round {
        return (separators.len() <= 1).then(|| (verbatim("(", ")", parts), cur));
    }
    if separators.is_empty() {
        return Some((verbatim("[", "]", parts), cur));
    }
    if separators.iter().all(|&c| c == '|') {
        return Some((vec![Node::Alternate(parts)], cur));
    }
    if separators.contains(&'|') || separators.len() > 2 {
        return None;
    }
    let when = match parts.pop()?.as_slice() {
        [Node::Text(t)] => signed_number(t)?,
        _ => return None,
    };
    let after = parts.pop()?;
    let before = parts.pop().unwrap_or_default();
    Some((
        vec![Node::Switch {
            before,
            after,
            when,
        }],
        cur,
    ))
}

/// `\s* NUMBER \s*` with lark's SIGNED_NUMBER (`[+-]` then `1`, `1.`, `.5`, `1.5`, with an
/// optional exponent); the number without the spaces.
fn signed_number(text: &str) -> Option<String> {
    let t = text.trim();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            (digits(int) && (frac.is_empty() || digits(frac))) || (int.is_empty() && digits(frac))
        }
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    // An exponent needs a decimal mantissa or an integer (lark: INT _EXP | DECIMAL _EXP?).
    (mantissa_ok && exponent_ok).then(|| t.to_string())
}

/// Adds the steps at which edits switch to `ends`; true when an alternation makes every step one.
fn collect_steps(nodes: &[Node], clock: EditClock, ends: &mut Vec<usize>) -> bool {
    let mut alternates = false;
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Switch {
                before,
                after,
                when,
            } => {
                let step = clock.switch_step(when);
                if step >= 1 {
                    ends.push(step as usize);
                }
                alternates |= collect_steps(before, clock, ends);
                alternates |= collect_steps(after, clock, ends);
            }
            Node::Alternate(options) => {
                alternates = true;
                for option in options {
                    collect_steps(option, clock, ends);
                }
            }
        }
    }
    alternates
}

fn render(nodes: &[Node], step: usize, clock: EditClock, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Switch {
                before,
                after,
                when,
            } => {
                let chosen = if step as i64 <= clock.switch_step(when) {
                    before
                } else {
                    after
                };
                render(chosen, step, clock, out);
            }
            Node::Alternate(options) => {
                let i = (step + options.len() - 1) % options.len();
                render(&options[i], step, clock, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(prompt: &str) -> Vec<(usize, String)> {
        prompt_edits(prompt, 10).unwrap()
    }

    fn v(pairs: &[(usize, &str)]) -> Vec<(usize, String)> {
        pairs.iter().map(|(s, t)| (*s, t.to_string())).collect()
    }

    // The doctests of `get_learned_conditioning_prompt_schedules` (AUTOMATIC1111
    // modules/prompt_parser.py, 10 steps, no hires pass).
    #[test]
    fn a1111_doctests() {
        assert_eq!(g("test"), v(&[(10, "test")]));
        assert_eq!(g("a [b:3]"), v(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [b: 3]"), v(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [[[b]]:2]"), v(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(g("[(a:2):3]"), v(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(g("a [b : c : 1] d"), v(&[(1, "a b  d"), (10, "a  c  d")]));
        assert_eq!(
            g("a[b:[c:d:2]:1]e"),
            v(&[(1, "abe"), (2, "ace"), (10, "ade")])
        );
        assert_eq!(g("a [unbalanced"), v(&[(10, "a [unbalanced")]));
        assert_eq!(g("a [b:.5] c"), v(&[(5, "a  c"), (10, "a b c")]));
        // The doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but
        // A1111's grammar cannot parse the prompt (`|` outside a construct) with lark 1.1.2 or
        // 1.3.1, so A1111 uses it unchanged; so do we.
        assert_eq!(g("a [{b|d{:.5] c"), v(&[(10, "a [{b|d{:.5] c")]));
        assert_eq!(
            g("((a][:b:c [d:3]"),
            v(&[(3, "((a][:b:c "), (10, "((a][:b:c d")])
        );
        let alternating: Vec<(usize, String)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "a" } else { "(b:1.1)" }.to_string()))
            .collect();
        assert_eq!(g("[a|(b:1.1)]"), alternating);
        let female: Vec<(usize, String)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "female" } else { "male" }.to_string()))
            .collect();
        assert_eq!(g("[fe|]male"), female);
        let female4: Vec<(usize, String)> = (1..=10)
            .map(|s| (s, if s % 4 == 1 { "female" } else { "male" }.to_string()))
            .collect();
        assert_eq!(g("[fe|||]male"), female4);
    }

    // The example in the comment at the top of A1111's prompt_parser.py (100 steps).
    #[test]
    fn a1111_header_example() {
        let prompt = "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]";
        assert_eq!(
            prompt_edits(prompt, 100).unwrap(),
            v(&[
                (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
                (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
                (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
                (75, "fantasy landscape with a lake and an oak in background masterful"),
                (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
            ])
        );
    }

    #[test]
    fn from_nothing_and_to_nothing() {
        assert_eq!(g("[a::4]"), v(&[(4, "a"), (10, "")]));
        assert_eq!(g("[a:b:4 ]"), v(&[(4, "a"), (10, "b")]));
        // A step past the end never switches; zero or below switches before the first step.
        assert_eq!(g("[a:b:30]"), v(&[(10, "a")]));
        assert_eq!(g("[a:b:0]"), v(&[(10, "b")]));
    }

    #[test]
    fn unparseable_prompts_are_used_unchanged() {
        assert_eq!(g("a | b [c:3]"), v(&[(10, "a | b [c:3]")]));
        assert_eq!(g("(a|b) [c:3]"), v(&[(10, "(a|b) [c:3]")]));
        assert_eq!(g(r"[c:3] a\"), v(&[(10, r"[c:3] a\")]));
        // Not a number: plain text, no editing.
        assert_eq!(g("[a:b:c]"), v(&[(10, "[a:b:c]")]));
        assert_eq!(g(r"\[a:3]"), v(&[(10, r"\[a:3]")]));
    }

    #[test]
    fn numbers_follow_lark_signed_number() {
        for ok in ["3", "+3", "-3", "1.", ".5", "1.5", "1e1", "1.5E-1", " 2 "] {
            assert!(signed_number(ok).is_some(), "{ok}");
        }
        for bad in ["", ".", "e1", "1e", "3a", "- 3", "1.2.3"] {
            assert!(signed_number(bad).is_none(), "{bad}");
        }
    }

    // Prompts with stray brackets beside editing, as lark 1.3.1 parses them with A1111's grammar
    // (10 steps).
    #[test]
    fn stray_brackets_match_a1111s_parser() {
        let cases: &[(&str, &[(usize, &str)])] = &[
            (
                "a (cat:1.2 with [dog:cat:0.5] in a hat",
                &[
                    (5, "a (cat:1.2 with dog in a hat"),
                    (10, "a (cat:1.2 with cat in a hat"),
                ],
            ),
            (
                "(masterpiece), [dog:cat:5], ((best quality)",
                &[
                    (5, "(masterpiece), dog, ((best quality)"),
                    (10, "(masterpiece), cat, ((best quality)"),
                ],
            ),
            (
                "a [dog:cat:5] )) extra",
                &[(5, "a dog )) extra"), (10, "a cat )) extra")],
            ),
            (
                "smile :) [dog:cat:5]",
                &[(5, "smile :) dog"), (10, "smile :) cat")],
            ),
            ("[dog:cat:5] :(", &[(5, "dog :("), (10, "cat :(")]),
            ("((a [b:c:3]", &[(3, "((a b"), (10, "((a c")]),
            ("a: [b:c:3]", &[(3, "a: b"), (10, "a: c")]),
            ("[b:c:3] (d", &[(3, "b (d"), (10, "c (d")]),
            ("[[b:c:3]", &[(3, "[b"), (10, "[c")]),
            ("([b:c:3]", &[(3, "(b"), (10, "(c")]),
            ("(x:[b:c:3])", &[(3, "(x:b)"), (10, "(x:c)")]),
            ("(x [b:c:3])", &[(3, "(x b)"), (10, "(x c)")]),
            ("[x [b:c:3]]", &[(3, "[x b]"), (10, "[x c]")]),
            ("[a:[b:c:3]:5]", &[(3, "a"), (5, "a"), (10, "c")]),
            (
                "((a:1.2) [b|c])",
                &[
                    (1, "((a:1.2) b)"),
                    (2, "((a:1.2) c)"),
                    (3, "((a:1.2) b)"),
                    (4, "((a:1.2) c)"),
                    (5, "((a:1.2) b)"),
                    (6, "((a:1.2) c)"),
                    (7, "((a:1.2) b)"),
                    (8, "((a:1.2) c)"),
                    (9, "((a:1.2) b)"),
                    (10, "((a:1.2) c)"),
                ],
            ),
            ("(x:1.2) :[b:c:3]", &[(3, "(x:1.2) :b"), (10, "(x:1.2) :c")]),
            ("a :[b:c:3]", &[(3, "a :b"), (10, "a :c")]),
            ("a:[b:c:3]", &[(3, "a:b"), (10, "a:c")]),
            ("):[b:c:3]", &[(3, "):b"), (10, "):c")]),
            ("(:[b:c:3]", &[(3, "(:b"), (10, "(:c")]),
            ("x) [b:c:3]", &[(3, "x) b"), (10, "x) c")]),
            ("[x] [b:c:3] (y)", &[(3, "[x] b (y)"), (10, "[x] c (y)")]),
            ("a ([b:c:3]:1.2)", &[(3, "a (b:1.2)"), (10, "a (c:1.2)")]),
        ];
        for (prompt, want) in cases {
            assert_eq!(g(prompt), v(want), "{prompt}");
        }
    }

    /// A1111's `get_learned_conditioning_prompt_schedules` on both timelines, without and with
    /// the hires fix: its doctests (`g("a [b:1.5] c")` with `hires_steps` 10) and what its
    /// `collect_steps` gives for the other cases.
    #[test]
    fn both_editing_timelines_match_a1111() {
        let at = |prompt: &str, clock: EditClock| prompt_edits_with(prompt, clock).unwrap();
        let current = EditClock::new(10, EditTimeline::Current);
        let old = EditClock::new(10, EditTimeline::Old);
        // A decimal point makes a fraction: 1.0 is every step now, step 1 before 1.6.
        assert_eq!(at("[a:b:1.0]", current), v(&[(10, "a")]));
        assert_eq!(at("[a:b:1.0]", old), v(&[(1, "a"), (10, "b")]));
        assert_eq!(at("[a:b:2.5]", current), v(&[(10, "a")]));
        assert_eq!(at("[a:b:2.5]", old), v(&[(2, "a"), (10, "b")]));
        // Where the two agree: fractions below 1, integers, zero.
        for clock in [current, old] {
            assert_eq!(at("a [b:.5] c", clock), v(&[(5, "a  c"), (10, "a b c")]));
            assert_eq!(at("[a:b:3]", clock), v(&[(3, "a"), (10, "b")]));
            assert_eq!(at("[a:b:0]", clock), v(&[(10, "b")]));
        }
        // The hires fix's second pass (10 steps after a first pass of 10).
        let second = EditClock::second_pass(10, 10, EditTimeline::Current);
        assert_eq!(at("a [b:.5] c", second), v(&[(10, "a b c")]));
        assert_eq!(at("a [b:1.5] c", second), v(&[(5, "a  c"), (10, "a b c")]));
        assert_eq!(at("[a:b:13]", second), v(&[(3, "a"), (10, "b")]));
        // The old timeline lays the second pass over the first pass's steps.
        let old_second = EditClock::second_pass(10, 20, EditTimeline::Old);
        assert_eq!(at("[a:b:0.5]", old_second), v(&[(5, "a"), (10, "b")]));
    }
}
