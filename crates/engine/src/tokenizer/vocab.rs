//! The vocabulary: every token's text in one buffer, and an open-addressing
//! index from text to id over it.
//!
//! Why not `Vec<String>` plus `HashMap<String, u32>`: that keeps two heap
//! strings per token and a table of 32-byte entries at most 7/8 full, about
//! 35 MB for Gemma 3's 262,144 tokens; this is about 6 MB (one text buffer,
//! one end offset and at most two 4-byte slots per token), which is what
//! keeps minnow's peak memory at or under llama.cpp's on the small models.

use super::FastHasher;
use std::hash::{BuildHasher, BuildHasherDefault};

pub(crate) struct Vocab {
    /// Every token's text, one after another.
    text: String,
    /// `ends[i]`: where token `i`'s text ends in `text` (it starts where
    /// token `i - 1`'s ends).
    ends: Vec<u32>,
    /// Open addressing, linear probing: `id + 1` of the token whose text
    /// hashes here, 0 for an empty slot. A power of two, at most half full.
    slots: Vec<u32>,
}

/// Why a vocabulary could not be built.
#[derive(Debug)]
pub(crate) enum VocabError {
    /// Token `id` has the same text as an earlier one.
    Duplicate { id: usize, text: String },
    /// The texts add up to more than 4 GiB.
    TooLarge,
}

fn hash(s: &str) -> usize {
    BuildHasherDefault::<FastHasher>::default().hash_one(s) as usize
}

impl Vocab {
    pub(crate) fn new<'a>(
        tokens: impl ExactSizeIterator<Item = std::borrow::Cow<'a, str>>,
    ) -> Result<Vocab, VocabError> {
        let n = tokens.len();
        let mut v = Vocab {
            text: String::new(),
            ends: Vec::with_capacity(n),
            slots: vec![0; (2 * n).next_power_of_two().max(2)],
        };
        for (id, t) in tokens.enumerate() {
            v.text.push_str(&t);
            v.ends.push(u32::try_from(v.text.len()).map_err(|_| VocabError::TooLarge)?);
            let mask = v.slots.len() - 1;
            let mut i = hash(&t) & mask;
            while v.slots[i] != 0 {
                if v.text(v.slots[i] - 1) == Some(&*t) {
                    return Err(VocabError::Duplicate { id, text: t.into_owned() });
                }
                i = (i + 1) & mask;
            }
            v.slots[i] = id as u32 + 1;
        }
        v.text.shrink_to_fit();
        Ok(v)
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Token `id`'s text, `None` outside the vocabulary.
    pub(crate) fn text(&self, id: u32) -> Option<&str> {
        let id = id as usize;
        let end = *self.ends.get(id)? as usize;
        let start = if id == 0 { 0 } else { self.ends[id - 1] as usize };
        Some(&self.text[start..end])
    }

    /// The id of the token whose text is exactly `key`.
    pub(crate) fn get(&self, key: &str) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = hash(key) & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if self.text(slot - 1) == Some(key) {
                return Some(slot - 1);
            }
            i = (i + 1) & mask;
        }
    }

    /// Every token's text, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len() as u32).map(|id| self.text(id).unwrap_or(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn finds_every_token_and_nothing_else() {
        let words: Vec<String> = (0..5000).map(|i| format!("w{i}")).chain(["".into(), "▁a".into()]).collect();
        let v = Vocab::new(words.iter().map(|w| Cow::Borrowed(w.as_str()))).unwrap();
        assert_eq!(v.len(), words.len());
        for (id, w) in words.iter().enumerate() {
            assert_eq!(v.get(w), Some(id as u32), "{w}");
            assert_eq!(v.text(id as u32), Some(w.as_str()));
        }
        assert_eq!(v.get("w5000"), None);
        assert_eq!(v.get("w"), None);
        assert_eq!(v.text(words.len() as u32), None);
        assert!(v.iter().eq(words.iter().map(String::as_str)));
    }

    #[test]
    fn refuses_duplicates() {
        let err = Vocab::new(["a", "b", "a"].into_iter().map(Cow::Borrowed)).err();
        assert!(matches!(err, Some(VocabError::Duplicate { id: 2, ref text }) if text == "a"));
    }
}
