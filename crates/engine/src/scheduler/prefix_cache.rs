//! The prefix cache: KV caches of recently processed token sequences, so a
//! request whose prompt starts the same way (a shared system prompt, the
//! history of a multi-turn chat) skips recomputing that part.
//!
//! Entries are whole sequences (a prompt, or a prompt plus the answer that
//! was generated for it) with a compact copy of their KV cache. A lookup
//! finds the entry sharing the longest prefix with the new prompt and hands
//! out a copy of just that prefix: because every row of a forward pass is
//! computed the same way whatever else is in the batch, keys and values
//! computed for the same tokens at the same positions are bit-identical, so
//! continuing from the copy gives exactly the output a full prefill would.
//!
//! The store is a flat list scanned linearly. The KV cache is one contiguous
//! buffer per layer, not paged, so entries cannot share storage anyway, and
//! with the memory bound the list stays short (SmolLM2-135M needs ~46 KB per
//! position: 512 MiB is ~11k positions); comparing token prefixes is far
//! cheaper than the forward pass a hit saves. Entries that are a prefix of a
//! newer one are dropped, since the newer one serves every lookup they could.
//! Least recently used entries go first when the byte bound is exceeded.
//! Each entry is tagged with the LoRA adapter it was computed with (`""`
//! for the base model): keys and values differ between adapters, so a
//! lookup only matches entries of its own.

use crate::kv_cache::KvCache;

/// Shared prefixes shorter than this are not worth a lookup hit: recomputing
/// a few tokens costs about as much as copying their cache, and tiny matches
/// (a BOS token and a chat-template header) would churn the LRU order.
pub const MIN_PREFIX: usize = 16;

struct Entry {
    /// The adapter the cache was computed with; `""` for none.
    tag: String,
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    /// Value of `clock` when last inserted or hit.
    last_used: u64,
}

pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(max_bytes: usize) -> PrefixCache {
        PrefixCache { entries: Vec::new(), bytes: 0, max_bytes, clock: 0 }
    }

    /// Bytes of KV held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The cache of the longest stored prefix of `prompt`, and its length.
    ///
    /// At most `prompt.len() - 1` positions are reused: the last prompt token
    /// must still go through the model to give the logits of the first
    /// generated token. `None` when no entry shares at least [`MIN_PREFIX`]
    /// tokens.
    pub fn lookup(&mut self, prompt: &[u32], tag: &str) -> Option<(KvCache, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.tag == tag)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit).min(e.cache.len())))
            .max_by_key(|&(i, len)| (len, self.entries[i].last_used))?;
        if len < MIN_PREFIX {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[best];
        e.last_used = self.clock;
        Some((e.cache.clone_prefix(len), len))
    }

    /// Stores the KV cache of `tokens` (`cache` holds at least that many
    /// positions; only those are copied).
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache, tag: &str) {
        let n = tokens.len().min(cache.len());
        let tokens = &tokens[..n];
        if n < MIN_PREFIX || self.max_bytes == 0 {
            return;
        }
        self.clock += 1;
        // Already covered by an entry that starts with these tokens: that
        // entry serves every lookup this one would; just mark it used.
        if let Some(e) =
            self.entries.iter_mut().find(|e| e.tag == tag && e.tokens.len() >= n && e.tokens[..n] == *tokens)
        {
            e.last_used = self.clock;
            return;
        }
        let cache = cache.clone_prefix(n);
        let bytes = cache.bytes();
        if bytes > self.max_bytes {
            return;
        }
        // Entries this one extends are now redundant.
        let before = self.entries.len();
        self.entries.retain(|e| !(e.tag == tag && e.tokens.len() <= n && tokens[..e.tokens.len()] == *e.tokens));
        if self.entries.len() != before {
            self.recount();
        }
        while self.bytes + bytes > self.max_bytes {
            let Some(lru) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else {
                break;
            };
            let gone = self.entries.swap_remove(lru);
            self.bytes -= gone.bytes;
        }
        self.entries.push(Entry { tag: tag.to_string(), tokens: tokens.to_vec(), cache, bytes, last_used: self.clock });
        self.bytes += bytes;
    }

    fn recount(&mut self) {
        self.bytes = self.entries.iter().map(|e| e.bytes).sum();
    }
}
