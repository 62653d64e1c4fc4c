//! Speculative decoding: a cheap drafter proposes the next few tokens, the
//! target model checks all of them in one forward pass, and the longest
//! acceptable prefix is kept plus one token from the target itself.
//!
//! Two drafters:
//! - [`Draft::Model`]: a smaller model sharing the target's vocabulary
//!   (Qwen2.5-Coder-0.5B for the 1.5B), checked by [`check_draft_vocab`].
//!   It scores only the tokens it is likely to draft (the most frequent ids
//!   and those already in the sequence; `DraftHead`): the output head is
//!   over a third of a small model's decode step.
//! - [`Draft::NGram`]: prompt lookup. The longest suffix of the text so far
//!   (or the last 3, 2 or 1 tokens) is looked up in the prompt and the output
//!   so far, and what followed its latest earlier occurrence is proposed. No
//!   second model, no cost to draft; pays off when the answer copies its
//!   input (extraction, code editing). Given earlier answers to similar
//!   prompts ([`SpecSeq::set_references`], [`crate::lookup_memory`]) it also
//!   drafts the skeleton those answers share, which no prompt contains.
//!
//! # Why the output is the target's
//!
//! Verification reads the target's distribution `p` (exactly what
//! [`Sampler::distribution`] would sample from, penalties and filters
//! included) at every drafted position from one [`Logits::All`] pass over
//! `[last, d1 .. dk]`. Draft token `x`, drawn from the drafter's distribution
//! `q`, is accepted with probability `min(1, p(x) / q(x))`; at the first
//! rejection a token is drawn from `normalize(max(0, p − q))` and the round
//! ends; if all `k` are accepted a bonus token is drawn from `p` at the last
//! row. This is the standard rejection-sampling rule (Leviathan et al. 2023;
//! Chen et al. 2023): each emitted token has exactly the target's
//! distribution. Greedy decoding is the special case where `p` is one-hot
//! (accept iff the draft is the target's argmax, else emit the argmax), so
//! the output equals plain greedy decoding token for token — the forward
//! pass computes each row independently of the others in the batch, so the
//! verifying pass's logits are the ones a token-by-token pass would give.
//! The n-gram drafter is deterministic: `q` is one-hot and a draft is
//! accepted with probability `p(x)`.
//!
//! Rejected positions are rolled back with [`KvCache::truncate`].
//!
//! # When it pays
//!
//! A `Controller` keeps running estimates of the acceptance rate `α` per
//! drafted token, the time of a plain one-token target step, the extra time
//! per additional token in a verifying pass, and the time of a draft forward
//! pass. Before each round it picks the draft length `k` maximising the
//! expected tokens per second, `(1 − α^(k+1)) / (1 − α)` tokens for
//! `k · t_draft + t_plain + k · t_extra` seconds, and compares the best with
//! plain decoding (`1 / t_plain`). When speculation loses it is switched off
//! for a while (16 tokens, doubling each time it still loses when retried);
//! a plain step every 32 rounds keeps `t_plain` current on a machine whose
//! load changes.
//!
//! # Who owns what
//!
//! [`SpecSeq`] is one sequence's speculation state (drafter and its KV
//! cache, controller, history, statistics). [`Speculator`] owns one next to
//! the sequence's target KV cache and its [`Sequence`] (sampling and the
//! stop rule; `minnow run --draft`); the scheduler keeps one per sequence
//! decoding alone and runs rounds with [`SpecSeq::step`] on its own cache
//! and `Sequence` (`minnow serve --draft`). Neither holds the models: a
//! round borrows them. Every token a round commits goes through
//! [`Sequence::push`], and every draw and verification through the
//! sequence, as in plain decoding.

use crate::generate::{prefill, prefill_for, FinishReason, GenerateParams, Generation};
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::lookup_memory::{consensus_draft, shared_prefix, Consensus, Reference};
use crate::model::{Logits, Model, ModelError};
use crate::sampler::{Sampler, SamplingParams};
use crate::sequence::{Pushed, Sequence};
use crate::tokenizer::Tokenizer;
use minnow_kernels::mix::SplitMix64;
use minnow_kernels::pool::ThreadPool;
use std::sync::Arc;
use std::time::Instant;

/// Where draft tokens come from.
#[derive(Clone, Copy)]
pub enum Draft<'a> {
    /// A smaller model with the same vocabulary (see [`check_draft_vocab`]).
    Model(&'a Model),
    /// Prompt lookup: continuations of earlier occurrences of the last few tokens.
    NGram,
}

impl Draft<'_> {
    pub fn method(&self) -> &'static str {
        match self {
            Draft::Model(_) => "draft-model",
            Draft::NGram => "ngram",
        }
    }
}

/// How prompt lookup finds what to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The longest suffix of the text so far (at least
    /// [`SpecConfig::lookup_min_bytes`]) that occurs earlier; the text that
    /// followed it is tokenized and drafted. Finds copies whose tokens differ
    /// from the source's: a name quoted in JSON (`"Liam`) was a word after a
    /// space in the message (` Liam`), a different token.
    Text,
    /// The last `ngram_max ..= ngram_min` token ids, longest first, and the
    /// ids that followed their latest earlier occurrence.
    Tokens,
}

/// Knobs of speculative decoding. The defaults suit both drafters.
#[derive(Debug, Clone)]
pub struct SpecConfig {
    /// Draft length of the first rounds (and always, when not adaptive).
    pub k_start: usize,
    /// Longest draft an adaptive run may use.
    pub k_max: usize,
    /// Choose `k` from measured acceptance and timings; `false` always drafts
    /// `k_start` tokens (fewer only where the token limit or the context
    /// ends) and never switches speculation off: for tests and experiments.
    pub adaptive: bool,
    /// Switch speculation off while it measures slower than plain decoding.
    pub auto_off: bool,
    /// How prompt lookup matches: on text (the default) or on token ids.
    pub lookup: Lookup,
    /// Longest n-gram looked up by [`Lookup::Tokens`].
    pub ngram_max: usize,
    /// Shortest n-gram looked up by [`Lookup::Tokens`].
    pub ngram_min: usize,
    /// Shortest text match, in bytes, that [`Lookup::Text`] drafts from.
    pub lookup_min_bytes: usize,
    /// With a draft model, look up the prompt first: an n-gram match of at
    /// least this many tokens is verified instead of running the draft model
    /// (while lookup pays better than the model). 0 (the default): never —
    /// on code, Qwen2.5-Coder-0.5B agrees with the 1.5B on ~97% of tokens
    /// while lookups are right about half the time, so lookups displace
    /// better drafts.
    pub hybrid_ngram_min: usize,
    /// A draft model stops drafting after a token it gives less than this
    /// probability (such tokens are often rejected, and each further draft
    /// costs a draft forward pass). 0: always draft the planned length. Not
    /// applied when not adaptive.
    pub draft_confidence: f32,
    /// A draft model scores only the first this many tokens of its
    /// vocabulary (the most frequent) and those already in the sequence
    /// (see `DraftHead`); 0: every token.
    pub draft_head_rows: usize,
    /// The draft model's sampling (its `q`); `None`: the target's. Only the
    /// distribution is used (draws come from the speculator's own generator);
    /// with a greedy target the draft is always greedy.
    pub draft_sampling: Option<SamplingParams>,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            k_start: 4,
            k_max: 10,
            adaptive: true,
            auto_off: true,
            lookup: Lookup::Text,
            ngram_max: 3,
            ngram_min: 1,
            lookup_min_bytes: 4,
            hybrid_ngram_min: 0,
            draft_confidence: 0.5,
            draft_head_rows: 32_768,
            draft_sampling: None,
        }
    }
}

