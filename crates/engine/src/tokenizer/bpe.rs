//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): GPT-2's byte↔unicode map,
//! merge ranks, and the merge loop.
//!
//! Each pre-tokenized word is turned into one symbol per byte (the token of
//! that byte's printable stand-in character), then the adjacent pair with the
//! lowest merge rank is merged repeatedly (ties: leftmost), as llama.cpp does.
//! Symbols are token ids and merges are keyed by id pairs, so the inner loop
//! hashes two integers instead of building strings.

use super::{fast_map, FastMap, TokenizerError};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves,
/// the other 68 bytes are mapped in order to U+0100.. so that every byte has a
/// visible, non-space character.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(cp).expect("valid code point");
    }
    table
}

/// Inverse of [`byte_to_char_table`], indexed by code point (< 0x144).
pub(crate) fn char_to_byte_table() -> Vec<i16> {
    let fwd = byte_to_char_table();
    let mut inv = vec![-1i16; 0x144];
    for (b, &c) in fwd.iter().enumerate() {
        inv[c as usize] = b as i16;
    }
    inv
}

/// Maps a byte-level token string back to raw bytes. Characters outside the
/// map (not produced by GPT-2 style converters) are kept as their UTF-8.
pub(crate) fn unmap_bytes(inv: &[i16], text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match inv.get(c as usize) {
            Some(&b) if b >= 0 => out.push(b as u8),
            _ => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// Marks a symbol whose byte has no token (a broken vocabulary): it can take
/// part in no merge and is dropped from the output, as llama.cpp does.
const NO_TOKEN: u32 = u32::MAX;

pub(crate) struct Bpe {
    /// Token id of each byte's stand-in character.
    byte_ids: [u32; 256],
    /// (left, right) → (rank, merged). `merged` is a token id, or
    /// `n_vocab + k` for the k-th merge result that is not in the vocabulary.
    merges: FastMap<(u32, u32), (u32, u32)>,
    n_vocab: u32,
    /// For merge results that are not tokens: the tokens llama.cpp falls back
    /// to (each byte of the mapped text that is a one-byte token).
    virtual_fallback: Vec<Vec<u32>>,
    /// Llama 3: a word that is a whole token skips merging.
    pub(crate) ignore_merges: bool,
    byte_to_char: [char; 256],
}

#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

/// A queued merge: (rank, left index, right index, left id, right id, merged
/// id). `Reverse` makes the max-heap pop the lowest rank, then the leftmost.
type Candidate = (Reverse<u32>, Reverse<u32>, u32, u32, u32, u32);

/// Scratch buffers reused across the words of one `encode` call.
#[derive(Default)]
pub(crate) struct BpeScratch {
    syms: Vec<Sym>,
    heap: BinaryHeap<Candidate>,
    mapped: String,
}

impl Bpe {
    /// Builds the merge table. `merges` are `"left right"` strings, rank =
    /// index; the first occurrence of a pair wins, as in llama.cpp.
    pub(crate) fn new(
        vocab: &super::vocab::Vocab,
        n_vocab: u32,
        merges: &[&str],
        ignore_merges: bool,
    ) -> Result<Bpe, TokenizerError> {
        let byte_to_char = byte_to_char_table();
        let mut byte_ids = [NO_TOKEN; 256];
        for (b, c) in byte_to_char.iter().enumerate() {
            if let Some(id) = vocab.get(c.to_string().as_str()) {
                byte_ids[b] = id;
            }
        }
        let mut map: FastMap<(u32, u32), (u32, u32)> = fast_map(merges.len());
        let mut virtual_ids: HashMap<String, u32> = HashMap::new();
        let mut virtual_fallback = Vec::new();
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            // (A space byte is always a char boundary, so the slices below are valid.)
            let split = m.as_bytes().iter().skip(1).position(|&b| b == b' ').map(|p| p + 1);
            let Some(p) = split else {
                return Err(TokenizerError::Metadata(format!(
                    "merge #{rank} `{m}` is not two tokens separated by a space"
                )));
            };
            let (a, b) = (&m[..p], &m[p + 1..]);
            let lookup = |t: &str| {
                vocab.get(t).ok_or_else(|| {
                    TokenizerError::Metadata(format!(
                        "merge #{rank} `{m}` refers to `{t}`, which is not in the vocabulary"
                    ))
                })
            };
            let (ia, ib) = (lookup(a)?, lookup(b)?);
            if map.contains_key(&(ia, ib)) {
                continue;
            }
            let joined = format!("{a}{b}");
            let merged = match vocab.get(&joined) {
                Some(id) => id,
                None => {
                    // Not a token: llama.cpp still merges, and at the end emits
                    // whichever single bytes of the text are tokens.
                    let next = n_vocab as usize + virtual_fallback.len();
                    let id = *virtual_ids.entry(joined.clone()).or_insert_with(|| {
                        virtual_fallback
                            .push(joined.bytes().filter_map(|byte| byte_token(vocab, byte)).collect::<Vec<u32>>());
                        next as u32
                    });
                    id
                }
            };
            if merged as u64 >= NONE as u64 {
                return Err(TokenizerError::Metadata("too many merges".into()));
            }
            map.insert((ia, ib), (rank as u32, merged));
        }
        Ok(Bpe { byte_ids, merges: map, n_vocab, virtual_fallback, ignore_merges, byte_to_char })
    }

    /// Tokenizes one pre-tokenized word (raw bytes), appending ids to `out`.
    pub(crate) fn encode_word(
        &self,
        word: &[u8],
        vocab: &super::vocab::Vocab,
        scratch: &mut BpeScratch,
        out: &mut Vec<u32>,
    ) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges || word.len() == 1 {
            let mapped = &mut scratch.mapped;
            mapped.clear();
            mapped.extend(word.iter().map(|&b| self.byte_to_char[b as usize]));
            if let Some(id) = vocab.get(mapped.as_str()) {
                out.push(id);
                return;
            }
        }
        let syms = &mut scratch.syms;
        syms.clear();
        let n = word.len() as u32;
        syms.extend(word.iter().enumerate().map(|(i, &b)| Sym {
            id: self.byte_ids[b as usize],
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            next: if i as u32 + 1 == n { NONE } else { i as u32 + 1 },
        }));
        let heap = &mut scratch.heap;
        heap.clear();
        let push = |heap: &mut BinaryHeap<Candidate>, syms: &[Sym], l: u32, r: u32| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (syms[l as usize].id, syms[r as usize].id);
            if let Some(&(rank, merged)) = self.merges.get(&(a, b)) {
                // Max-heap: lowest rank first, then leftmost.
                heap.push((Reverse(rank), Reverse(l), r, a, b, merged));
            }
        };
        for i in 1..n {
            push(heap, syms, i - 1, i);
        }
        while let Some((_, Reverse(l), r, a, b, merged)) = heap.pop() {
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            // Stale: one side was merged away or has grown since this pair was queued.
            if ls.id != a || rs.id != b || ls.next != r {
                continue;
            }
            syms[l as usize].id = merged;
            syms[l as usize].next = rs.next;
            syms[r as usize].id = NO_TOKEN;
            syms[r as usize].prev = NONE;
            syms[r as usize].next = NONE;
            if rs.next != NONE {
                syms[rs.next as usize].prev = l;
            }
            push(heap, syms, ls.prev, l);
            push(heap, syms, l, rs.next);
        }
        let mut i = 0u32;
        while i != NONE {
            let s = syms[i as usize];
            if s.id < self.n_vocab {
                out.push(s.id);
            } else if s.id != NO_TOKEN {
                out.extend_from_slice(&self.virtual_fallback[(s.id - self.n_vocab) as usize]);
            }
            i = s.next;
        }
    }
}

/// The token whose text is the single byte `b` (only ASCII can be).
fn byte_token(vocab: &super::vocab::Vocab, b: u8) -> Option<u32> {
    if b.is_ascii() {
        vocab.get((b as char).to_string().as_str())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let fwd = byte_to_char_table();
        let inv = char_to_byte_table();
        assert_eq!(fwd[b' ' as usize], 'Ġ');
        assert_eq!(fwd[b'\n' as usize], 'Ċ');
        assert_eq!(fwd[b'a' as usize], 'a');
        for b in 0..256 {
            assert_eq!(inv[fwd[b] as usize], b as i16);
        }
    }
}
