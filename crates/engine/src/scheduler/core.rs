//! The one decode loop: [`Core::step`] advances every running sequence by
//! one forward pass (or one speculative round), whoever drives it.
//!
//! The server's scheduler thread drives a [`Core`] fed from its request
//! queue; `minnow run`, `run --n`, `run --draft/--lookup` and the other
//! in-process callers ([`crate::generate::generate`],
//! [`crate::vote::generate_n`], [`crate::speculative::generate_speculative`])
//! drive one of their own with a single request ([`run_one`]). So there is
//! one place where a batch is built, one where tokens are sampled
//! ([`Sequence::sample`] / [`Sequence::push`], which hold the stop rule), and
//! one where speculation is chosen (`speculate`), and `run` cannot drift
//! from `serve`.
//!
//! A step: every request still reading its prompt contributes its next chunk
//! (at most `prefill_chunk` tokens), every decoding sample the tokens its
//! cache lacks (the last token it sampled — or the prompt's last token when
//! the prompt was read without it — and any its constraint forced after it);
//! one [`Model::forward`] computes them all; each sample then takes a token,
//! and whatever its constraint forces next (jump-forward). When speculation
//! is configured and a single sample is decoding with nothing else running,
//! the step is a speculative round for it instead (see `speculate`).
//!
//! The core holds no threads and no locks: the caller passes the model,
//! tokenizer and thread pool to each step ([`StepCtx`]), and each request's
//! events go to its own sink `S` as they happen.

use super::prefix_cache::PrefixCache;
use super::{Fault, GenEvent, GenRequest, SchedulerConfig, SchedulerStats, SpecTotals, Usage};
use crate::generate::{FinishReason, GenerateParams};
use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, ModelError, SeqBatch};
use crate::sequence::{Pushed, Sequence};
use crate::speculative::memory::LookupMemory;
use crate::speculative::{SpecConfig, SpecSeq, SpecStats};
use crate::tokenizer::Tokenizer;
use minnow_kernels::pool::ThreadPool;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

/// What a step runs on, lent by the caller for the step's duration.
#[derive(Clone, Copy)]
pub struct StepCtx<'m> {
    pub model: &'m Model,
    pub tokenizer: &'m Tokenizer,
    pub pool: &'m ThreadPool,
    /// The draft model when speculation drafts with one (else prompt lookup).
    pub draft: Option<&'m Model>,
}

/// The running requests and what the steps share: prefix cache, answer
/// memory for prompt lookup, counters.
pub(crate) struct Core<S> {
    /// Prompt tokens per step per sequence.
    pub prefill_chunk: usize,
    /// Context of a new cache.
    pub ctx: usize,
    /// Speculation while one sample decodes alone (`None`: never).
    pub speculation: Option<SpecConfig>,
    pub running: Vec<Running<S>>,
    pub prefix: PrefixCache,
    /// Recent answers for prompt lookup to draft from (`--lookup` only).
    pub answers: Option<LookupMemory>,
    /// Earlier answers an in-process caller gives prompt lookup to draft
    /// from, when there is no answer memory.
    pub references: Vec<Arc<[u8]>>,
    /// Faults injected by the scheduler's tests.
    pub faults: Vec<(u64, Fault)>,
    /// The counters this core keeps (steps, tokens, batch sizes, busy time,
    /// speculation); the rest of [`SchedulerStats`] is the scheduler's.
    pub stats: SchedulerStats,
}

/// A request that holds slots.
pub(crate) struct Running<S> {
    pub id: u64,
    sink: S,
    pub submitted: Instant,
    first_token: Option<Instant>,
    /// When the prompt had been read (the request started decoding).
    pub prefilled: Option<Instant>,
    pub prompt: Vec<u32>,
    /// Cache positions before the prompt: a prefix the caller's cache
    /// already held, of tokens this request does not know (0 in the server).
    pub base: usize,
    /// 1 when the prompt is read without its last token (see
    /// [`Core::holds_back`]), else 0.
    held: usize,
    pub n: usize,
    pub(super) params: GenerateParams,
    pub top_logprobs: Option<usize>,
    cached: usize,
    completion_tokens: usize,
    pub phase: Phase,
    /// The client is gone (sink said so, or `cancel`): drop silently.
    pub gone: bool,
    /// Failed: an Error event was sent; drop.
    pub failed: bool,
}