/// What speculation did during one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecStats {
    /// "draft-model" or "ngram".
    pub method: &'static str,
    /// Verifying passes (rounds with at least one drafted token).
    pub rounds: usize,
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
    /// Of `drafted` and `accepted`: those from prompt lookup (all of them
    /// with n-gram drafting; with a draft model, the lookups tried first).
    pub ngram_drafted: usize,
    pub ngram_accepted: usize,
    /// Of the lookups: those from earlier answers (`--lookup-memory`).
    pub memory_drafted: usize,
    pub memory_accepted: usize,
    /// Target forward passes while generating (verifying + plain), not
    /// counting the prompt.
    pub target_forwards: usize,
    /// Target forward passes of one token without a draft (speculation off,
    /// no n-gram match, or re-measuring the plain step time).
    pub plain_steps: usize,
    /// Draft model forward passes (catching up on accepted tokens and drafting).
    pub draft_forwards: usize,
    /// Seconds in target forward passes while generating.
    pub target_secs: f64,
    /// Seconds in draft forward passes while generating (excluding the prompt).
    pub draft_secs: f64,
    /// Seconds the draft model spent reading the prompt (part of the prompt time).
    pub draft_prompt_secs: f64,
    /// Measured time of a plain one-token target step (running average), if
    /// one was measured: the baseline of [`SpecStats::speedup`].
    pub plain_step_secs: Option<f64>,
    /// Times speculation switched itself off because it measured slower.
    pub switched_off: usize,
    /// Generated tokens while speculation was off.
    pub tokens_while_off: usize,
}

impl SpecStats {
    /// Accepted fraction of drafted tokens.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Generated tokens per target forward pass, counting the prompt's last
    /// position (which yields a token in plain decoding) as one: plain
    /// decoding scores exactly 1.
    pub fn tokens_per_target_forward(&self, gen_tokens: usize) -> f64 {
        gen_tokens as f64 / (self.target_forwards as f64 + 1.0).max(1.0)
    }

    /// Estimated speed-up over plain decoding: the time plain decoding takes
    /// for `gen_tokens` at the measured plain step time, over the time taken.
    pub fn speedup(&self, gen_tokens: usize, gen_secs: f64) -> Option<f64> {
        let t = self.plain_step_secs?;
        (gen_secs > 0.0 && gen_tokens > 0).then(|| gen_tokens as f64 * t / gen_secs)
    }

    /// One line for a run's summary.
    pub fn summary(&self, gen_tokens: usize, gen_secs: f64) -> String {
        let mut s = format!(
            "speculative ({}): {}/{} drafts accepted ({:.0}%), {:.2} tokens per target forward",
            self.method,
            self.accepted,
            self.drafted,
            100.0 * self.acceptance_rate(),
            self.tokens_per_target_forward(gen_tokens)
        );
        if let Some(x) = self.speedup(gen_tokens, gen_secs) {
            s += &format!(
                ", speed-up ~{x:.2}x vs plain decoding (measured step {:.1} ms)",
                1e3 * self.plain_step_secs.unwrap_or(0.0)
            );
        }
        if self.memory_drafted > 0 {
            s += &format!(" ({}/{} from earlier answers)", self.memory_accepted, self.memory_drafted);
        }
        if self.switched_off > 0 {
            s += &format!(", switched off {}x ({} tokens without drafts)", self.switched_off, self.tokens_while_off);
        }
        s
    }

    /// The statistics and the derived figures as JSON.
    pub fn to_json(&self, gen_tokens: usize, gen_secs: f64) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["acceptance_rate"] = self.acceptance_rate().into();
        v["tokens_per_target_forward"] = self.tokens_per_target_forward(gen_tokens).into();
        v["speedup"] = self.speedup(gen_tokens, gen_secs).into();
        v
    }
}

/// How a draft model's vocabulary relates to the target's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabMatch {
    /// Token strings identical in both (ids `0..shared`).
    pub shared: usize,
    /// Padding/unused tokens only the target has.
    pub target_extra: usize,
    /// Padding/unused tokens only the draft has.
    pub draft_extra: usize,
}

/// Checks that `draft` can draft for `target`: the same tokenizer kind and
/// the same token strings under the same ids. One vocabulary may extend the
/// other with padding or unused entries (token type "unused", or names such
/// as `[PAD151643]`, `<|pad|>`, `<unused12>`); anything else is refused,
/// since ids would mean different text.
pub fn check_draft_vocab(target: &LoadedModel, draft: &LoadedModel) -> Result<VocabMatch, String> {
    let kind = |m: &LoadedModel| m.file.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("?").to_string();
    let (kt, kd) = (kind(target), kind(draft));
    if kt != kd {
        return Err(format!(
            "the draft model's vocabulary differs from the target's: its tokenizer is `{kd}`, the target's `{kt}`; \
             speculative decoding needs a draft with the target's vocabulary (e.g. a smaller model of the same family)"
        ));
    }
    let (tt, td) = (&target.tokenizer, &draft.tokenizer);
    let shared = tt.vocab_size().min(td.vocab_size());
    if let Some(i) = (0..shared as u32).find(|&i| tt.token_text(i) != td.token_text(i)) {
        return Err(format!(
            "the draft model's vocabulary differs from the target's: token {i} is {:?} in the draft but {:?} in the target \
             ({} vs {} tokens); speculative decoding needs a draft with the target's vocabulary",
            td.token_text(i),
            tt.token_text(i),
            td.vocab_size(),
            tt.vocab_size()
        ));
    }
    let extra_ok = |m: &LoadedModel, who: &str| -> Result<usize, String> {
        let n = m.tokenizer.vocab_size();
        let types = m.file.get("tokenizer.ggml.token_type").and_then(|v| v.as_array());
        for i in shared..n {
            let ty = types.and_then(|a| a.get(i)).and_then(|v| v.as_i64());
            let text = m.tokenizer.token_text(i as u32);
            if !is_padding(text, ty) {
                return Err(format!(
                    "the draft model's vocabulary differs from the target's: the {who} has {} tokens beyond the {shared} \
                     they share, and token {i} ({text:?}) is not padding; speculative decoding needs a draft with the \
                     target's vocabulary",
                    n - shared
                ));
            }
        }
        Ok(n - shared)
    };
    Ok(VocabMatch { shared, target_extra: extra_ok(target, "target")?, draft_extra: extra_ok(draft, "draft")? })
}

