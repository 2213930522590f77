//! Where `tokenizers`' NFC and ours part ways: its tables are Unicode 9's
//! (`unicode-normalization-alignments`), ours are the `unicode-normalization` crate's (Unicode 16+).
//!
//! Unicode's stability rules mean newer tables only add to older ones: characters added since
//! Unicode 9 gain a combining class, a decomposition or a composition. Old tables see each such
//! character as a plain starter that combines with nothing, and NFC never reaches across a plain
//! starter, so NFC-with-old-tables = NFC each stretch between those characters, keeping them as
//! they are. This table lists them: every character whose normalisation in the crate differs
//! from `tokenizers`' (found by comparing both over all of Unicode; see the ignored test
//! `every_codepoint_matches_reference` and `tools/tokenizer_reference.py`).

/// Inclusive codepoint ranges that `tokenizers`' NFC leaves alone but the crate would not.
#[rustfmt::skip]
const NEWER_THAN_UNICODE_9: [(u32, u32); 71] = [
    (0x5C8, 0x5C9), (0x7FD, 0x7FD), (0x897, 0x89F), (0x8CA, 0x8D3), (0x9FE, 0x9FE),
    (0xC3C, 0xC3C), (0xD3B, 0xD3C), (0xEBA, 0xEBA), (0x1715, 0x1715), (0x1ABF, 0x1AF0),
    (0x1DF6, 0x1DFA), (0xA82C, 0xA82C), (0x105C9, 0x105C9), (0x105D2, 0x105D2),
    (0x105DA, 0x105DA), (0x105E4, 0x105E4), (0x10D24, 0x10D27), (0x10D69, 0x10D6D),
    (0x10EAB, 0x10EAC), (0x10ECB, 0x10ECF), (0x10EF0, 0x10EFB), (0x10EFD, 0x10EFF),
    (0x10F46, 0x10F50), (0x10F82, 0x10F85), (0x11070, 0x11070), (0x1133B, 0x1133B),
    (0x11382, 0x11385), (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x11391),
    (0x113B8, 0x113B8), (0x113BB, 0x113BB), (0x113C2, 0x113C2), (0x113C5, 0x113C5),
    (0x113C7, 0x113C9), (0x113CE, 0x113D0), (0x1145E, 0x1145E), (0x11839, 0x1183A),
    (0x11930, 0x11930), (0x11935, 0x11935), (0x11938, 0x11938), (0x1193D, 0x1193E),
    (0x11943, 0x11943), (0x119E0, 0x119E0), (0x11A34, 0x11A34), (0x11A47, 0x11A47),
    (0x11A99, 0x11A99), (0x11D42, 0x11D42), (0x11D44, 0x11D45), (0x11D97, 0x11D97),
    (0x11F41, 0x11F42), (0x1611E, 0x16129), (0x1612F, 0x1612F), (0x16D63, 0x16D63),
    (0x16D67, 0x16D6A), (0x16FF0, 0x16FF1), (0x1D127, 0x1D128), (0x1D250, 0x1D252),
    (0x1D25B, 0x1D25C), (0x1D25F, 0x1D25F), (0x1D280, 0x1D281), (0x1E08F, 0x1E08F),
    (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF), (0x1E4EC, 0x1E4EF),
    (0x1E5EE, 0x1E5EF), (0x1E6E3, 0x1E6E3), (0x1E6E6, 0x1E6E6), (0x1E6EE, 0x1E6EF),
    (0x1E6F5, 0x1E6F5),
];

/// Whether `tokenizers`' NFC treats `c` as a plain starter that our NFC would combine or reorder.
pub(super) fn is_newer_than_unicode_9(c: char) -> bool {
    let cp = c as u32;
    cp >= NEWER_THAN_UNICODE_9[0].0
        && NEWER_THAN_UNICODE_9
            .binary_search_by(|&(lo, hi)| {
                if hi < cp {
                    std::cmp::Ordering::Less
                } else if lo > cp {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_sorted_and_disjoint() {
        assert!(NEWER_THAN_UNICODE_9.iter().all(|(lo, hi)| lo <= hi));
        assert!(NEWER_THAN_UNICODE_9.windows(2).all(|w| w[0].1 < w[1].0));
    }

    #[test]
    fn finds_range_ends_and_skips_gaps() {
        assert!(is_newer_than_unicode_9('\u{5C8}'));
        assert!(is_newer_than_unicode_9('\u{1AF0}'));
        assert!(is_newer_than_unicode_9('\u{1E6F5}'));
        assert!(!is_newer_than_unicode_9('\u{301}'));
        assert!(!is_newer_than_unicode_9('\u{1AF1}'));
        assert!(!is_newer_than_unicode_9('a'));
    }
}