pub(crate) enum Phase {
    /// Reading the prompt: its first `fed` tokens are in `cache` (after `base`).
    Prefill {
        cache: KvCache,
        fed: usize,
    },
    Decode {
        samples: Vec<Sample>,
    },
}

pub(crate) struct Sample {
    /// Holds prompt + answer up to the next step's input: all but the last
    /// sampled token and the forced tokens after it (and, while nothing is
    /// sampled, without the prompt's last token when it was held back).
    pub cache: KvCache,
    /// Sampling, stop rule and generated ids.
    pub seq: Sequence,
    /// Speculation state while this sample decodes alone.
    pub spec: Option<Box<SpecSeq>>,
    /// The tokens the current step feeds (borrowed by the batch): every
    /// token of prompt + answer not yet in the cache — the last sampled one,
    /// and after it any the constraint forced.
    input: Vec<u32>,
}

/// Which sequence of a running request a batch row belongs to.
#[derive(Clone, Copy)]
enum Slot {
    /// A prompt chunk.
    Prefill,
    /// A decode step of sample `i`.
    Sample(usize),
}

impl<S: FnMut(GenEvent) -> bool> Running<S> {
    /// Sends an event unless the client is gone; a sink that refuses or
    /// panics marks the request gone.
    pub fn emit(&mut self, ev: GenEvent) {
        if self.gone {
            return;
        }
        let sink = &mut self.sink;
        match catch_unwind(AssertUnwindSafe(|| sink(ev))) {
            Ok(true) => {}
            Ok(false) | Err(_) => self.gone = true,
        }
    }

    pub fn fail(&mut self, msg: String) {
        if !self.failed {
            self.emit(GenEvent::Error(msg));
            self.failed = true;
        }
    }

    pub fn finished(&self) -> bool {
        match &self.phase {
            Phase::Prefill { .. } => false,
            Phase::Decode { samples } => samples.iter().all(|s| s.seq.is_done()),
        }
    }

    pub fn samples(&self) -> &[Sample] {
        match &self.phase {
            Phase::Prefill { .. } => &[],
            Phase::Decode { samples } => samples,
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len(),
            cached_prompt_tokens: self.cached,
            completion_tokens: self.completion_tokens,
        }
    }

    /// Sends `Finished` (all samples must be done).
    pub fn send_finished(&mut self) {
        let now = Instant::now();
        let total_secs = now.duration_since(self.submitted).as_secs_f64();
        let ttft_secs = self.first_token.map_or(total_secs, |t| t.duration_since(self.submitted).as_secs_f64());
        let usage = self.usage();
        self.emit(GenEvent::Finished { usage, ttft_secs, total_secs });
    }

    /// The speculation statistics of sample `i`, if it speculated.
    pub fn spec_stats(&self, i: usize) -> Option<SpecStats> {
        let s = self.samples().get(i)?.spec.as_ref()?;
        let mut st = s.stats().clone();
        st.plain_step_secs = s.plain_step_secs();
        Some(st)
    }

    /// The prompt tokens a prefill reads: all of them, or all but the held-back last one.
    fn prefill_target(&self) -> usize {
        self.prompt.len() - self.held
    }
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".into()
    }
}

impl<S: FnMut(GenEvent) -> bool> Core<S> {
    /// A core for the scheduler's `cfg` (already normalised): prefix cache
    /// of `cfg.prefix_cache_bytes`, answer memory when speculation looks up
    /// prompts (no draft model).
    pub fn new(cfg: &SchedulerConfig) -> Core<S> {
        let spec = cfg.speculation.as_ref();
        let remember = spec.is_some_and(|s| s.draft.is_none());
        Core::with(cfg.ctx, cfg.prefill_chunk, cfg.prefix_cache_bytes, spec.map(|s| s.config.clone()), remember)
    }

