//! Speculative decoding inside the scheduler (`minnow serve --draft/--lookup`).
//!
//! # Policy: speculate only while one sequence decodes alone
//!
//! On a CPU, decoding is bound by memory bandwidth: a forward step reads every
//! weight once whatever the batch holds. With several sequences decoding,
//! continuous batching already turns each weight read into one token per
//! sequence — the amortisation speculation would buy — and verifying `k`
//! drafts for each of them would multiply the rows (and the arithmetic, no
//! longer free) while each sequence rejects at a different place. With one
//! sequence, a plain step computes one row per weight read and leaves the
//! cores idle: that is where verifying several drafted tokens in one pass
//! pays. So the scheduler runs a speculative round ([`SpecSeq::step`]) when
//! exactly one sequence is decoding and nothing else runs (no prompt being
//! read), and ordinary batched steps otherwise. A request that arrives is
//! admitted between two rounds as between two steps.
//!
//! A sequence's [`SpecSeq`] (draft-model KV cache, acceptance statistics,
//! lookup history) lives while it speculates and is dropped at the next
//! batched step, so the memory held for drafting is one sequence's; if the
//! sequence is alone again later, the draft model catches up on its history
//! in one prefill.
//!
//! Output is unchanged by any of this: a round commits exactly the tokens the
//! sequence's own sampler would have produced in distribution (greedy: the
//! very same tokens), and the scheduler emits them one by one through the
//! same stop rules as sampled tokens. Requests asking for logprobs are not
//! speculated (a round does not return per-token logits). One thing does
//! change for sampled (temperature > 0) requests: speculation draws its
//! acceptance tests from its own random stream, so a seeded request's exact
//! tokens depend on whether it decoded alone — its distribution does not.

use super::core::{emit_token, panic_message, Core, Phase, Running, StepCtx};
use super::GenEvent;
use crate::loader::LoadedModel;
use crate::sequence::Pushed;
use crate::speculative::memory::LookupMemory;
use crate::speculative::{Draft, SpecConfig, SpecSeq, SpecStats};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

/// Answers the server keeps for prompt lookup (`--lookup`) to draft from
/// ([`crate::speculative::memory`]).
pub const ANSWERS_KEPT: usize = 32;

/// What the scheduler speculates with.
#[derive(Clone)]
pub struct Speculation {
    /// A draft model sharing the target's vocabulary (checked with
    /// [`check_draft_vocab`](crate::speculative::check_draft_vocab) by the
    /// caller); `None`: prompt lookup.
    pub draft: Option<Arc<LoadedModel>>,
    pub config: SpecConfig,
}

impl std::fmt::Debug for Speculation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speculation")
            .field("draft", &self.draft.as_ref().map_or("ngram", |_| "draft-model"))
            .field("config", &self.config)
            .finish()
    }
}

impl Speculation {
    pub fn method(&self) -> &'static str {
        if self.draft.is_some() {
            "draft-model"
        } else {
            "ngram"
        }
    }
}

/// What speculation did since the scheduler started.
#[derive(Clone, Debug, Default)]
pub struct SpecTotals {
    /// Speculative rounds run (each one target pass, with or without drafts).
    pub steps: u64,
    /// Rounds that verified drafts.
    pub verify_rounds: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// Of `drafted` / `accepted`: drafts from earlier answers (`--lookup`).
    pub memory_drafted: u64,
    pub memory_accepted: u64,
    /// Target forward passes in speculative rounds.
    pub target_forwards: u64,
    /// Tokens the rounds produced (those emitted, up to a stop).
    pub tokens: u64,
    /// Seconds spent in speculative rounds (drafting and verifying).
    pub secs: f64,
    /// What plain decoding would have taken for `tokens`: each round's
    /// tokens times the sequence's measured plain step time. Rounds before
    /// the first plain step was measured are left out of both this and
    /// `secs_measured`.
    pub plain_equiv_secs: f64,
    /// `secs` of the rounds counted in `plain_equiv_secs`.
    pub secs_measured: f64,
}

impl SpecTotals {
    /// Accepted fraction of drafted tokens.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Tokens per target forward pass while speculating (plain decoding: 1).
    pub fn tokens_per_target_forward(&self) -> f64 {
        if self.target_forwards == 0 {
            0.0
        } else {
            self.tokens as f64 / self.target_forwards as f64
        }
    }

    /// Estimated speed-up of speculation over plain single-sequence decoding.
    pub fn speedup(&self) -> f64 {
        if self.secs_measured > 0.0 {
            self.plain_equiv_secs / self.secs_measured
        } else {
            0.0
        }
    }

    fn add(&mut self, before: &SpecStats, after: &SpecStats, tokens: usize, secs: f64, t_plain: Option<f64>) {
        self.steps += 1;
        self.verify_rounds += (after.rounds - before.rounds) as u64;
        self.drafted += (after.drafted - before.drafted) as u64;
        self.accepted += (after.accepted - before.accepted) as u64;
        self.memory_drafted += (after.memory_drafted - before.memory_drafted) as u64;
        self.memory_accepted += (after.memory_accepted - before.memory_accepted) as u64;
        self.target_forwards += (after.target_forwards - before.target_forwards) as u64;
        self.tokens += tokens as u64;
        self.secs += secs;
        if let Some(t) = t_plain {
            self.plain_equiv_secs += tokens as f64 * t;
            self.secs_measured += secs;
        }
    }
}