/// A vocabulary entry that no text produces: type "unused" (5), or a
/// padding/reserved placeholder name.
fn is_padding(text: &str, ty: Option<i64>) -> bool {
    if ty == Some(5) {
        return true;
    }
    let t = text.to_ascii_lowercase();
    ["[pad", "<pad", "<|pad", "[empty_", "<unused", "<|unused", "[unused", "<|reserved", "<reserved", "<|extra_"]
        .iter()
        .any(|p| t.starts_with(p))
}

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
const LOOKUP_MAX_MATCH: usize = 64;
/// Most bytes of continuation tokenized as a draft.
const LOOKUP_MAX_CONT: usize = 64;
/// Stands for a control token in the byte history: matches only itself and
/// ends continuations (its text would tokenize as plain characters).
const CONTROL_BYTE: u8 = 0;

/// Text-level prompt lookup: the longest suffix of `text` (at least
/// `min_match` bytes; the latest occurrence among equals) that also occurs
/// earlier, and the bytes that followed that occurrence (up to
/// `LOOKUP_MAX_CONT`, stopping at a `CONTROL_BYTE`). Returns the
/// continuation and whether it was cut short by the length cap.
pub fn text_lookup(text: &[u8], min_match: usize) -> Option<(&[u8], bool)> {
    text_lookup_match(text, min_match).map(|(cont, cut, _)| (cont, cut))
}