    /// A core making caches of `ctx` positions, reading prompts in chunks of
    /// `prefill_chunk`, keeping `prefix_cache_bytes` of prefixes, speculating
    /// with `speculation`, and remembering answers for prompt lookup if
    /// `remember_answers`.
    pub fn with(
        ctx: usize,
        prefill_chunk: usize,
        prefix_cache_bytes: usize,
        speculation: Option<SpecConfig>,
        remember_answers: bool,
    ) -> Core<S> {
        Core {
            prefill_chunk: prefill_chunk.max(1),
            ctx,
            stats: SchedulerStats {
                speculation: speculation.as_ref().map(|_| SpecTotals::default()),
                ..SchedulerStats::default()
            },
            speculation,
            running: Vec::new(),
            prefix: PrefixCache::new(prefix_cache_bytes),
            answers: remember_answers.then(|| LookupMemory::new(super::speculate::ANSWERS_KEPT)),
            references: Vec::new(),
            faults: Vec::new(),
        }
    }

    /// Slots held by live requests.
    pub fn slots(&self) -> usize {
        self.running.iter().filter(|r| !r.gone).map(|r| r.n).sum()
    }

    /// Whether a request's prompt is read without its last token, which the
    /// first step then feeds like a sampled one: a request that may be
    /// speculated (one sample, no logprobs) lets the first speculative round
    /// verify drafts for its first token too.
    fn holds_back(&self, req: &GenRequest, base: usize) -> bool {
        // Speculation verifies with the base model alone: not for adapters.
        self.speculation.is_some()
            && req.n == 1
            && req.top_logprobs.is_none()
            && req.params.adapter.is_none()
            && req.prompt.len() > 1
            && base == 0
    }

    /// Starts request `id` (submitted at `submitted`) on `model`. `cache`: the caller's cache, possibly
    /// holding a prefix of tokens not in the prompt (in-process callers);
    /// `None` resumes from the longest cached prefix of the prompt, or
    /// starts empty.
    pub fn admit(
        &mut self,
        model: &Model,
        id: u64,
        req: GenRequest,
        sink: S,
        submitted: Instant,
        cache: Option<KvCache>,
    ) {
        let base = cache.as_ref().map_or(0, KvCache::len);
        let held = usize::from(self.holds_back(&req, base));
        let (cache, cached) = match cache {
            Some(c) => (c, 0),
            None => {
                let readable = &req.prompt[..req.prompt.len() - held];
                let tag = req.params.adapter.as_ref().map_or("", |a| a.name.as_str());
                self.prefix.lookup(readable, tag).unwrap_or_else(|| (model.new_cache(self.ctx), 0))
            }
        };
        self.stats.prompt_tokens_total += req.prompt.len() as u64;
        self.stats.cached_prompt_tokens_total += cached as u64;
        self.stats.constrained_requests_total += u64::from(req.params.constraint.is_some());
        self.running.push(Running {
            id,
            sink,
            submitted,
            first_token: None,
            prefilled: None,
            prompt: req.prompt,
            base,
            held,
            params: req.params,
            n: req.n,
            top_logprobs: req.top_logprobs,
            cached,
            completion_tokens: 0,
            phase: Phase::Prefill { cache, fed: cached },
            gone: false,
            failed: false,
        });
    }

    /// Marks request `id` gone: it is dropped at the next [`retire`](Self::retire).
    pub fn cancel(&mut self, id: u64) {
        for r in self.running.iter_mut().filter(|r| r.id == id) {
            r.gone = true;
        }
    }

