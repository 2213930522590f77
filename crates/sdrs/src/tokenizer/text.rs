//! Text before BPE: normalisation, splitting into words, and GPT-2's byte ↔ character map.
//!
//! These steps follow the `tokenizers` pipeline that transformers 5's `CLIPTokenizer` builds:
//! normalizer `Sequence[NFC, Replace(\s+ → " "), Lowercase]`, pre-tokenizer
//! `Sequence[Split(regex, Removed, invert), ByteLevel(add_prefix_space=false)]`.
//! OpenAI's original tokenizer (and transformers' old Python one) also ran `ftfy.fix_text` and
//! `html.unescape` and stripped the text; the fast tokenizer does none of that, so neither do
//! we: `&amp;` stays three words, and mojibake is tokenized as written.

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::unicode9::is_newer_than_unicode_9;

/// The pre-tokenizer's word pattern.
///
/// transformers' pattern starts with `<\|startoftext\|>|<\|endoftext\|>`, but the ByteLevel step
/// that follows re-splits every piece with GPT-2's pattern, which cuts such a piece back into
/// `<|`, `endoftext`, `|>`; every other piece of this pattern passes GPT-2's unchanged. So those
/// two alternatives change nothing and are left out. (Special tokens typed in the raw text are
/// found before normalisation, in `Tokenizer::encode`.)
pub(super) const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

/// Builds the word-splitting regex.
pub(super) fn word_regex() -> crate::Result<Regex> {
    Regex::new(WORD_PATTERN)
        .map_err(|e| crate::Error::InvalidConfig(format!("tokenizer word pattern: {e}")))
}

/// NFC, then every run of whitespace to one space, then lowercase, as the fast tokenizer does.
///
/// NFC runs separately on the stretches between characters newer than `tokenizers`' Unicode 9
/// tables, which pass through as they are (see [`super::unicode9`]). Lowercasing goes character
/// by character (`char::to_lowercase`), like `tokenizers`; Rust's `str::to_lowercase` would
/// instead turn a word-final `Σ` into `ς`. Leading and trailing spaces are kept: the word
/// pattern skips them anyway.
pub(super) fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    let mut push = |c: char| {
        // `char::is_whitespace` is Unicode White_Space, the set Oniguruma's `\s` matches.
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.extend(c.to_lowercase());
            in_space = false;
        }
    };
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_newer_than_unicode_9(c) {
            text[start..i].nfc().for_each(&mut push);
            push(c);
            start = i + c.len_utf8();
        }
    }
    text[start..].nfc().for_each(&mut push);
    out
}

/// GPT-2's reversible map from bytes to printable characters, indexed by byte.
///
/// Printable Latin-1 bytes (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) map to themselves; the other 68
/// take U+0100 upwards in byte order. The vocabulary is written in these characters.
pub(super) fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        map[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    map
}

/// The bytes in the order OpenAI's vocabulary lists them: the printable ones, then the rest.
/// Token id `i` (for `i < 256`) is the character of byte `vocabulary_byte_order()[i]`.
pub(super) fn vocabulary_byte_order() -> Vec<u8> {
    let map = bytes_to_unicode();
    let (mut order, rest): (Vec<u8>, Vec<u8>) =
        (0..=255u8).partition(|&b| map[b as usize] == char::from(b));
    order.extend(rest);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printable_characters() {
        let map = bytes_to_unicode();
        let mut seen: Vec<char> = map.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert!(map.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }

    #[test]
    fn byte_map_matches_gpt2_known_values() {
        let map = bytes_to_unicode();
        assert_eq!(map[b'a' as usize], 'a');
        assert_eq!(map[b'!' as usize], '!');
        assert_eq!(map[0xE9], 'é');
        assert_eq!(map[0x00], 'Ā'); // U+0100
        assert_eq!(map[b' ' as usize], 'Ġ'); // U+0120
        assert_eq!(map[b'\n' as usize], 'Ċ'); // U+010A
        assert_eq!(map[0xAD], 'Ń'); // U+0143, the soft hyphen is the last unprintable byte
    }

    #[test]
    fn vocabulary_byte_order_puts_printable_bytes_first() {
        let order = vocabulary_byte_order();
        assert_eq!(order.len(), 256);
        assert_eq!(&order[..3], b"!\"#");
        assert_eq!(order[93], b'~');
        assert_eq!(order[188], 0x00);
        assert_eq!(order[255], 0xAD);
    }

    #[test]
    fn normalize_composes_collapses_whitespace_and_lowercases() {
        assert_eq!(normalize("  Cafe\u{301}\t\n\u{a0}ΟΔΟΣ  "), " café οδοσ ");
        assert_eq!(normalize("A\u{200b}B"), "a\u{200b}b"); // zero-width space is not whitespace
    }

    #[test]
    fn normalize_leaves_characters_newer_than_unicode_9_alone() {
        // Dives Akuru (Unicode 13): the crate composes U+11935 U+11930 into U+11938.
        assert_eq!(normalize("\u{11935}\u{11930}"), "\u{11935}\u{11930}");
        // U+1DF6 (Unicode 10, class 232) stays before U+0316 (class 220); older marks still sort.
        assert_eq!(normalize("a\u{1DF6}\u{316}"), "a\u{1DF6}\u{316}");
        assert_eq!(normalize("a\u{301}\u{316}"), "\u{E1}\u{316}");
    }

    #[test]
    fn word_pattern_splits_contractions_digits_and_punctuation() {
        let re = word_regex().unwrap();
        let words: Vec<&str> = re
            .find_iter("it's 42!! (x:1.2)")
            .map(|m| m.as_str())
            .collect();
        assert_eq!(
            words,
            ["it", "'s", "4", "2", "!!", "(", "x", ":", "1", ".", "2", ")"]
        );
    }
}