/// [`text_lookup`] and the length of the match, in bytes.
fn text_lookup_match(text: &[u8], min_match: usize) -> Option<(&[u8], bool, usize)> {
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
fn text_lookup_propose(tokenizer: &Tokenizer, seq: &mut SpecSeq, k_ngram: usize, k_memory: usize) -> (Vec<u32>, Src) {
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
fn consensus_propose(tokenizer: &Tokenizer, c: &Consensus, k: usize) -> Vec<u32> {
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
fn tokenize_continuation(tokenizer: &Tokenizer, cont: &[u8], cut: bool, k: usize) -> Vec<u32> {
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
fn encode_valid_prefix(tokenizer: &Tokenizer, bytes: &[u8]) -> Option<(Vec<u32>, usize)> {
    let valid = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).ok()?,
    };
    Some((tokenizer.encode(valid, false, false).ok()?, valid.len()))
}

/// One drafted token and the distribution it was drawn from (`None`: one-hot).
#[derive(Clone)]
struct Drafted {
    id: u32,
    q: Option<Vec<(u32, f32)>>,
}

impl Drafted {
    fn q_of(&self, id: u32) -> f32 {
        match &self.q {
            None => (id == self.id) as u32 as f32,
            Some(q) => lookup(q, id),
        }
    }
}

fn lookup(dist: &[(u32, f32)], id: u32) -> f32 {
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
struct DraftHead {
    first: usize,
    /// Ids at or above `first` seen in the sequence, and their rows' bytes
    /// (one after another, as the head stores them).
    extra_ids: Vec<u32>,
    extra: Vec<u8>,
    known: std::collections::HashSet<u32>,
}

impl DraftHead {
    /// A head of the first `first` rows of `model`'s; `None` when that is
    /// (nearly) the whole head.
    fn new(model: &Model, first: usize) -> Option<DraftHead> {
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
    fn note(&mut self, model: &Model, ids: &[u32]) {
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
    fn logits(&self, model: &Model, pool: &ThreadPool, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        use minnow_kernels::matmul::{matmul, ActBuffer, Layout, QMatrix};
        let head = model.output_head();
        let row = head.row_bytes();
        let err = |e: minnow_kernels::formats::LayoutError| ModelError::new(e.to_string());
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
struct ModelDrafter {
    cache: KvCache,
    /// The tokens in `cache`, in order.
    fed: Vec<u32>,
    /// Logits after the last of `fed`, when they are current.
    next_logits: Option<Vec<f32>>,
    /// Draft tokens must be below this (the target's logit rows).
    limit: usize,
    /// `q`'s transforms; its history follows the committed tokens.
    sampler: Sampler,
    /// Committed tokens `sampler` has seen.
    seen: usize,
    greedy: bool,
    /// See [`SpecConfig::draft_confidence`].
    confidence: f32,
    /// Seconds and count of this round's draft passes of at most two new
    /// tokens (what a round costs; long catch-ups after a pause are not).
    timing: (f64, usize),
    /// The cut-down output head (`None`: the whole head).
    head: Option<DraftHead>,
}

/// The softmax probability of the largest logit.
fn top_probability(logits: &[f32]) -> f32 {
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
    fn feed(&mut self, model: &Model, pool: &ThreadPool, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let Some(head) = self.head.as_mut() else {
            return prefill(model, pool, &mut self.cache, tokens);
        };
        head.note(model, tokens);
        let hidden = prefill_for(model, pool, &mut self.cache, tokens, Logits::Hidden)?;
        head.logits(model, pool, &hidden)
    }

    /// Makes `fed` a prefix of `hist` (dropping rejected drafts), then feeds
    /// the rest of `hist`; leaves the logits for the next token in `next_logits`.
    fn catch_up(
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
    fn propose(
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
enum Drafter {
    Model(Box<ModelDrafter>),
    NGram,
}

/// Inverse-CDF draw from a (normalised) distribution list; `u` in [0, 1).
fn draw(dist: &[(u32, f32)], u: f64) -> u32 {
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

/// The speculator's own uniform draws (acceptance tests, draft and residual
/// draws), separate from the target sampler's stream.
#[derive(Clone, Debug)]
struct SplitMix(SplitMix64);

impl SplitMix {
    fn new(seed: u64) -> SplitMix {
        SplitMix(SplitMix64::new(seed ^ 0x5bd1_e995_9e37_79b9))
    }
    fn next_f64(&mut self) -> f64 {
        self.0.next_f64()
    }
}

/// Exponential moving average, empty until the first sample.
#[derive(Clone, Copy, Debug, Default)]
struct Ema(Option<f64>);

impl Ema {
    fn add(&mut self, x: f64, w: f64) {
        self.0 = Some(match self.0 {
            None => x,
            Some(m) => m + w * (x - m),
        });
    }
}

/// A ratio of exponentially decayed sums, `Σ num / Σ den`: an average that
/// weighs each sample by its size and keeps noisy samples unclamped (a
/// per-sample `max(0, x)` would bias it upwards).
#[derive(Clone, Copy, Debug, Default)]
struct Ratio {
    num: f64,
    den: f64,
}

impl Ratio {
    const DECAY: f64 = 0.85;

    fn add(&mut self, num: f64, den: f64) {
        self.num = Self::DECAY * self.num + num;
        self.den = Self::DECAY * self.den + den;
    }

    fn get(&self) -> Option<f64> {
        (self.den > 0.0).then(|| self.num / self.den)
    }
}

/// Where a round's drafts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Model,
    /// Prompt lookup: the prompt and the output so far.
    NGram,
    /// What earlier answers agree on ([`crate::lookup_memory`]): skeleton
    /// text, accepted far more often than prompt copies (a copied value runs
    /// on past its end), so it gets its own acceptance rate and length.
    Memory,
}

/// Acceptance, measured speed and on/off state of one draft source.
#[derive(Clone, Debug)]
struct SourceState {
    /// Whether the speculator has this source at all.
    present: bool,
    /// Accepted drafts per draft examined (up to and including the first
    /// rejection): `α`.
    alpha: Ratio,
    /// Tokens committed per second of this source's rounds (drafting and
    /// verifying), measured.
    speed: Ratio,
    /// Rounds since the source was (re)enabled.
    rounds: usize,
    /// Off until this many tokens are generated.
    off_until: usize,
    /// Tokens to stay off the next time the source loses.
    backoff: usize,
}

/// Rounds a source runs before it may be judged.
const PROBE_ROUNDS: usize = 4;

impl SourceState {
    fn new(present: bool) -> SourceState {
        SourceState { present, alpha: Ratio::default(), speed: Ratio::default(), rounds: 0, off_until: 0, backoff: 16 }
    }

    fn alpha(&self) -> f64 {
        // A prior of 0.6 worth 2 trials.
        ((self.alpha.num + 1.2) / (self.alpha.den + 2.0)).clamp(0.02, 0.98)
    }
}

/// Draft lengths for the next step; 0 means "do not use this source".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Plan {
    model: usize,
    ngram: usize,
    memory: usize,
}

/// Picks draft lengths and decides whether speculation pays (see the
/// module doc).
#[derive(Clone, Debug)]
struct Controller {
    adaptive: bool,
    auto_off: bool,
    k_start: usize,
    k_max: usize,
    /// Seconds of a plain one-token step.
    t_plain: Ema,
    /// Extra seconds per drafted token in a verifying pass (over `t_plain`).
    t_extra: Ratio,
    /// Seconds per draft model forward pass.
    t_draft: Ratio,
    model: SourceState,
    ngram: SourceState,
    memory: SourceState,
    rounds_since_plain: usize,
}

/// Rounds between plain steps that refresh the plain step time.
const REMEASURE_EVERY: usize = 32;

impl Controller {
    fn new(cfg: &SpecConfig, model: bool, ngram: bool) -> Controller {
        Controller {
            adaptive: cfg.adaptive,
            auto_off: cfg.auto_off && cfg.adaptive,
            k_start: cfg.k_start.max(1),
            k_max: cfg.k_max.max(cfg.k_start).max(1),
            t_plain: Ema::default(),
            t_extra: Ratio::default(),
            t_draft: Ratio::default(),
            model: SourceState::new(model),
            ngram: SourceState::new(ngram),
            // Present with text lookup; silent unless references are set.
            memory: SourceState::new(ngram && cfg.lookup == Lookup::Text),
            rounds_since_plain: 0,
        }
    }

    fn source(&mut self, src: Src) -> &mut SourceState {
        match src {
            Src::Model => &mut self.model,
            Src::NGram => &mut self.ngram,
            Src::Memory => &mut self.memory,
        }
    }

    /// Expected tokens per second of a round of `k` drafts from `src`: `(1 −
    /// α^(k+1)) / (1 − α)` tokens for `t_plain + k (t_extra + t_draft)`.
    fn rate(&self, src: Src, k: usize, t_plain: f64) -> f64 {
        let (a, draft) = match src {
            Src::Model => (self.model.alpha(), self.t_draft.get().unwrap_or(0.3 * t_plain)),
            Src::NGram => (self.ngram.alpha(), 0.0),
            Src::Memory => (self.memory.alpha(), 0.0),
        };
        let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
        let extra = self.t_extra.get().unwrap_or(0.1 * t_plain).max(0.0);
        tokens / (t_plain + k as f64 * (extra + draft))
    }

    /// The best draft length of `src` and its predicted rate.
    fn best(&self, src: Src, t_plain: f64) -> (usize, f64) {
        let (mut best_k, mut best) = (1, 0.0);
        for k in 1..=self.k_max {
            let r = self.rate(src, k, t_plain);
            if r > best {
                (best_k, best) = (k, r);
            }
        }
        (best_k, best)
    }

    /// Decides one source: its draft length, or 0 while it is off. A source
    /// that has run its probe rounds is switched off when both its predicted
    /// and its measured speed fall below `beat` (tokens per second): one
    /// noisy estimate alone does not turn it off.
    fn decide(&mut self, src: Src, generated: usize, t_plain: f64, beat: f64, stats: &mut SpecStats) -> usize {
        let (k, predicted) = self.best(src, t_plain);
        let (auto_off, k_start) = (self.auto_off, self.k_start);
        let st = self.source(src);
        if !st.present || generated < st.off_until {
            return 0;
        }
        if st.rounds < PROBE_ROUNDS {
            // Try the starting length: estimates are still mostly prior.
            return k.max(k_start);
        }
        let measured = st.speed.get().unwrap_or(f64::INFINITY);
        if auto_off && predicted < 0.95 * beat && measured < 0.95 * beat {
            st.off_until = generated + st.backoff;
            st.backoff = (st.backoff * 2).min(512);
            st.rounds = 0;
            st.speed = Ratio::default();
            stats.switched_off += 1;
            return 0;
        }
        k
    }

    /// Draft lengths for the next step. All zero: a plain step.
    fn plan(&mut self, generated: usize, stats: &mut SpecStats) -> Plan {
        if !self.adaptive {
            let k = self.k_start;
            let on = |s: &SourceState| if s.present { k } else { 0 };
            return Plan { model: on(&self.model), ngram: on(&self.ngram), memory: on(&self.memory) };
        }
        let Some(t_plain) = self.t_plain.0 else { return Plan::default() };
        if self.rounds_since_plain >= REMEASURE_EVERY {
            return Plan::default();
        }
        let model = self.decide(Src::Model, generated, t_plain, 1.0 / t_plain, stats);
        // Prompt lookup must beat the draft model where that runs.
        let beat = if model > 0 { self.best(Src::Model, t_plain).1.max(1.0 / t_plain) } else { 1.0 / t_plain };
        let ngram = self.decide(Src::NGram, generated, t_plain, beat, stats);
        let memory = self.decide(Src::Memory, generated, t_plain, beat, stats);
        Plan { model, ngram, memory }
    }

    /// Whether every present source is switched off.
    fn all_off(&self, generated: usize) -> bool {
        let off = |s: &SourceState| !s.present || generated < s.off_until;
        self.adaptive && off(&self.model) && off(&self.ngram) && off(&self.memory)
    }

    fn record_plain(&mut self, secs: f64) {
        // A slow average: one step on a loaded machine can take twice as long as the next.
        self.t_plain.add(secs, 0.2);
        self.rounds_since_plain = 0;
    }

    /// Records a round: `committed` tokens, verified in `verify_secs`, after
    /// `draft_passes` draft passes taking `draft_secs` (single-token passes
    /// only) out of `draft_total` seconds of drafting.
    #[allow(clippy::too_many_arguments)]
    fn record_round(
        &mut self,
        src: Src,
        drafted: usize,
        accepted: usize,
        committed: usize,
        verify_secs: f64,
        (draft_secs, draft_passes): (f64, usize),
        draft_total: f64,
    ) {
        self.rounds_since_plain += 1;
        let t_plain = self.t_plain.0;
        let st = self.source(src);
        st.rounds += 1;
        let examined = if accepted < drafted { accepted + 1 } else { accepted };
        st.alpha.add(accepted as f64, examined as f64);
        st.speed.add(committed as f64, verify_secs + draft_total);
        if let Some(tp) = t_plain {
            self.t_extra.add(verify_secs - tp, drafted as f64);
        }
        if draft_passes > 0 {
            self.t_draft.add(draft_secs, draft_passes as f64);
        }
    }
}

/// The speculation state of one sequence: drafter, controller, history and
/// statistics — everything but the models and the sequence's own target KV
/// cache and sampler. [`Speculator`] owns one next to those; the scheduler
/// keeps one per decoding sequence and runs rounds with [`SpecSeq::step`].
#[derive(Clone)]
pub struct SpecSeq {
    drafter: Drafter,
    /// Prompt and generated tokens.
    hist: Vec<u32>,
    prompt_len: usize,
    rng: SplitMix,
    ctl: Controller,
    /// Shortest and longest n-gram looked up (token lookup).
    ngram: (usize, usize),
    lookup: Lookup,
    lookup_min_bytes: usize,
    /// The bytes of `hist` (control tokens as [`CONTROL_BYTE`]), for text lookup.
    text: Vec<u8>,
    /// Where the generated part of `text` starts.
    out_start: usize,
    /// Earlier answers to similar prompts, aligned with this one's output
    /// (see [`crate::lookup_memory`]); text lookup drafts from them too.
    refs: Vec<Reference>,
    /// `MINNOW_SPEC_DEBUG` set: a line per round on stderr.
    debug: bool,
    stats: SpecStats,
    /// Scratch of the target's vocabulary size for residual distributions.
    scratch: Vec<f32>,
}

impl SpecSeq {
    /// State for a sequence of `target` sampled with `sampling`, contexts of
    /// `ctx` positions. A draft model must already have passed
    /// [`check_draft_vocab`].
    pub fn new(
        target: &Model,
        draft: Draft<'_>,
        ctx: usize,
        sampling: &SamplingParams,
        cfg: &SpecConfig,
    ) -> Result<SpecSeq, ModelError> {
        sampling.validate().map_err(ModelError::new)?;
        if let Some(d) = &cfg.draft_sampling {
            d.validate().map_err(|e| ModelError::new(format!("draft sampling: {e}")))?;
        }
        if cfg.ngram_min == 0 || cfg.ngram_min > cfg.ngram_max {
            return Err(ModelError::new("n-gram sizes must satisfy 1 <= min <= max"));
        }
        let vocab = target.config().vocab_size;
        let greedy = sampling.temperature <= 0.0;
        let drafter = match draft {
            Draft::Model(m) => {
                let mut dp = cfg.draft_sampling.clone().unwrap_or_else(|| sampling.clone());
                if greedy {
                    dp = SamplingParams { seed: dp.seed, ..SamplingParams::greedy() };
                }
                Drafter::Model(Box::new(ModelDrafter {
                    cache: m.new_cache(ctx),
                    fed: Vec::new(),
                    next_logits: None,
                    limit: vocab.min(m.config().vocab_size),
                    greedy: dp.temperature <= 0.0,
                    sampler: Sampler::new(dp),
                    seen: 0,
                    confidence: if cfg.adaptive { cfg.draft_confidence } else { 0.0 },
                    timing: (0.0, 0),
                    head: DraftHead::new(m, cfg.draft_head_rows),
                }))
            }
            Draft::NGram => Drafter::NGram,
        };
        let (has_model, ngram_min) = match draft {
            Draft::Model(_) => (true, cfg.hybrid_ngram_min.max(cfg.ngram_min)),
            Draft::NGram => (false, cfg.ngram_min),
        };
        let has_ngram = !has_model || (cfg.hybrid_ngram_min > 0 && cfg.hybrid_ngram_min <= cfg.ngram_max);
        Ok(SpecSeq {
            drafter,
            hist: Vec::new(),
            prompt_len: 0,
            rng: SplitMix::new(sampling.seed),
            ctl: Controller::new(cfg, has_model, has_ngram),
            ngram: (ngram_min, cfg.ngram_max),
            lookup: cfg.lookup,
            lookup_min_bytes: cfg.lookup_min_bytes,
            text: Vec::new(),
            out_start: 0,
            refs: Vec::new(),
            debug: std::env::var_os("MINNOW_SPEC_DEBUG").is_some(),
            stats: SpecStats { method: draft.method(), ..SpecStats::default() },
            scratch: vec![0.0; vocab],
        })
    }

    pub fn stats(&self) -> &SpecStats {
        &self.stats
    }

    /// Earlier answers to similar prompts for text lookup to draft from
    /// ([`LookupMemory::references_for`](crate::lookup_memory::LookupMemory::references_for));
    /// ignored by token lookup and by draft models.
    pub fn set_references(&mut self, refs: Vec<Arc<[u8]>>) {
        self.refs = refs.into_iter().map(Reference::new).collect();
    }

    /// The measured time of a plain one-token target step (running average),
    /// once one was measured.
    pub fn plain_step_secs(&self) -> Option<f64> {
        self.ctl.t_plain.0
    }

    /// Tokens generated since the prompt.
    fn generated(&self) -> usize {
        self.hist.len() - self.prompt_len
    }

    /// Appends a committed token to the history (and its bytes, for text lookup).
    fn push(&mut self, tokenizer: &Tokenizer, id: u32) {
        self.hist.push(id);
        if self.lookup == Lookup::Text && self.ctl.ngram.present {
            if tokenizer.is_special(id) {
                self.text.push(CONTROL_BYTE);
            } else {
                self.text.extend_from_slice(&tokenizer.token_bytes(id));
            }
        }
    }

    /// One speculative round (or one plain step) for a sequence decoded by
    /// someone else — the scheduler — whose state is `prompt` then
    /// `sequence`'s tokens, with `cache` holding all of it but the last
    /// token. Returns the tokens committed, each with what
    /// [`Sequence::push`] said of it (at least one; the last one ends the
    /// sequence if any does); `cache` is left holding all but the last.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        target: &Model,
        tokenizer: &Tokenizer,
        draft: Option<&Model>,
        pool: &ThreadPool,
        cache: &mut KvCache,
        sequence: &mut Sequence,
        prompt: &[u32],
    ) -> Result<Vec<(u32, Pushed)>, ModelError> {
        if self.hist.is_empty() {
            self.prompt_len = prompt.len();
            for &t in prompt {
                self.push(tokenizer, t);
            }
            self.out_start = self.text.len();
        }
        // Tokens decoded without speculation since the last round.
        let known = self.generated();
        let generated = sequence.ids();
        if known > generated.len() || self.prompt_len != prompt.len() {
            return Err(ModelError::new("speculation state out of step with its sequence"));
        }
        let new: Vec<u32> = generated[known..].to_vec();
        for t in new {
            self.push(tokenizer, t);
        }
        if sequence.is_done() || cache.len() + 1 != self.hist.len() {
            return Err(ModelError::new("speculation step on a sequence that cannot take one"));
        }
        let mut committed = Vec::new();
        let mut round = Round { target, tokenizer, draft, cache, sequence, seq: self };
        round.run(pool, &mut |id, p| committed.push((id, p)))?;
        Ok(committed)
    }
}

/// One sequence decoded speculatively. Build it, [`prefill`](Self::prefill)
/// the prompt, then [`generate`](Self::generate). Cloning after the prefill
/// forks the sequence (both caches and every state), e.g. to draw many
/// samples from one prompt with [`reseed`](Self::reseed).
#[derive(Clone)]
pub struct Speculator<'a> {
    target: &'a Model,
    tokenizer: &'a Tokenizer,
    draft: Option<&'a Model>,
    params: GenerateParams,
    /// Holds every committed token but the last.
    cache: KvCache,
    /// Sampling and the stop rule; made by `prefill`.
    sequence: Option<Sequence>,
    prompt_secs: f64,
    seq: SpecSeq,
}

impl<'a> Speculator<'a> {
    /// A speculator for `target` with contexts of `ctx` positions. A draft
    /// model must already have passed [`check_draft_vocab`].
    pub fn new(
        target: &'a Model,
        tokenizer: &'a Tokenizer,
        draft: Draft<'a>,
        ctx: usize,
        params: GenerateParams,
        cfg: &SpecConfig,
    ) -> Result<Speculator<'a>, ModelError> {
        let seq = SpecSeq::new(target, draft, ctx, &params.sampling, cfg)?;
        Ok(Speculator {
            target,
            tokenizer,
            draft: match draft {
                Draft::Model(m) => Some(m),
                Draft::NGram => None,
            },
            cache: target.new_cache(ctx),
            sequence: None,
            prompt_secs: 0.0,
            seq,
            params,
        })
    }

    /// Reads the prompt: the target caches all of it but the last token (fed
    /// with the first round's drafts), a draft model all of it.
    pub fn prefill(&mut self, pool: &ThreadPool, prompt: &[u32]) -> Result<(), ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::new("the prompt is empty: nothing to continue from"));
        }
        if !self.seq.hist.is_empty() {
            return Err(ModelError::new("the speculator already holds a prompt"));
        }
        if prompt.len() > self.cache.max_len() {
            return Err(ModelError::new(format!(
                "the prompt ({} tokens) exceeds the context size of {}",
                prompt.len(),
                self.cache.max_len()
            )));
        }
        let start = Instant::now();
        prefill(self.target, pool, &mut self.cache, &prompt[..prompt.len() - 1])?;
        self.seq.prompt_len = prompt.len();
        for &t in prompt {
            self.seq.push(self.tokenizer, t);
        }
        let ctx = self.cache.max_len();
        self.sequence = Some(Sequence::new(prompt, &self.params, self.params.sampling.seed, ctx, None));
        self.seq.out_start = self.seq.text.len();
        if let (Drafter::Model(d), Some(model)) = (&mut self.seq.drafter, self.draft) {
            let t = Instant::now();
            let mut scratch = SpecStats::default();
            d.catch_up(model, pool, &self.seq.hist, &mut scratch)?;
            self.seq.stats.draft_prompt_secs += t.elapsed().as_secs_f64();
        }
        self.prompt_secs = start.elapsed().as_secs_f64();
        Ok(())
    }

    /// New seeds for the target sampler and the speculator's draws (same
    /// history): forks after a shared prefill draw independent samples.
    pub fn reseed(&mut self, seed: u64) {
        if let Some(sequence) = &mut self.sequence {
            sequence.reseed(seed, &self.seq.hist);
        }
        self.seq.rng = SplitMix::new(seed);
        self.params.sampling.seed = seed;
    }

    pub fn stats(&self) -> &SpecStats {
        &self.seq.stats
    }

    /// See [`SpecSeq::set_references`].
    pub fn set_references(&mut self, refs: Vec<Arc<[u8]>>) {
        self.seq.set_references(refs);
    }

    /// Generates after the prefilled prompt, calling `on_text` with released
    /// text as it is produced, like [`crate::generate::generate`].
    pub fn generate(&mut self, pool: &ThreadPool, mut on_text: impl FnMut(&str)) -> Result<Generation, ModelError> {
        let Some(sequence) = self.sequence.as_mut() else {
            return Err(ModelError::new("prefill a prompt before generating"));
        };
        let mut text = String::new();
        let gen_start = Instant::now();
        while !sequence.is_done() {
            let mut round = Round {
                target: self.target,
                tokenizer: self.tokenizer,
                draft: self.draft,
                cache: &mut self.cache,
                sequence,
                seq: &mut self.seq,
            };
            let mut emit = |_: u32, p: Pushed| {
                for piece in [&p.text, &p.tail] {
                    text.push_str(piece);
                    on_text(piece);
                }
            };
            if round.run(pool, &mut emit)? {
                break;
            }
        }
        // The cache holds every committed token but the last, as between rounds.
        self.cache.truncate(self.seq.hist.len() - 1);
        let gen_secs = gen_start.elapsed().as_secs_f64();
        self.seq.stats.plain_step_secs = self.seq.ctl.t_plain.0;
        let ids = sequence.ids().to_vec();
        Ok(Generation {
            text,
            gen_tokens: ids.len(),
            ids,
            prompt_tokens: self.seq.prompt_len,
            prompt_secs: self.prompt_secs,
            gen_secs,
            finish: sequence.finish().unwrap_or(FinishReason::Length),
        })
    }
}

/// One round's view of a sequence: the models, the sequence's target cache
/// and [`Sequence`], its speculation state. Built by [`Speculator::generate`]
/// and [`SpecSeq::step`] from what each owns.
struct Round<'r> {
    target: &'r Model,
    tokenizer: &'r Tokenizer,
    draft: Option<&'r Model>,
    /// Holds every committed token but the last between rounds.
    cache: &'r mut KvCache,
    sequence: &'r mut Sequence,
    seq: &'r mut SpecSeq,
}

/// Receives each committed token and what [`Sequence::push`] said of it.
type OnToken<'a> = dyn FnMut(u32, Pushed) + 'a;

impl Round<'_> {
    /// Drafts (or not), verifies and commits: one target pass. True when
    /// the sequence ends.
    fn run(&mut self, pool: &ThreadPool, on_token: &mut OnToken) -> Result<bool, ModelError> {
        let max_len = self.cache.max_len();
        let remaining = self.sequence.tokens_left();
        let room = max_len - self.cache.len() - 1;
        // Drafting the last allowed token gains nothing over a plain
        // step (one target pass either way); fixed-length runs do it anyway
        // so that every token goes through verification.
        let cap = if self.seq.ctl.adaptive { remaining - 1 } else { remaining };
        let generated = self.seq.generated();
        let plan = self.seq.ctl.plan(generated, &mut self.seq.stats);
        let (kn, km) = (plan.ngram.min(cap).min(room), plan.model.min(cap).min(room));
        let k_mem = plan.memory.min(cap).min(room);
        let mut src = Src::NGram;
        let mut drafts = Vec::new();
        let draft_secs0 = self.seq.stats.draft_secs;
        if kn > 0 || k_mem > 0 {
            let ids = match self.seq.lookup {
                Lookup::Text => {
                    let (ids, from) = text_lookup_propose(self.tokenizer, self.seq, kn, k_mem);
                    src = from;
                    ids
                }
                Lookup::Tokens => ngram_propose(&self.seq.hist, kn, self.seq.ngram.0, self.seq.ngram.1),
            };
            drafts = ids.into_iter().map(|id| Drafted { id, q: None }).collect();
        }
        if drafts.is_empty() && km > 0 {
            src = Src::Model;
            let s = &mut *self.seq;
            if let (Drafter::Model(d), Some(model)) = (&mut s.drafter, self.draft) {
                drafts = d.propose(model, pool, &s.hist, km, &mut s.rng, &mut s.stats)?;
            }
        }
        if drafts.is_empty() {
            let off = self.seq.ctl.all_off(generated);
            return self.plain_step(pool, off, on_token);
        }
        let timing = match (&self.seq.drafter, src) {
            (Drafter::Model(d), Src::Model) => d.timing,
            _ => (0.0, 0),
        };
        let cost = (timing, self.seq.stats.draft_secs - draft_secs0);
        self.verify(pool, src, &drafts, cost, on_token)
    }

    /// Commits a token to the speculation history and the sequence (whose
    /// sampler has seen it already if it drew it); true when it ends there.
    fn commit(&mut self, id: u32, sampled: bool, on_token: &mut OnToken) -> bool {
        self.seq.push(self.tokenizer, id);
        let p = self.sequence.push(self.tokenizer, id, sampled, None);
        let done = p.finish.is_some();
        on_token(id, p);
        done
    }

    /// One token without drafts; true when generation ends.
    fn plain_step(&mut self, pool: &ThreadPool, while_off: bool, on_token: &mut OnToken) -> Result<bool, ModelError> {
        let last = *self.seq.hist.last().expect("prefilled");
        let t = Instant::now();
        let logits = self.target.forward_one(pool, self.cache, &[last], Logits::Last)?;
        let secs = t.elapsed().as_secs_f64();
        self.seq.ctl.record_plain(secs);
        self.seq.stats.target_forwards += 1;
        self.seq.stats.plain_steps += 1;
        self.seq.stats.target_secs += secs;
        if while_off {
            self.seq.stats.tokens_while_off += 1;
        }
        if self.seq.debug {
            eprintln!("[spec] plain step {:.1} ms{}", secs * 1e3, if while_off { " (speculation off)" } else { "" });
        }
        let next = self.sequence.sample(&logits);
        Ok(self.commit(next, true, on_token))
    }

    /// Verifies `drafts` in one target pass and commits what is accepted plus
    /// one target token; true when generation ends.
    fn verify(
        &mut self,
        pool: &ThreadPool,
        src: Src,
        drafts: &[Drafted],
        ((draft_secs, draft_passes), draft_total): ((f64, usize), f64),
        on_token: &mut OnToken,
    ) -> Result<bool, ModelError> {
        let base = self.cache.len();
        let committed0 = self.sequence.ids().len();
        let mut toks = Vec::with_capacity(drafts.len() + 1);
        toks.push(*self.seq.hist.last().expect("prefilled"));
        toks.extend(drafts.iter().map(|d| d.id));
        let t = Instant::now();
        let rows = self.target.forward_one(pool, self.cache, &toks, Logits::All)?;
        let verify_secs = t.elapsed().as_secs_f64();
        self.seq.stats.target_forwards += 1;
        self.seq.stats.target_secs += verify_secs;
        self.seq.stats.rounds += 1;
        self.seq.stats.drafted += drafts.len();
        let vocab = rows.len() / toks.len();
        let mut accepted = 0;
        let mut done = false;
        let mut rejected = false;
        for (j, d) in drafts.iter().enumerate() {
            let row = &rows[j * vocab..(j + 1) * vocab];
            let p = self.sequence.distribution(row);
            let (px, qx) = (lookup(&p, d.id), d.q_of(d.id));
            let accept = px > 0.0 && (px >= qx || self.seq.rng.next_f64() * (qx as f64) < px as f64);
            if accept {
                accepted += 1;
                if self.commit(d.id, false, on_token) {
                    done = true;
                    break;
                }
            } else {
                let y = self.residual(&p, d);
                rejected = true;
                done = self.commit(y, false, on_token);
                break;
            }
        }
        self.seq.stats.accepted += accepted;
        if src != Src::Model {
            self.seq.stats.ngram_drafted += drafts.len();
            self.seq.stats.ngram_accepted += accepted;
        }
        if src == Src::Memory {
            self.seq.stats.memory_drafted += drafts.len();
            self.seq.stats.memory_accepted += accepted;
        }
        if !done && !rejected {
            let row = &rows[drafts.len() * vocab..];
            let y = self.sequence.sample(row);
            done = self.commit(y, true, on_token);
        }
        // Keep `last` and the accepted drafts; drop the rest.
        self.cache.truncate(base + 1 + accepted);
        let committed = self.sequence.ids().len() - committed0;
        self.seq.ctl.record_round(
            src,
            drafts.len(),
            accepted,
            committed,
            verify_secs,
            (draft_secs, draft_passes),
            draft_total,
        );
        if self.seq.debug {
            let c = &self.seq.ctl;
            eprintln!(
                "[spec] {src:?} {accepted}/{} accepted {:?} | verify {:.1} ms, draft {:.1} ms in {draft_passes} passes | \
                 α model {:.2} ngram {:.2} | t_plain {:.1} t_extra {:.1} t_draft {:.1} ms | \
                 measured tok/s model {:.2} ngram {:.2}",
                drafts.len(),
                drafts.iter().map(|d| self.tokenizer.token_text(d.id)).collect::<Vec<_>>(),
                verify_secs * 1e3,
                draft_secs * 1e3,
                c.model.alpha(),
                c.ngram.alpha(),
                c.t_plain.0.unwrap_or(0.0) * 1e3,
                c.t_extra.get().unwrap_or(0.0) * 1e3,
                c.t_draft.get().unwrap_or(0.0) * 1e3,
                c.model.speed.get().unwrap_or(0.0),
                c.ngram.speed.get().unwrap_or(0.0),
            );
        }
        Ok(done)
    }

    /// A draw from `normalize(max(0, p − q))` after draft `d` was rejected.
    fn residual(&mut self, p: &[(u32, f32)], d: &Drafted) -> u32 {
        let u = self.seq.rng.next_f64();
        let r = residual_dist(p, d, &mut self.seq.scratch);
        if r.is_empty() {
            // p == q up to rounding: the rejection had probability ~0.
            return draw(p, u);
        }
        draw(&r, u)
    }
}

/// `max(0, p − q)` over `p`'s support (unnormalised; [`draw`] normalises),
/// in `p`'s order. `scratch` is vocabulary-sized and all zero; it is left so.
fn residual_dist(p: &[(u32, f32)], d: &Drafted, scratch: &mut [f32]) -> Vec<(u32, f32)> {
    let set = |s: &mut [f32], on: bool| match &d.q {
        None => {
            if let Some(x) = s.get_mut(d.id as usize) {
                *x = on as u32 as f32;
            }
        }
        Some(q) => {
            for &(t, w) in q {
                if let Some(x) = s.get_mut(t as usize) {
                    *x = if on { w } else { 0.0 };
                }
            }
        }
    };
    set(scratch, true);
    let r = p
        .iter()
        .map(|&(t, w)| (t, (w - scratch.get(t as usize).copied().unwrap_or(0.0)).max(0.0)))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    set(scratch, false);
    r
}

/// Prefill and generate in one call; returns the generation and what
/// speculation did. `refs`: earlier answers to similar prompts for prompt
/// lookup to draft from ([`SpecSeq::set_references`]; empty for none).
#[allow(clippy::too_many_arguments)]
pub fn generate_speculative(
    target: &Model,
    tokenizer: &Tokenizer,
    pool: &ThreadPool,
    draft: Draft<'_>,
    ctx: usize,
    prompt: &[u32],
    params: &GenerateParams,
    cfg: &SpecConfig,
    refs: Vec<Arc<[u8]>>,
    on_text: impl FnMut(&str),
) -> Result<(Generation, SpecStats), ModelError> {
    let mut s = Speculator::new(target, tokenizer, draft, ctx, params.clone(), cfg)?;
    s.set_references(refs);
    s.prefill(pool, prompt)?;
    let g = s.generate(pool, on_text)?;
    Ok((g, s.seq.stats.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_prefers_longest_and_latest_match() {
        // ... 1 2 3 [4 5] ... 9 2 3 [7 8] ... 2 3 → latest "2 3" continues 7 8.
        let h = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3];
        assert_eq!(ngram_propose(&h, 2, 1, 3), vec![7, 8]);
        // "1 2 3" occurs once earlier: the trigram wins over the later bigram.
        let h = [1, 2, 3, 4, 5, 2, 3, 6, 1, 2, 3];
        assert_eq!(ngram_propose(&h, 3, 1, 3), vec![4, 5, 2]);
        // Continuations stop at the end of the history.
        let h = [5, 6, 5];
        assert_eq!(ngram_propose(&h, 4, 1, 3), vec![6, 5]);
        assert!(ngram_propose(&[1, 2, 3], 4, 1, 3).is_empty());
        assert!(ngram_propose(&[1, 2, 1], 0, 1, 3).is_empty());
    }

    #[test]
    fn text_lookup_finds_the_longest_latest_match() {
        let t = b"Message: Liam Okafor here. {\"customer\": \"Liam";
        let (cont, cut) = text_lookup(t, 4).unwrap();
        assert_eq!(cont, b" Okafor here. {\"customer\": \"Liam");
        assert!(!cut);
        // A longer match wins over a later, shorter one.
        let t = b"abcdXYZ..bcdQ..abcd";
        assert_eq!(text_lookup(t, 3).unwrap().0, b"XYZ..bcdQ..abcd");
        // Too short, or no earlier occurrence.
        assert!(text_lookup(b"xyzabc", 2).is_none());
        assert!(text_lookup(b"ab ab", 3).is_none());
        // Continuations stop at control tokens.
        let t = b"hello world\0rest hello";
        assert_eq!(text_lookup(t, 4).unwrap().0, b" world");
    }

    #[test]
    fn padding_names() {
        assert!(is_padding("[PAD151665]", Some(1)));
        assert!(is_padding("<unused3>", None));
        assert!(is_padding("anything", Some(5)));
        assert!(!is_padding("hello", Some(1)));
    }

    #[test]
    fn controller_switches_off_when_drafts_fail_and_retries() {
        let cfg = SpecConfig::default();
        let mut c = Controller::new(&cfg, true, false);
        let mut st = SpecStats::default();
        assert_eq!(c.plan(0, &mut st), Plan::default(), "first step measures the plain step");
        c.record_plain(0.1);
        // Probing rounds, all rejected, drafting as costly as the target:
        // one token per round for 0.12 s of verifying plus 0.1 s per draft.
        for _ in 0..PROBE_ROUNDS {
            let k = c.plan(1, &mut st).model;
            assert!(k >= 2);
            c.record_round(Src::Model, k, 0, 1, 0.12, (0.1 * k as f64, k), 0.1 * k as f64);
        }
        assert_eq!(c.plan(4, &mut st), Plan::default());
        assert_eq!(st.switched_off, 1);
        assert!(c.all_off(10));
        assert_eq!(c.plan(10, &mut st), Plan::default(), "still off");
        assert!(c.plan(4 + 16, &mut st).model > 0, "retried after the back-off");
    }

    #[test]
    fn controller_keeps_speculating_when_measured_speed_pays() {
        // The prediction says "lose" (slow drafts, low α) but the measured
        // rounds commit tokens faster than plain steps: stay on.
        let cfg = SpecConfig::default();
        let mut c = Controller::new(&cfg, true, false);
        let mut st = SpecStats::default();
        c.record_plain(0.1);
        for _ in 0..8 {
            let k = c.plan(1, &mut st).model;
            assert!(k > 0);
            c.record_round(Src::Model, k, 0, 3, 0.12, (0.1 * k as f64, k), 0.1);
        }
        assert_eq!(st.switched_off, 0);
    }

    #[test]
    fn controller_grows_k_when_everything_is_accepted() {
        let cfg = SpecConfig::default();
        let mut c = Controller::new(&cfg, false, true);
        let mut st = SpecStats::default();
        c.record_plain(0.1);
        for _ in 0..10 {
            let k = c.plan(1, &mut st).ngram;
            c.record_round(Src::NGram, k, k, k + 1, 0.1 + 0.005 * k as f64, (0.0, 0), 0.0);
        }
        assert!(c.plan(1, &mut st).ngram >= 8);
    }

    #[test]
    fn controller_prefers_lookup_only_while_it_beats_the_model() {
        let cfg = SpecConfig::default();
        let mut c = Controller::new(&cfg, true, true);
        let mut st = SpecStats::default();
        c.record_plain(0.1);
        // The model drafts well and cheaply; lookups keep failing.
        for _ in 0..6 {
            let p = c.plan(1, &mut st);
            if p.ngram > 0 {
                c.record_round(Src::NGram, p.ngram, 0, 1, 0.11, (0.0, 0), 0.0);
            }
            c.record_round(Src::Model, 4, 4, 5, 0.12, (0.1, 4), 0.1);
        }
        let p = c.plan(8, &mut st);
        assert!(p.model > 0);
        assert_eq!(p.ngram, 0, "lookup switched off: {c:?}");
    }

    #[test]
    fn residual_removes_the_draft_mass() {
        // p = {0: .5, 1: .3, 2: .2}, q = {0: .9, 1: .1}: residual ∝ {1: .2, 2: .2}.
        let p = vec![(0u32, 0.5f32), (1, 0.3), (2, 0.2)];
        let d = Drafted { id: 0, q: Some(vec![(0, 0.9), (1, 0.1)]) };
        let mut counts = [0usize; 3];
        let mut rng = SplitMix::new(1);
        let mut scratch = vec![0.0f32; 3];
        for _ in 0..4000 {
            let r = residual_dist(&p, &d, &mut scratch);
            assert_eq!(scratch, vec![0.0; 3]);
            counts[draw(&r, rng.next_f64()) as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!((counts[1] as i64 - 2000).abs() < 200, "{counts:?}");
    }
}
