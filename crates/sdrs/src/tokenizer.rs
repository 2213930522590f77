//! CLIP BPE tokenizer, equal in token ids to transformers 5's `CLIPTokenizer` (the
//! `tokenizers`-backed one) for OpenAI CLIP's vocabulary, which is embedded in the binary.
//!
//! The steps: special tokens typed in the raw text are taken out first; each stretch between
//! them is normalised and split into words (`text`); each word's UTF-8 bytes become GPT-2's
//! byte characters, the last one carrying the `</w>` end-of-word suffix, and BPE merges them.

mod text;
mod unicode9;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{BufRead, BufReader};
use std::sync::RwLock;

use regex::Regex;

use crate::{Error, Result};

/// Id of `<|startoftext|>`, which opens every encoded prompt.
pub const BOS: u32 = 49406;
/// Id of `<|endoftext|>`, which closes every encoded prompt (and pads SD 1.x prompts).
pub const EOS: u32 = 49407;

const BOS_TEXT: &str = "<|startoftext|>";
const EOS_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// OpenAI's BPE list: a header line, then merges ("a b" per line), most frequent first.
const VOCABULARY_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 48 894 merges of the list (49 408 tokens = 512 byte tokens + merges + 2).
const MERGES: usize = 49152 - 256 - 2;
/// Words remembered by the BPE cache; past this the cache stops growing (as in `tokenizers`).
const CACHE_CAPACITY: usize = 10_000;

/// A merge of two adjacent tokens: its priority (lower merges first) and the token it makes.
#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    id: u32,
}

/// The CLIP tokenizer: text to token ids and back.
pub struct Tokenizer {
    /// Token strings by id, in the byte-level alphabet (`"photo</w>"`).
    tokens: Vec<String>,
    /// Id of each byte's token inside a word, and at a word's end (with `</w>`).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    merges: HashMap<(u32, u32), Merge>,
    /// Byte character → byte, to decode.
    char_bytes: HashMap<char, u8>,
    words: Regex,
    specials: Regex,
    cache: RwLock<HashMap<String, Vec<u32>>>,
}

