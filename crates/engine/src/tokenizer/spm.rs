//! SentencePiece-style BPE (`tokenizer.ggml.model = llama`, e.g. Gemma 3), as
//! llama.cpp's SPM tokenizer runs it: no pre-tokenizer; spaces become `▁`; the
//! text starts as one symbol per character, and the adjacent pair whose
//! concatenation is a vocabulary token with the highest score is merged
//! repeatedly (ties: leftmost). Symbols that end up not being tokens fall back
//! to byte tokens `<0xXX>`.
//!
//! Symbols are always contiguous byte ranges of the escaped text, so a
//! candidate pair is looked up as a slice of that text with no allocation; a
//! binary heap keeps long inputs at O(n log n).

use super::TokenizerError;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

pub(crate) struct Spm {
    pub(crate) scores: Vec<f32>,
    /// `<0xXX>` token of each byte, else a token whose text is that single
    /// byte (llama.cpp's fallback order).
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

/// A queued candidate merge. Ordered so the max-heap pops the highest score,
/// then the leftmost pair.
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    /// Byte length of the pair when queued; a mismatch later means stale.
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(Reverse(self.left).cmp(&Reverse(o.left)))
    }
}

impl Spm {
    pub(crate) fn new(vocab: &super::vocab::Vocab, scores: Vec<f32>, unk: Option<u32>) -> Spm {
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = vocab.get(format!("<0x{b:02X}>").as_str()).or_else(|| {
                // A single-byte token string can only be ASCII in valid UTF-8.
                (b < 0x80).then(|| vocab.get((b as u8 as char).to_string().as_str())).flatten()
            });
        }
        Spm { scores, byte_ids, unk }
    }

    /// Tokenizes `text`, which already has spaces replaced by `▁`.
    pub(crate) fn encode(
        &self,
        text: &str,
        vocab: &super::vocab::Vocab,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        // Symbol offsets are u32 (half the memory of usize on a hot array).
        if text.len() >= u32::MAX as usize {
            return Err(TokenizerError::TooLong(text.len()));
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (i, c) in text.char_indices() {
            let idx = syms.len() as u32;
            syms.push(Sym { start: i as u32, len: c.len_utf8() as u32, prev: idx.wrapping_sub(1), next: idx + 1 });
        }
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        // idx 0's prev is wrapping_sub(1) == NONE.
        let mut heap = BinaryHeap::with_capacity(syms.len());
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: u32, r: u32| {
            if l == NONE || r == NONE {
                return;
            }
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            let piece = &text[ls.start as usize..(rs.start + rs.len) as usize];
            if let Some(id) = vocab.get(piece) {
                let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                heap.push(Bigram { score, left: l, right: r, size: piece.len() as u32 });
            }
        };
        for i in 1..syms.len() as u32 {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (ls, rs) = (syms[b.left as usize], syms[b.right as usize]);
            if ls.len == 0 || rs.len == 0 || ls.len + rs.len != b.size {
                continue;
            }
            syms[b.left as usize].len += rs.len;
            syms[b.left as usize].next = rs.next;
            syms[b.right as usize].len = 0;
            if rs.next != NONE {
                syms[rs.next as usize].prev = b.left;
            }
            try_add(&mut heap, &syms, ls.prev, b.left);
            try_add(&mut heap, &syms, b.left, rs.next);
        }
        let mut i = 0u32;
        while i != NONE {
            let s = syms[i as usize];
            let piece = &text[s.start as usize..(s.start + s.len) as usize];
            match vocab.get(piece) {
                Some(id) => out.push(id),
                None => {
                    // Only single characters can be left unmerged and unknown.
                    for &byte in piece.as_bytes() {
                        match self.byte_ids[byte as usize].or(self.unk) {
                            Some(id) => out.push(id),
                            None => return Err(TokenizerError::Unencodable(byte)),
                        }
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }
}
