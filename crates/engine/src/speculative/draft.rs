//! Drafters: n-gram and text lookup over the sequence's own history and
//! earlier answers ([`super::memory`]), and a small draft model with its own
//! KV cache and a trimmed output head; plus the draws from a distribution
//! that drafting and verification share.

use super::*;

/// The n-gram drafter's proposal: the continuation (at most `k` tokens) of
/// the latest earlier occurrence of the last `n` tokens of `hist`, trying
/// `n = max ..= min` longest first. Empty if nothing matches.
pub fn ngram_propose(hist: &[u32], k: usize, min: usize, max: usize) -> Vec<u32> {
    let len = hist.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (min.max(1)..=max).rev() {
        if len < n + 1 {
            continue;
        }
        let pat = &hist[len - n..];
        // Start positions whose match ends before the suffix itself, latest first.
        for s in (0..len - n).rev() {
            if &hist[s..s + n] == pat {
                let end = (s + n + k).min(len);
                return hist[s + n..end].to_vec();
            }
        }
    }
    Vec::new()
}

/// Bytes longer than this are not compared when matching text.
pub(super) const LOOKUP_MAX_MATCH: usize = 64;
/// Most bytes of continuation tokenized as a draft.
pub(super) const LOOKUP_MAX_CONT: usize = 64;
/// Stands for a control token in the byte history: matches only itself and
/// ends continuations (its text would tokenize as plain characters).
pub(super) const CONTROL_BYTE: u8 = 0;

/// Text-level prompt lookup: the longest suffix of `text` (at least
/// `min_match` bytes; the latest occurrence among equals) that also occurs
/// earlier, and the bytes that followed that occurrence (up to
/// `LOOKUP_MAX_CONT`, stopping at a `CONTROL_BYTE`). Returns the
/// continuation and whether it was cut short by the length cap.
pub fn text_lookup(text: &[u8], min_match: usize) -> Option<(&[u8], bool)> {
    text_lookup_match(text, min_match).map(|(cont, cut, _)| (cont, cut))
}

/// [`text_lookup`] and the length of the match, in bytes.
pub(super) fn text_lookup_match(text: &[u8], min_match: usize) -> Option<(&[u8], bool, usize)> {
    let n = text.len();
    let min_match = min_match.max(1);
    if n <= min_match {
        return None;
    }
    let last = text[n - 1];
    let (mut best_len, mut best_end) = (0, 0);
    // Candidate occurrences end at e < n; latest first.
    for e in (min_match..n).rev() {
        if text[e - 1] != last {
            continue;
        }
        let cap = LOOKUP_MAX_MATCH.min(e);
        let mut l = 1;
        while l < cap && text[e - 1 - l] == text[n - 1 - l] {
            l += 1;
        }
        if l > best_len {
            (best_len, best_end) = (l, e);
            if l == LOOKUP_MAX_MATCH {
                break;
            }
        }
    }
    if best_len < min_match {
        return None;
    }
    let rest = &text[best_end..];
    let stop = rest.iter().position(|&b| b == CONTROL_BYTE).unwrap_or(rest.len());
    let len = stop.min(LOOKUP_MAX_CONT);
    (len > 0).then(|| (&rest[..len], len < stop, best_len))
}

/// Drafts for [`Lookup::Text`] and where they come from: what the earlier
/// answers agree comes next ([`Src::Memory`], at most `k_memory` tokens)
/// when they align with the output at least as well as the prompt does —
/// if they align but disagree, a value of this answer's own comes next and
/// nothing is drafted — else the continuation found by [`text_lookup`]
/// ([`Src::NGram`], at most `k_ngram`); tokenized, without a last token that
/// may be cut short.
pub(super) fn text_lookup_propose(
    tokenizer: &Tokenizer,
    seq: &mut SpecSeq,
    k_ngram: usize,
    k_memory: usize,
) -> (Vec<u32>, Src) {
    let found = text_lookup_match(&seq.text, seq.lookup_min_bytes);
    let consensus = consensus_draft(&mut seq.refs, &seq.text[seq.out_start..]);
    match (consensus, found) {
        (Some(c), found) if found.is_none_or(|(_, _, len)| c.matched >= len) => {
            (consensus_propose(tokenizer, &c, k_memory), Src::Memory)
        }
        (_, Some((cont, cut, _))) => (tokenize_continuation(tokenizer, cont, cut, k_ngram), Src::NGram),
        _ => (Vec::new(), Src::NGram),
    }
}