    /// One forward pass over every running sequence, then sampling; or one
    /// speculative round when a single sample decodes alone.
    pub fn step(&mut self, ctx: &StepCtx) {
        if let Some((ri, si)) = self.lone_decoder() {
            return self.speculate(ctx, ri, si);
        }
        self.drop_spec_states();
        let chunk = self.prefill_chunk;
        // Build the batch: rows in request order (which rows sit where has no
        // effect on any row's result).
        let mut slots: Vec<(usize, Slot)> = Vec::new();
        let mut owners: Vec<u64> = Vec::new();
        let mut seqs: Vec<SeqBatch> = Vec::new();
        // Constrained samples: their masks are computed while the pass runs.
        let mut constrained: Vec<&mut Sequence> = Vec::new();
        for (ri, r) in self.running.iter_mut().enumerate() {
            if r.gone || r.failed {
                continue;
            }
            let target = r.prefill_target();
            let Running { prompt, phase, id, base, params, .. } = r;
            let adapter = params.adapter.as_deref();
            match phase {
                Phase::Prefill { cache, fed } => {
                    let end = (*fed + chunk).min(target);
                    let logits = if end == prompt.len() { Logits::Last } else { Logits::None };
                    slots.push((ri, Slot::Prefill));
                    owners.push(*id);
                    seqs.push(SeqBatch { tokens: &prompt[*fed..end], cache, logits, adapter });
                    *fed = end;
                }
                Phase::Decode { samples } => {
                    for (si, s) in samples.iter_mut().enumerate() {
                        if s.seq.is_done() {
                            continue;
                        }
                        slots.push((ri, Slot::Sample(si)));
                        owners.push(*id);
                        let Sample { cache, seq, input, .. } = s;
                        // Prompt + answer past what the cache holds: one
                        // token, or several when a constraint forced some
                        // (all computed in this one pass; jump-forward).
                        let fed = cache.len() - *base;
                        let (from_prompt, ids) = (prompt.get(fed..).unwrap_or(&[]), seq.ids());
                        input.clear();
                        input.extend_from_slice(from_prompt);
                        input.extend_from_slice(&ids[fed.saturating_sub(prompt.len())..]);
                        seqs.push(SeqBatch { tokens: input, cache, logits: Logits::Last, adapter });
                        if seq.has_constraint() {
                            constrained.push(seq);
                        }
                    }
                }
            }
        }
        if seqs.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let fwd = Forward { model: ctx.model, pool: ctx.pool, faults: &self.faults };
        let mut mask_wait = 0.0;
        let results = if constrained.is_empty() || !overlap_masks() {
            fwd.contained(&mut seqs, &owners)
        } else {
            // The masks need only the tokens already taken: a helper thread
            // computes them during the pass; the step waits for it after.
            std::thread::scope(|sc| {
                let helper = sc.spawn(move || constrained.into_iter().for_each(|s| s.prepare_constraint()));
                let results = fwd.contained(&mut seqs, &owners);
                let t = Instant::now();
                if let Err(p) = helper.join() {
                    std::panic::resume_unwind(p);
                }
                mask_wait = t.elapsed().as_secs_f64();
                results
            })
        };
        let busy = t0.elapsed().as_secs_f64() - mask_wait;
        self.stats.mask_secs += mask_wait;
        let batch = seqs.len();
        drop(seqs);
        self.stats.steps_total += 1;
        self.stats.last_batch_size = batch;
        self.stats.batch_size_sum += batch as u64;
        self.stats.busy_secs += busy;

        for ((ri, slot), res) in slots.into_iter().zip(results) {
            let r = &mut self.running[ri];
            let logits = match res {
                Ok(l) => l,
                Err(e) => {
                    r.fail(e);
                    continue;
                }
            };
            if r.failed {
                continue;
            }
            let taken = match slot {
                Slot::Prefill => {
                    let Phase::Prefill { cache, fed } = &r.phase else { unreachable!() };
                    if *fed < r.prefill_target() {
                        continue;
                    }
                    if r.base == 0 {
                        self.prefix.insert(&r.prompt[..*fed], cache, r.params.adapter.as_ref().map_or("", |a| &a.name));
                    }
                    start_decoding(ctx.tokenizer, r, &logits)
                }
                Slot::Sample(si) => sample_token(ctx.tokenizer, r, si, &logits),
            };
            self.stats.completion_tokens_total += taken.tokens;
            self.stats.forced_tokens_total += taken.forced;
            self.stats.mask_secs += taken.mask_secs;
        }
    }

