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
//!   prompts ([`SpecSeq::set_references`], [`crate::speculative::memory`]) it also
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
//! cache, controller, history, statistics). The scheduler's decode loop
//! keeps one per sequence decoding alone and runs rounds with
//! [`SpecSeq::step`] on the sequence's own target cache and [`Sequence`]
//! (sampling and the stop rule) — for `minnow serve --draft` and, through
//! [`generate_speculative`], `minnow run --draft`. It calls into this
//! module; nothing here calls back. A round borrows the models. Every token
//! a round commits goes through [`Sequence::push`], and every draw and
//! verification through the sequence, as in plain decoding.

use crate::generate::{check_request, prefill, prefill_for, GenerateParams, Generation};
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::model::{Logits, Model, ModelError};
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{run_one, GenRequest, StepCtx};
use crate::sequence::{Pushed, Sequence};
use crate::speculative::memory::{consensus_draft, shared_prefix, Consensus, Reference};
use crate::tokenizer::Tokenizer;
use minnow_kernels::mix::SplitMix64;
use minnow_kernels::pool::ThreadPool;
use std::sync::Arc;
use std::time::Instant;

mod control;
mod draft;
pub mod memory;
mod verify;

use control::*;
use draft::*;
pub use draft::{ngram_propose, text_lookup};
use verify::*;

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

/// Why a draft model cannot draft for a target (their vocabularies differ).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct VocabMismatch(pub String);

/// Checks that `draft` can draft for `target`: the same tokenizer kind and
/// the same token strings under the same ids. One vocabulary may extend the
/// other with padding or unused entries (token type "unused", or names such
/// as `[PAD151643]`, `<|pad|>`, `<unused12>`); anything else is refused,
/// since ids would mean different text.
pub fn check_draft_vocab(target: &LoadedModel, draft: &LoadedModel) -> Result<VocabMatch, VocabMismatch> {
    let kind = |m: &LoadedModel| m.file.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("?").to_string();
    let (kt, kd) = (kind(target), kind(draft));
    if kt != kd {
        return Err(VocabMismatch(format!(
            "the draft model's vocabulary differs from the target's: its tokenizer is `{kd}`, the target's `{kt}`; \
             speculative decoding needs a draft with the target's vocabulary (e.g. a smaller model of the same family)"
        )));
    }
    let (tt, td) = (&target.tokenizer, &draft.tokenizer);
    let shared = tt.vocab_size().min(td.vocab_size());
    if let Some(i) = (0..shared as u32).find(|&i| tt.token_text(i) != td.token_text(i)) {
        return Err(VocabMismatch(format!(
            "the draft model's vocabulary differs from the target's: token {i} is {:?} in the draft but {:?} in the target \
             ({} vs {} tokens); speculative decoding needs a draft with the target's vocabulary",
            td.token_text(i),
            tt.token_text(i),
            td.vocab_size(),
            tt.vocab_size()
        )));
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
    Ok(VocabMatch {
        shared,
        target_extra: extra_ok(target, "target").map_err(VocabMismatch)?,
        draft_extra: extra_ok(draft, "draft").map_err(VocabMismatch)?,
    })
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

/// The speculation state of one sequence: drafter, controller, history and
/// statistics — everything but the models and the sequence's own target KV
/// cache and sampler. The scheduler's decode loop keeps one per sequence
/// decoding alone and runs rounds with [`SpecSeq::step`].
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
    /// (see [`crate::speculative::memory`]); text lookup drafts from them too.
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
        sampling.validate()?;
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
    /// ([`LookupMemory::references_for`](crate::speculative::memory::LookupMemory::references_for));
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

/// Generates a continuation of `prompt` speculatively, in-process on the
/// scheduler's decode loop ([`crate::scheduler`]), where speculation is the
/// way a lone sequence advances: each step is one [`SpecSeq`] round. Returns
/// the generation and what speculation did. `ctx`: the context of the
/// target's (and a draft model's) cache. `refs`: earlier answers to similar
/// prompts for prompt lookup to draft from ([`SpecSeq::set_references`];
/// empty for none). A draft model must already have passed
/// [`check_draft_vocab`].
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
    mut on_text: impl FnMut(&str),
) -> Result<(Generation, SpecStats), ModelError> {
    check_request(prompt, params, 0, ctx)?;
    // What `SpecSeq::new` would refuse, refused before any work.
    SpecSeq::new(target, Draft::NGram, 0, &params.sampling, cfg)?;
    let draft = match draft {
        Draft::Model(m) => Some(m),
        Draft::NGram => None,
    };
    let step = StepCtx { model: target, tokenizer, pool, draft };
    let req = GenRequest::new(prompt.to_vec(), params.clone());
    let mut out = run_one(&step, req, target.new_cache(ctx), Some(cfg.clone()), refs, &mut |_, piece| on_text(piece))?;
    let method = if draft.is_some() { "draft-model" } else { "ngram" };
    let stats = out.spec.take().unwrap_or_else(|| SpecStats { method, ..SpecStats::default() });
    let Some((ids, finish, text)) = out.samples.into_iter().next() else { unreachable!("one sample was asked for") };
    let g = Generation {
        text,
        gen_tokens: ids.len(),
        ids,
        prompt_tokens: prompt.len(),
        prompt_secs: out.prompt_secs,
        gen_secs: out.gen_secs,
        finish,
    };
    Ok((g, stats))
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