/// The references' agreed continuation as tokens: the longest prefix of its
/// tokenization that every reference's longer text tokenizes the same way
/// (a token at the cut, ` "` before `product`, may merge with what follows).
pub(super) fn consensus_propose(tokenizer: &Tokenizer, c: &Consensus, k: usize) -> Vec<u32> {
    if c.draft.is_empty() {
        return Vec::new();
    }
    let Some((mut ids, _)) = encode_valid_prefix(tokenizer, &c.draft) else { return Vec::new() };
    for beyond in c.beyond.iter().filter(|b| !b.is_empty()) {
        let longer = [c.draft.as_slice(), beyond].concat();
        let Some((other, _)) = encode_valid_prefix(tokenizer, &longer) else { return Vec::new() };
        ids.truncate(shared_prefix(&ids, &other));
    }
    ids.truncate(k);
    ids
}

/// A byte continuation as at most `k` draft tokens, without a last token that
/// may be cut short (`cut`: the continuation was capped).
pub(super) fn tokenize_continuation(tokenizer: &Tokenizer, cont: &[u8], cut: bool, k: usize) -> Vec<u32> {
    let Some((mut ids, valid_len)) = encode_valid_prefix(tokenizer, cont) else { return Vec::new() };
    if cut || valid_len < cont.len() {
        ids.pop();
    }
    ids.truncate(k);
    ids
}

/// The tokens of the longest valid UTF-8 prefix of `bytes` (a continuation
/// cut mid-character loses that character; one starting inside a character
/// gives nothing) and that prefix's length; `None` if encoding fails.
pub(super) fn encode_valid_prefix(tokenizer: &Tokenizer, bytes: &[u8]) -> Option<(Vec<u32>, usize)> {
    let valid = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).ok()?,
    };
    Some((tokenizer.encode(valid, false, false).ok()?, valid.len()))
}

/// One drafted token and the distribution it was drawn from (`None`: one-hot).
#[derive(Clone)]
pub(super) struct Drafted {
    pub(super) id: u32,
    pub(super) q: Option<Vec<(u32, f32)>>,
}

impl Drafted {
    pub(super) fn q_of(&self, id: u32) -> f32 {
        match &self.q {
            None => (id == self.id) as u32 as f32,
            Some(q) => lookup(q, id),
        }
    }
}

pub(super) fn lookup(dist: &[(u32, f32)], id: u32) -> f32 {
    dist.iter().find(|&&(t, _)| t == id).map_or(0.0, |&(_, p)| p)
}

/// A draft model's output head cut down to the tokens it is likely to draft.
///
/// For a 0.5B Qwen the 151,936-row output head is 37% of the bytes a decode
/// step reads; a draft only needs the tokens the target will then accept.
/// Byte-level BPE ids follow merge order, so low ids are the frequent ones:
/// the first `first` rows (32,768 by default: 94% of the tokens of a Python
/// class the 1.5B wrote), plus the row of every token the sequence has
/// already contained (identifiers, names: what a continuation repeats).
/// Tokens outside are never drafted — the target supplies them — so the
/// proposal distribution `q` is the draft's softmax over these rows, and the
/// rejection rule keeps the output exactly the target's.
#[derive(Clone)]
pub(super) struct DraftHead {
    pub(super) first: usize,
    /// Ids at or above `first` seen in the sequence, and their rows' bytes
    /// (one after another, as the head stores them).
    pub(super) extra_ids: Vec<u32>,
    pub(super) extra: Vec<u8>,
    pub(super) known: std::collections::HashSet<u32>,
}