    /// Removes requests that are finished, failed or gone and returns the
    /// finished ones, whose `Finished` event the caller sends with
    /// [`Running::send_finished`] once it has published the slots they free.
    pub fn retire(&mut self, tokenizer: &Tokenizer) -> Vec<Running<S>> {
        let mut finished = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let done = !r.gone && !r.failed && r.finished();
            if done || r.gone || r.failed {
                let r = self.running.remove(i);
                self.faults.retain(|(id, _)| *id != r.id);
                if done {
                    finished.push(r);
                }
            } else {
                i += 1;
            }
        }
        for r in &finished {
            self.remember(tokenizer, r);
        }
        finished
    }

    /// A finished request's answers (each sample's) go into the answer
    /// memory for prompt lookup (`--lookup`); a single-sample one's prompt +
    /// answer into the prefix cache: the next turn of a chat starts with
    /// exactly that.
    fn remember(&mut self, tokenizer: &Tokenizer, r: &Running<S>) {
        if let Some(mem) = self.answers.as_mut() {
            for s in r.samples() {
                let ids: Vec<u32> = s.seq.ids().iter().copied().filter(|&id| !tokenizer.is_special(id)).collect();
                mem.record(&r.prompt, &tokenizer.decode(&ids));
            }
        }
        if r.n != 1 || r.base != 0 {
            return;
        }
        let s = &r.samples()[0];
        // The cache holds the first `cache.len()` of prompt + answer (never the last token).
        let mut tokens = r.prompt.clone();
        tokens.extend_from_slice(s.seq.ids());
        let len = s.cache.len().min(tokens.len());
        self.prefix.insert(&tokens[..len], &s.cache, r.params.adapter.as_ref().map_or("", |a| &a.name));
    }
}

/// What a forward pass needs, borrowed apart from the running requests
/// whose caches the batch borrows.
struct Forward<'a> {
    model: &'a Model,
    pool: &'a ThreadPool,
    faults: &'a [(u64, Fault)],
}

impl Forward<'_> {
    /// Runs the batch; on failure, restores the caches and runs each
    /// sequence alone, so only the failing ones get an error (the retries
    /// produce exactly what the batch would have: rows do not interact).
    fn contained(&self, seqs: &mut [SeqBatch], owners: &[u64]) -> Vec<Result<Vec<f32>, String>> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        match self.try_run(seqs, owners) {
            Ok(out) => out.into_iter().map(Ok).collect(),
            Err(e) => {
                for (s, &len) in seqs.iter_mut().zip(&lens) {
                    s.cache.truncate(len);
                }
                if seqs.len() == 1 {
                    return vec![Err(e)];
                }
                (0..seqs.len())
                    .map(|i| {
                        let one = &mut seqs[i..i + 1];
                        self.try_run(one, &owners[i..i + 1]).map(|mut o| o.pop().unwrap_or_default()).inspect_err(
                            |_| {
                                one[0].cache.truncate(lens[i]);
                            },
                        )
                    })
                    .collect()
            }
        }
    }

    fn try_run(&self, seqs: &mut [SeqBatch], owners: &[u64]) -> Result<Vec<Vec<f32>>, String> {
        let fault = self.faults.iter().find(|(id, _)| owners.contains(id)).map(|&(_, f)| f);
        let (model, pool) = (self.model, self.pool);
        let out = catch_unwind(AssertUnwindSafe(|| {
            match fault {
                Some(Fault::Error) => return Err(ModelError::new("injected fault")),
                Some(Fault::Panic) => panic!("injected panic"),
                None => {}
            }
            model.forward(pool, seqs)
        }));
        match out {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("forward pass failed: {e}")),
            Err(p) => Err(format!("forward pass panicked: {}", panic_message(&*p))),
        }
    }
}

/// Whether a step computes its masks during the forward pass (on a helper
/// thread) rather than after it: `MINNOW_MASK_OVERLAP=0` turns it off, for
/// measuring one against the other.
fn overlap_masks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MINNOW_MASK_OVERLAP").map_or(true, |v| v != "0"))
}