impl<S: FnMut(GenEvent) -> bool> Core<S> {
    /// The request and sample to speculate for now: speculation is on, one
    /// live request, decoding exactly one sample, without logprobs, on a
    /// cache of its own tokens.
    pub(super) fn lone_decoder(&self) -> Option<(usize, usize)> {
        self.speculation.as_ref()?;
        let mut live = self.running.iter().enumerate().filter(|(_, r)| !r.gone && !r.failed);
        let (ri, r) = live.next()?;
        if live.next().is_some() || r.top_logprobs.is_some() || r.base != 0 || r.params.adapter.is_some() {
            return None;
        }
        let Phase::Decode { samples } = &r.phase else { return None };
        let mut decoding = samples.iter().enumerate().filter(|(_, s)| !s.seq.is_done());
        let (si, s) = decoding.next()?;
        // A round feeds one token: tokens a constraint forced in a plain
        // step are fed by another plain step first.
        let pending = r.prompt.len() + s.seq.ids().len() - s.cache.len();
        (decoding.next().is_none() && pending == 1).then_some((ri, si))
    }

    /// Frees the speculation state of every sequence (a batched step follows).
    pub(super) fn drop_spec_states(&mut self) {
        for r in &mut self.running {
            if let Phase::Decode { samples } = &mut r.phase {
                for s in samples {
                    s.spec = None;
                }
            }
        }
    }

    /// One speculative round for sample `si` of request `ri`; its tokens go
    /// out through the same path as sampled ones.
    pub(super) fn speculate(&mut self, ctx: &StepCtx, ri: usize, si: usize) {
        let Some(cfg) = self.speculation.as_ref() else { return };
        let r = &mut self.running[ri];
        let t0 = Instant::now();
        let refs = (self.answers.as_ref(), &self.references[..]);
        let res = catch_unwind(AssertUnwindSafe(|| round(ctx, cfg, self.ctx, refs, r, si)));
        let secs = t0.elapsed().as_secs_f64();
        let (committed, before, after, t_plain) = match res {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return r.fail(format!("speculative decoding failed: {e}")),
            Err(p) => return r.fail(format!("speculative decoding panicked: {}", panic_message(&*p))),
        };
        let used = committed.len();
        for (id, p) in committed {
            emit_token(r, si, id, p);
        }
        if let Phase::Decode { samples } = &mut r.phase {
            let s = &mut samples[si];
            // A round that ends the sequence on an accepted draft leaves
            // that token in the cache: keep all but the last, as always (the
            // prefix cache takes it as it is).
            s.cache.truncate(r.prompt.len() + s.seq.ids().len() - 1);
        }
        let st = &mut self.stats;
        st.steps_total += 1;
        st.last_batch_size = 1;
        st.batch_size_sum += 1;
        st.busy_secs += secs;
        st.completion_tokens_total += used as u64;
        st.speculation.get_or_insert_with(Default::default).add(&before, &after, used, secs, t_plain);
    }
}

/// A round's committed tokens (with what the sequence said of each), the
/// speculation statistics before and after it, and the plain step time.
type RoundOut = (Vec<(u32, Pushed)>, SpecStats, SpecStats, Option<f64>);

/// Runs [`SpecSeq::step`] on the sample, creating its state on first use
/// (drafting from earlier answers: the answer memory's or the given ones).
/// Returns the committed tokens, the statistics before and after, and the
/// measured plain step time.
fn round<S>(
    ctx: &StepCtx,
    cfg: &SpecConfig,
    n_ctx: usize,
    (answers, refs): (Option<&LookupMemory>, &[Arc<[u8]>]),
    r: &mut Running<S>,
    si: usize,
) -> Result<RoundOut, crate::model::ModelError> {
    let Running { phase, prompt, .. } = r;
    let Phase::Decode { samples } = phase else { unreachable!("lone_decoder chose a decoding sample") };
    let s = &mut samples[si];
    if s.spec.is_none() {
        let draft = ctx.draft.map_or(Draft::NGram, Draft::Model);
        // The sample's own sampling (its seed is the request's plus its index).
        let mut seq = SpecSeq::new(ctx.model, draft, n_ctx, s.seq.sampling(), cfg)?;
        // Earlier answers to draft from: the server's memory, or the caller's.
        seq.set_references(answers.map_or_else(|| refs.to_vec(), |mem| mem.references_for(prompt)));
        s.spec = Some(Box::new(seq));
    }
    let seq = s.spec.as_mut().expect("just created");
    let before = seq.stats().clone();
    let committed = seq.step(ctx.model, ctx.tokenizer, ctx.draft, ctx.pool, &mut s.cache, &mut s.seq, prompt)?;
    Ok((committed, before, seq.stats().clone(), seq.plain_step_secs()))
}