impl Tokenizer {
    /// Builds the tokenizer from the embedded vocabulary.
    pub fn new() -> Result<Self> {
        let bad =
            |reason: String| Error::InvalidConfig(format!("embedded CLIP vocabulary: {reason}"));
        // Only the first lines of the list are used; reading stops there instead of inflating all.
        let reader = BufReader::new(flate2::read::GzDecoder::new(VOCABULARY_GZ));
        let lines = reader
            .lines()
            .skip(1)
            .take(MERGES)
            .collect::<std::io::Result<Vec<String>>>()
            .map_err(|e| bad(e.to_string()))?;
        let pairs = lines
            .iter()
            .map(|line| {
                line.split_once(' ')
                    .ok_or_else(|| bad(format!("bad merge line {line:?}")))
            })
            .collect::<Result<Vec<(&str, &str)>>>()?;
        if pairs.len() != MERGES {
            return Err(bad(format!("{} merges, expected {MERGES}", pairs.len())));
        }

        // Ids as in transformers' vocab.json: bytes, bytes + </w>, merges in order, specials.
        let byte_chars = text::bytes_to_unicode();
        let byte_order = text::vocabulary_byte_order();
        let mut tokens: Vec<String> = byte_order
            .iter()
            .map(|&b| byte_chars[b as usize].to_string())
            .collect();
        tokens.extend(
            byte_order
                .iter()
                .map(|&b| format!("{}{END_OF_WORD}", byte_chars[b as usize])),
        );
        tokens.extend(pairs.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS_TEXT.to_string());
        tokens.push(EOS_TEXT.to_string());
        if tokens.len() != EOS as usize + 1 {
            return Err(bad(format!(
                "{} tokens, expected {}",
                tokens.len(),
                EOS + 1
            )));
        }

        let ids: HashMap<&str, u32> = tokens
            .iter()
            .zip(0u32..)
            .map(|(t, i)| (t.as_str(), i))
            .collect();
        let id_of = |token: &str| {
            ids.get(token)
                .copied()
                .ok_or_else(|| bad(format!("no token {token:?}")))
        };
        let mut merges = HashMap::with_capacity(MERGES);
        for (rank, &(a, b)) in (0u32..).zip(&pairs) {
            let merge = Merge {
                rank,
                id: id_of(&format!("{a}{b}"))?,
            };
            merges.insert((id_of(a)?, id_of(b)?), merge);
        }
        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for (b, c) in byte_chars.iter().enumerate() {
            byte_ids[b] = id_of(&c.to_string())?;
            byte_end_ids[b] = id_of(&format!("{c}{END_OF_WORD}"))?;
        }
        let char_bytes = (0..=255u8).map(|b| (byte_chars[b as usize], b)).collect();
        let specials = Regex::new(&format!(
            "{}|{}",
            regex::escape(BOS_TEXT),
            regex::escape(EOS_TEXT)
        ))
        .map_err(|e| bad(e.to_string()))?;

        Ok(Self {
            tokens,
            byte_ids,
            byte_end_ids,
            merges,
            char_bytes,
            words: text::word_regex()?,
            specials,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Token ids of `text`, without BOS/EOS and without truncation.
    ///
    /// `<|startoftext|>` and `<|endoftext|>` written in the text (exactly, case included) become
    /// their special ids, as transformers does by default.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut start = 0;
        for special in self.specials.find_iter(text) {
            self.encode_plain(&text[start..special.start()], &mut ids);
            ids.push(if special.as_str() == BOS_TEXT {
                BOS
            } else {
                EOS
            });
            start = special.end();
        }
        self.encode_plain(&text[start..], &mut ids);
        ids
    }

    /// `[BOS, tokens…, EOS, pad…]`, exactly `max_len` long: the tokens are cut to `max_len - 2`.
    ///
    /// This is transformers' `padding="max_length", truncation=True, max_length=max_len`. A
    /// `max_len` under 2 leaves room for no tokens and keeps the first `max_len` of `[BOS, EOS]`.
    pub fn encode_padded(&self, text: &str, max_len: usize, pad: u32) -> Vec<u32> {
        let mut tokens = self.encode(text);
        tokens.truncate(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(max_len);
        ids.push(BOS);
        ids.extend(tokens);
        ids.push(EOS);
        ids.resize(max_len, pad);
        ids
    }

    /// The BPE string of a token id (`"photo</w>"`, `"<|endoftext|>"`), or `None` past the vocabulary.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Best-effort text of token ids: specials and unknown ids dropped, `</w>` read as a space,
    /// invalid UTF-8 replaced (transformers' `decode(ids, skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids.iter().filter(|&&id| id != BOS && id != EOS) {
            if let Some(token) = self.token(id) {
                for c in token.chars() {
                    match self.char_bytes.get(&c) {
                        Some(&b) => bytes.push(b),
                        None => bytes.extend(c.to_string().as_bytes()),
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes)
            .replace(END_OF_WORD, " ")
            .trim()
            .to_string()
    }

    /// Number of token ids (49 408).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Encodes text that holds no special token.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = text::normalize(text);
        for word in self.words.find_iter(&normalized) {
            self.encode_word(word.as_str(), ids);
        }
    }

    /// Appends the BPE ids of one word, through the cache.
    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        // A poisoned lock only means another thread panicked mid-insert of a complete entry.
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = cache.get(word) {
            ids.extend_from_slice(cached);
            return;
        }
        drop(cache);
        let merged = self.bpe(word.as_bytes());
        ids.extend_from_slice(&merged);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() < CACHE_CAPACITY {
            cache.insert(word.to_string(), merged);
        }
    }

    /// BPE over a word's bytes: repeatedly merge the adjacent pair of lowest rank, the leftmost
    /// one on ties, as `tokenizers` does. A heap of candidate pairs over a linked list of
    /// symbols keeps a word of n bytes at O(n log n): a prompt may be one 64 KiB "word".
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let Some((&last, init)) = bytes.split_last() else {
            return Vec::new();
        };
        let mut ids: Vec<u32> = init.iter().map(|&b| self.byte_ids[b as usize]).collect();
        ids.push(self.byte_end_ids[last as usize]);
        let n = ids.len();
        // Symbol i's neighbours; n (next) and usize::MAX (prev) mean none. Position 0 never
        // dies: a merge keeps the left symbol and drops the right one.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        // (rank, position, left id, right id); an entry whose symbols changed since is stale.
        let mut heap = BinaryHeap::new();
        let candidate = |pos: usize, ids: &[u32], next: &[usize]| {
            let right = *next.get(pos)?;
            let pair = (ids[pos], *ids.get(right)?);
            self.merges
                .get(&pair)
                .map(|m| Reverse((m.rank, pos, pair.0, pair.1)))
        };
        heap.extend((0..n).filter_map(|pos| candidate(pos, &ids, &next)));
        while let Some(Reverse((_, pos, left, right_id))) = heap.pop() {
            let right = next[pos];
            if !alive[pos] || right >= n || ids[pos] != left || ids[right] != right_id {
                continue;
            }
            let Some(merge) = self.merges.get(&(left, right_id)) else {
                continue;
            };
            ids[pos] = merge.id;
            alive[right] = false;
            next[pos] = next[right];
            if let Some(p) = prev.get_mut(next[pos]) {
                *p = pos;
            }
            if prev[pos] != usize::MAX {
                heap.extend(candidate(prev[pos], &ids, &next));
            }
            heap.extend(candidate(pos, &ids, &next));
        }
        (0..n).filter(|&i| alive[i]).map(|i| ids[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook BPE: scan the whole word for the lowest-ranked pair, merge, repeat.
    fn naive_bpe(tok: &Tokenizer, bytes: &[u8]) -> Vec<u32> {
        let Some((&last, init)) = bytes.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<u32> = init.iter().map(|&b| tok.byte_ids[b as usize]).collect();
        word.push(tok.byte_end_ids[last as usize]);
        loop {
            let best = word
                .windows(2)
                .enumerate()
                .filter_map(|(pos, pair)| {
                    tok.merges
                        .get(&(pair[0], pair[1]))
                        .map(|m| (m.rank, pos, m.id))
                })
                .min();
            let Some((_, pos, id)) = best else {
                return word;
            };
            word[pos] = id;
            word.remove(pos + 1);
        }
    }

    #[test]
    fn heap_bpe_equals_the_textbook_algorithm() {
        let tok = Tokenizer::new().unwrap();
        // Repeated letters (ties between overlapping pairs), real words, and random bytes
        // from a fixed linear congruential sequence.
        let mut words: Vec<Vec<u8>> = ["aaaaaaa", "abababab", "photograph", "lllllooooolll", "x"]
            .iter()
            .map(|w| w.as_bytes().to_vec())
            .collect();
        let mut state = 12345u64;
        for len in 1..200 {
            let word = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    b"aeinorst"[(state >> 60) as usize % 8]
                })
                .collect();
            words.push(word);
        }
        for word in &words {
            assert_eq!(
                tok.bpe(word),
                naive_bpe(&tok, word),
                "{}",
                String::from_utf8_lossy(word)
            );
        }
    }

    #[test]
    fn a_prompt_of_one_long_word_is_tokenized() {
        let tok = Tokenizer::new().unwrap();
        let word = "ab".repeat(32 << 10);
        let ids = tok.encode(&word);
        assert!(!ids.is_empty() && ids.len() < word.len(), "{}", ids.len());
        assert_eq!(tok.decode(&ids), word);
    }

    #[test]
    fn encodes_the_diffusers_example_prompt() {
        let tok = Tokenizer::new().unwrap();
        assert_eq!(
            tok.encode("a photo of an astronaut riding a horse, 4k!!"),
            [320, 1125, 539, 550, 18376, 6765, 320, 4558, 267, 275, 330, 748]
        );
    }

    #[test]
    fn vocabulary_ids_match_transformers() {
        let tok = Tokenizer::new().unwrap();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.token(0), Some("!"));
        assert_eq!(tok.token(256), Some("!</w>"));
        assert_eq!(tok.token(320), Some("a</w>"));
        assert_eq!(tok.token(512), Some("in"));
        assert_eq!(tok.token(1125), Some("photo</w>"));
        assert_eq!(tok.token(BOS), Some("<|startoftext|>"));
        assert_eq!(tok.token(EOS), Some("<|endoftext|>"));
        assert_eq!(tok.token(49408), None);
    }

    #[test]
    fn special_tokens_in_text_are_recognised_only_verbatim() {
        let tok = Tokenizer::new().unwrap();
        assert_eq!(tok.encode("a <|endoftext|> b"), [320, EOS, 321]);
        assert_eq!(tok.encode("<|ENDOFTEXT|>"), [27, 347, 40786, 4160, 91, 285]);
    }

    #[test]
    fn encode_padded_adds_specials_truncates_and_pads() {
        let tok = Tokenizer::new().unwrap();
        assert_eq!(
            tok.encode_padded("a photo", 6, 0),
            [BOS, 320, 1125, EOS, 0, 0]
        );
        assert_eq!(tok.encode_padded("a a a a a", 4, 0), [BOS, 320, 320, EOS]);
        assert_eq!(tok.encode_padded("", 3, EOS), [BOS, EOS, EOS]);
        assert_eq!(tok.encode_padded("a", 1, 0), [BOS]);
    }

    #[test]
    fn decode_reads_end_of_word_as_space_and_drops_specials() {
        let tok = Tokenizer::new().unwrap();
        let ids = tok.encode_padded("A café, 4k!! 🐱", 20, EOS);
        assert_eq!(tok.decode(&ids), "a café , 4 k !! 🐱");
    }
}