/// What one sample took in a step: tokens (forced ones included), forced
/// tokens, and the seconds its constraint's masks and forced tokens cost.
#[derive(Default)]
struct Taken {
    tokens: u64,
    forced: u64,
    mask_secs: f64,
}

impl std::ops::Add for Taken {
    type Output = Taken;
    fn add(self, o: Taken) -> Taken {
        Taken {
            tokens: self.tokens + o.tokens,
            forced: self.forced + o.forced,
            mask_secs: self.mask_secs + o.mask_secs,
        }
    }
}

/// The prompt is read: forks the cache per sample and samples each one's
/// first token from the prompt's last `logits` (none when the last prompt
/// token was held back: the next step feeds it). Returns what was taken.
fn start_decoding<S: FnMut(GenEvent) -> bool>(tokenizer: &Tokenizer, r: &mut Running<S>, logits: &[f32]) -> Taken {
    let Phase::Prefill { cache, .. } = std::mem::replace(&mut r.phase, Phase::Decode { samples: Vec::new() }) else {
        unreachable!()
    };
    r.prefilled = Some(Instant::now());
    // The sequence's context is what the cache has room for after the base.
    let ctx = cache.max_len() - r.base;
    let mut samples = Vec::with_capacity(r.n);
    let mut cache = Some(cache);
    for i in 0..r.n {
        // Sample i samples with the request's seed plus i.
        let seed = r.params.sampling.seed.wrapping_add(i as u64);
        let seq = Sequence::new(&r.prompt, &r.params, seed, ctx, r.top_logprobs);
        // The last sample takes the original cache; the others copy it.
        let c = if i + 1 == r.n { cache.take().unwrap() } else { cache.as_ref().unwrap().clone() };
        samples.push(Sample { cache: c, seq, spec: None, input: Vec::new() });
    }
    r.phase = Phase::Decode { samples };
    if r.params.max_tokens == 0 {
        // Nothing to generate (the prompt still went into the prefix cache).
        for index in 0..r.n {
            r.emit(GenEvent::Done { index, finish: FinishReason::Length, text_tail: String::new() });
        }
        return Taken::default();
    }
    (0..r.n).map(|si| sample_token(tokenizer, r, si, logits)).fold(Taken::default(), |a, b| a + b)
}

/// Samples sample `si`'s next token from `logits` and sends its events.
/// Takes what its constraint then forces too.
fn sample_token<S: FnMut(GenEvent) -> bool>(
    tokenizer: &Tokenizer,
    r: &mut Running<S>,
    si: usize,
    logits: &[f32],
) -> Taken {
    let Phase::Decode { samples } = &mut r.phase else { return Taken::default() };
    let s = &mut samples[si];
    if s.seq.is_done() || logits.is_empty() {
        return Taken::default();
    }
    let mask_before = s.seq.mask_secs();
    // Where the constraint allows one continuation only (at the start of
    // an answer, say) it is taken without sampling; otherwise a token is
    // sampled, and what the constraint forces after it is taken at once.
    // The next step computes all of them in one pass (jump-forward).
    let mut taken = Vec::new();
    let mut forced = s.seq.forced_tokens();
    if forced.is_empty() {
        let next = s.seq.sample(logits);
        taken.push((next, s.seq.push(tokenizer, next, true, Some(logits))));
        forced = s.seq.forced_tokens();
    }
    let mut n_forced = 0;
    for f in forced {
        if s.seq.is_done() {
            break;
        }
        taken.push((f, s.seq.push(tokenizer, f, false, None)));
        n_forced += 1;
    }
    let out = Taken { tokens: taken.len() as u64, forced: n_forced as u64, mask_secs: s.seq.mask_secs() - mask_before };
    for (id, p) in taken {
        emit_token(r, si, id, p);
    }
    out
}