impl DraftHead {
    /// A head of the first `first` rows of `model`'s; `None` when that is
    /// (nearly) the whole head.
    pub(super) fn new(model: &Model, first: usize) -> Option<DraftHead> {
        let rows = model.output_head().rows;
        // Whole groups of 8 rows, so the first rows of an interleaved head
        // are a prefix of its bytes.
        let first = first.next_multiple_of(8);
        (first > 0 && first * 4 < rows * 3).then(|| DraftHead {
            first,
            extra_ids: Vec::new(),
            extra: Vec::new(),
            known: Default::default(),
        })
    }

    /// Adds the rows of `ids` not yet covered.
    pub(super) fn note(&mut self, model: &Model, ids: &[u32]) {
        let head = model.output_head();
        for &id in ids {
            let i = id as usize;
            if i >= self.first && i < head.rows && self.known.insert(id) {
                self.extra_ids.push(id);
                // (Row-major whatever the head's layout: `extra` is.)
                head.copy_row(i, &mut self.extra).expect("the model's head is a valid matrix");
            }
        }
    }

    /// Logits over the whole vocabulary from the final hidden state
    /// (`Logits::Hidden`): computed for the covered rows, `-inf` elsewhere.
    pub(super) fn logits(&self, model: &Model, pool: &ThreadPool, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        use minnow_kernels::matmul::{matmul, ActBuffer, Layout, QMatrix};
        let head = model.output_head();
        let row = head.row_bytes();
        let err = ModelError::from;
        let mut out = vec![f32::NEG_INFINITY; head.rows];
        let mut scratch = ActBuffer::default();
        let top = QMatrix { rows: self.first, data: &head.data[..self.first * row], ..head };
        matmul(pool, &top, hidden, 1, &mut out[..self.first], &mut scratch).map_err(err)?;
        if !self.extra_ids.is_empty() {
            let extra = QMatrix { rows: self.extra_ids.len(), data: &self.extra, layout: Layout::RowMajor, ..head };
            let mut vals = vec![0f32; self.extra_ids.len()];
            matmul(pool, &extra, hidden, 1, &mut vals, &mut scratch).map_err(err)?;
            for (&id, v) in self.extra_ids.iter().zip(vals) {
                out[id as usize] = v;
            }
        }
        Ok(out)
    }
}

/// A draft model's own KV cache and sampler, kept in step with the
/// committed text (the model itself is passed in: the scheduler keeps this
/// state between steps without borrowing the model).
#[derive(Clone)]
pub(super) struct ModelDrafter {
    pub(super) cache: KvCache,
    /// The tokens in `cache`, in order.
    pub(super) fed: Vec<u32>,
    /// Logits after the last of `fed`, when they are current.
    pub(super) next_logits: Option<Vec<f32>>,
    /// Draft tokens must be below this (the target's logit rows).
    pub(super) limit: usize,
    /// `q`'s transforms; its history follows the committed tokens.
    pub(super) sampler: Sampler,
    /// Committed tokens `sampler` has seen.
    pub(super) seen: usize,
    pub(super) greedy: bool,
    /// See [`SpecConfig::draft_confidence`].
    pub(super) confidence: f32,
    /// Seconds and count of this round's draft passes of at most two new
    /// tokens (what a round costs; long catch-ups after a pause are not).
    pub(super) timing: (f64, usize),
    /// The cut-down output head (`None`: the whole head).
    pub(super) head: Option<DraftHead>,
}

/// The softmax probability of the largest logit.
pub(super) fn top_probability(logits: &[f32]) -> f32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if !m.is_finite() {
        return 1.0;
    }
    let sum: f32 = logits.iter().map(|&x| (x - m).exp()).sum();
    1.0 / sum
}

impl ModelDrafter {
    /// Feeds `tokens` (appending them to the cache) and returns the logits
    /// after the last one, through the cut-down head when there is one.
    pub(super) fn feed(&mut self, model: &Model, pool: &ThreadPool, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let Some(head) = self.head.as_mut() else {
            return prefill(model, pool, &mut self.cache, tokens);
        };
        head.note(model, tokens);
        let hidden = prefill_for(model, pool, &mut self.cache, tokens, Logits::Hidden)?;
        head.logits(model, pool, &hidden)
    }