/// Sends the events of a token sample `si`'s [`Sequence`] took (sampled
/// here or committed by a speculative round).
pub(crate) fn emit_token<S: FnMut(GenEvent) -> bool>(r: &mut Running<S>, si: usize, id: u32, p: Pushed) {
    r.completion_tokens += 1;
    r.first_token.get_or_insert_with(Instant::now);
    if p.is_text {
        r.emit(GenEvent::Token { index: si, id, text: p.text, logprob: p.logprob });
    }
    if let Some(finish) = p.finish {
        r.emit(GenEvent::Done { index: si, finish, text_tail: p.tail });
    }
}

/// What one in-process request ([`run_one`]) came to.
pub(crate) struct Outcome {
    /// Per sample: generated ids, why it finished, its released text.
    pub samples: Vec<(Vec<u32>, FinishReason, String)>,
    /// Sample 0's cache: prompt and generated tokens up to the last step's
    /// output (never fed back).
    pub cache: KvCache,
    /// Sample 0's speculation statistics, if it speculated.
    pub spec: Option<SpecStats>,
    /// Submission to the prompt read; the prompt read to the end.
    pub prompt_secs: f64,
    pub gen_secs: f64,
    /// Steps taken after the prompt was read (forward passes or rounds).
    pub decode_steps: usize,
}

/// Runs one request to its end on a [`Core`] of its own: the in-process
/// form of what the server's scheduler does (`minnow run` and the other
/// library entry points). `cache` is the cache to continue (it may hold a
/// prefix of other tokens); `speculation` with `references` (earlier answers
/// for prompt lookup) speculates; `on_text(i, piece)` gets sample `i`'s
/// released text as it is produced.
pub(crate) fn run_one(
    ctx: &StepCtx,
    req: GenRequest,
    cache: KvCache,
    speculation: Option<SpecConfig>,
    references: Vec<Arc<[u8]>>,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Outcome, ModelError> {
    let n = req.n;
    let texts = std::cell::RefCell::new(vec![String::new(); n]);
    let error = std::cell::RefCell::new(None::<String>);
    let sink = |ev: GenEvent| {
        let (i, piece) = match ev {
            GenEvent::Token { index, text, .. } => (index, text),
            GenEvent::Done { index, text_tail, .. } => (index, text_tail),
            GenEvent::Error(m) | GenEvent::Cancelled(m) => {
                *error.borrow_mut() = Some(m);
                return true;
            }
            GenEvent::Finished { .. } => return true,
        };
        if let Some(t) = texts.borrow_mut().get_mut(i) {
            t.push_str(&piece);
        }
        on_text(i, &piece);
        true
    };
    let mut core = Core::with(cache.max_len(), crate::generate::PROMPT_CHUNK, 0, speculation, false);
    core.references = references;
    let start = Instant::now();
    core.admit(ctx.model, 0, req, sink, start, Some(cache));
    let mut decode_steps = 0;
    let mut done = None;
    while !core.running.is_empty() {
        decode_steps += usize::from(core.running[0].prefilled.is_some());
        core.step(ctx);
        done = core.retire(ctx.tokenizer).pop().or(done);
    }
    drop(core);
    let Some(r) = done else {
        let msg = error.borrow_mut().take().unwrap_or_else(|| "the request ended without an answer".into());
        return Err(ModelError::new(msg));
    };
    let end = Instant::now();
    let prefilled = r.prefilled.unwrap_or(end);
    let spec = r.spec_stats(0);
    let Phase::Decode { samples } = r.phase else { unreachable!("a finished request is decoding") };
    let texts = texts.into_inner();
    let mut cache = None;
    let mut out = Vec::with_capacity(n);
    for (s, text) in samples.into_iter().zip(texts) {
        out.push((s.seq.ids().to_vec(), s.seq.finish().unwrap_or(FinishReason::Length), text));
        cache.get_or_insert(s.cache);
    }
    Ok(Outcome {
        samples: out,
        cache: cache.expect("a request has a sample"),
        spec,
        prompt_secs: prefilled.duration_since(start).as_secs_f64(),
        gen_secs: end.duration_since(prefilled).as_secs_f64(),
        decode_steps,
    })
}