    /// Makes `fed` a prefix of `hist` (dropping rejected drafts), then feeds
    /// the rest of `hist`; leaves the logits for the next token in `next_logits`.
    pub(super) fn catch_up(
        &mut self,
        model: &Model,
        pool: &ThreadPool,
        hist: &[u32],
        stats: &mut SpecStats,
    ) -> Result<(), ModelError> {
        let common = shared_prefix(&self.fed, hist);
        if common < self.fed.len() {
            self.fed.truncate(common);
            self.cache.truncate(common);
            self.next_logits = None;
        }
        if self.fed.len() == hist.len() && self.next_logits.is_none() {
            // Logits of the last position are needed again: recompute it.
            let n = self.fed.len().saturating_sub(1);
            self.fed.truncate(n);
            self.cache.truncate(n);
        }
        if self.fed.len() < hist.len() {
            let t = Instant::now();
            let pending = &hist[self.fed.len()..];
            let chunks = pending.len().div_ceil(crate::generate::PROMPT_CHUNK);
            self.next_logits = Some(self.feed(model, pool, pending)?);
            let secs = t.elapsed().as_secs_f64();
            if pending.len() <= 2 {
                self.timing.0 += secs;
                self.timing.1 += 1;
            }
            self.fed.extend_from_slice(pending);
            stats.draft_forwards += chunks;
            stats.draft_secs += secs;
        }
        for &t in &hist[self.seen..] {
            self.sampler.accept(t);
        }
        self.seen = hist.len();
        Ok(())
    }

    /// Drafts `k` tokens after `hist`, drawing from `q` with `rng`.
    pub(super) fn propose(
        &mut self,
        model: &Model,
        pool: &ThreadPool,
        hist: &[u32],
        k: usize,
        rng: &mut SplitMix,
        stats: &mut SpecStats,
    ) -> Result<Vec<Drafted>, ModelError> {
        self.timing = (0.0, 0);
        self.catch_up(model, pool, hist, stats)?;
        let mut sampler = self.sampler.clone();
        let mut out = Vec::with_capacity(k);
        let mut logits = self.next_logits.take().unwrap_or_default();
        for i in 0..k {
            if logits.len() > self.limit {
                // Ids the target does not have (padding) can never be accepted.
                logits[self.limit..].fill(f32::NEG_INFINITY);
            }
            let (d, conf) = if self.greedy {
                let id = sampler.distribution(&logits).first().map_or(0, |x| x.0);
                let conf = if self.confidence > 0.0 { top_probability(&logits) } else { 1.0 };
                (Drafted { id, q: None }, conf)
            } else {
                let q = sampler.distribution(&logits);
                let id = draw(&q, rng.next_f64());
                let conf = lookup(&q, id);
                (Drafted { id, q: Some(q) }, conf)
            };
            sampler.accept(d.id);
            let id = d.id;
            out.push(d);
            if i + 1 < k && conf >= self.confidence {
                let t = Instant::now();
                logits = self.feed(model, pool, &[id])?;
                let secs = t.elapsed().as_secs_f64();
                self.fed.push(id);
                self.timing.0 += secs;
                self.timing.1 += 1;
                stats.draft_forwards += 1;
                stats.draft_secs += secs;
            }
        }
        Ok(out)
    }
}

#[derive(Clone)]
pub(super) enum Drafter {
    Model(Box<ModelDrafter>),
    NGram,
}

/// Inverse-CDF draw from a (normalised) distribution list; `u` in [0, 1).
pub(super) fn draw(dist: &[(u32, f32)], u: f64) -> u32 {
    let total: f64 = dist.iter().map(|&(_, p)| p as f64).sum();
    let r = u * total;
    let mut cum = 0.0;
    for &(t, p) in dist {
        cum += p as f64;
        if cum > r {
            return t;
        }
    }
    dist.last().map_or(0, |x| x.0)
}
