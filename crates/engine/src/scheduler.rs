//! Continuous batching: many generation requests served together by one
//! thread that owns the model's thread pool.
//!
//! Every step is one [`Model::forward`](crate::model::Model::forward) call
//! over all running sequences: a decoding sequence contributes its last
//! token, a sequence still reading its prompt contributes the next chunk of
//! at most [`SchedulerConfig::prefill_chunk`] tokens. Weights are read once
//! per step whatever the batch holds, so sixteen streams cost little more per
//! step than one, and a long prompt is spread over several steps so streams
//! already decoding keep producing tokens while it is read. Requests join and
//! leave between steps; when nothing runs the thread sleeps on a condition
//! variable.
//!
//! Output does not depend on batch composition: the model computes each row
//! of a batch in a fixed order, independent of the other rows, and the
//! scheduler gives each sequence its own sampler, seeded per request. A
//! greedy request therefore produces the same tokens alone, among fifteen
//! others, prefilled in different chunks, or resumed from the prefix cache.
//!
//! A request with `n > 1` samples reads its prompt once; its KV cache is then
//! copied per sample, and sample `i` samples with seed `seed + i`. Finished
//! prompts (and finished single-sample generations, prompt plus answer) go
//! into a prefix cache (`prefix_cache`) that later prompts starting the same
//! way resume from.
//!
//! Results are pushed to each request's [`EventSink`] from the scheduler
//! thread. Failures are contained: a forward pass that errors or panics is
//! retried sequence by sequence so only the requests that really fail get a
//! [`GenEvent::Error`]; a panicking sink counts as a client that went away;
//! a panic anywhere else in a step fails the requests of that step, and the
//! thread keeps serving.

mod prefix_cache;
mod speculate;

pub use crate::sequence::{token_logprob, TokenLogprob};
pub use prefix_cache::MIN_PREFIX;
pub use speculate::{SpecTotals, Speculation};

use crate::generate::{FinishReason, GenerateParams};
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::model::{Logits, SeqBatch};
use crate::sequence::{Pushed, Sequence};
use crate::speculative::memory::LookupMemory;
use minnow_kernels::pool::ThreadPool;
use prefix_cache::PrefixCache;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Instant;

/// The most alternatives a token's logprobs may list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How the scheduler is sized. [`Scheduler::start`] normalises it (see
/// [`Scheduler::config`]).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together (`--parallel`); a request with `n`
    /// samples takes `n`. At least 1.
    pub max_parallel: usize,
    /// Context per sequence (prompt + generated tokens). Capped at the
    /// model's training context by `start`.
    pub ctx: usize,
    /// Requests that may wait for a free slot before `submit` answers
    /// [`SubmitError::QueueFull`]. A request that can start at the next step
    /// (enough free slots) is never refused, even with `max_queue == 0`.
    pub max_queue: usize,
    /// Prompt tokens per step per sequence: long prompts are read in chunks
    /// interleaved with decoding steps so running streams do not stall.
    pub prefill_chunk: usize,
    /// Bound on the bytes of KV the prefix cache keeps; 0 disables it.
    pub prefix_cache_bytes: usize,
    /// Speculative decoding while a single sequence decodes (see `speculate`).
    pub speculation: Option<Speculation>,
}

impl Default for SchedulerConfig {
    /// 16 parallel sequences, a 4096-token context (lowered to the model's
    /// own if smaller), 64 queued requests, 256-token prefill chunks, a
    /// 512 MiB prefix cache.
    fn default() -> Self {
        SchedulerConfig {
            max_parallel: 16,
            ctx: 4096,
            max_queue: 64,
            prefill_chunk: 256,
            prefix_cache_bytes: 512 << 20,
            speculation: None,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Prompt token ids (already templated and tokenized).
    pub prompt: Vec<u32>,
    /// `max_tokens`, sampling (with its seed), stop strings, `stop_at_eog`.
    pub params: GenerateParams,
    /// Samples sharing one prompt prefill: the KV cache is copied after the
    /// prompt, not recomputed. Sample `i` uses seed `seed + i`.
    pub n: usize,
    /// `Some(k)`: every Token event carries the chosen token's logprob and
    /// the `k` (at most [`MAX_TOP_LOGPROBS`]) most likely tokens.
    pub top_logprobs: Option<usize>,
}

impl GenRequest {
    /// One sample, no logprobs.
    pub fn new(prompt: Vec<u32>, params: GenerateParams) -> GenRequest {
        GenRequest { prompt, params, n: 1, top_logprobs: None }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (counted once for `n` samples).
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not recomputed).
    pub cached_prompt_tokens: usize,
    /// Tokens generated over all samples, including an end-of-generation
    /// token that ended a sample.
    pub completion_tokens: usize,
}

/// What a request's sink receives, in order: per sample, `Token`s then one
/// `Done`; then one `Finished` after every sample is done. `Error` instead
/// ends a request that failed, `Cancelled` one that a shutdown cut short;
/// nothing follows either.
#[derive(Clone, Debug)]
pub enum GenEvent {
    /// A generated token of sample `index`. `text` is the text released by
    /// it, possibly empty while a UTF-8 character or a possible stop string
    /// is pending. An end-of-generation token that stops a sample gets no
    /// Token event (it is not text); it is counted in `completion_tokens`.
    Token {
        index: usize,
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Sample `index` ended; `text_tail` is held-back text released at the end.
    Done {
        index: usize,
        finish: FinishReason,
        text_tail: String,
    },
    /// All samples are done. `ttft_secs`: submit → first sampled token.
    Finished {
        usage: Usage,
        ttft_secs: f64,
        total_secs: f64,
    },
    Error(String),
    /// [`Scheduler::shutdown`] with cancellation ended the request before it
    /// finished (running or still queued): whatever was sent is incomplete,
    /// and a server must say so rather than present it as an answer.
    Cancelled(String),
}

/// Why a shutdown cut a request short, as [`GenEvent::Cancelled`] says it.
pub const SHUTDOWN_CANCEL_MESSAGE: &str = "the server is shutting down: the request was cut short before it finished";

/// Receives events on the scheduler thread; must not block. Returning false
/// means the client is gone: the request is cancelled and its slot freed at
/// once. A sink that panics is treated the same way.
pub type EventSink = Box<dyn FnMut(GenEvent) -> bool + Send>;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full; retry in about {retry_after_secs} s")]
    QueueFull { retry_after_secs: u64 },
    #[error(
        "the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context size of {ctx} tokens"
    )]
    ContextOverflow { prompt_tokens: usize, max_tokens: usize, ctx: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("scheduler is shutting down")]
    ShuttingDown,
}

#[derive(Clone, Debug, Default)]
pub struct SchedulerStats {
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    /// Sequences (slots) in use: a running request with `n` samples counts `n`.
    pub active: usize,
    /// Running requests.
    pub active_requests: usize,
    /// Requests accepted by `submit`.
    pub requests_total: u64,
    /// Prompt tokens of started requests, including cached ones.
    pub prompt_tokens_total: u64,
    /// Prompt tokens reused from the prefix cache.
    pub cached_prompt_tokens_total: u64,
    pub completion_tokens_total: u64,
    /// Forward passes run.
    pub steps_total: u64,
    /// Sequences in the last forward pass.
    pub last_batch_size: usize,
    /// Sum of sequences over all forward passes (÷ `steps_total` = mean batch).
    pub batch_size_sum: u64,
    /// Time spent in forward passes.
    pub busy_secs: f64,
    pub prefix_cache_bytes: usize,
    pub prefix_cache_entries: usize,
    /// With speculation configured: what it did.
    pub speculation: Option<SpecTotals>,
}

/// A fault the scheduler's own tests inject into a request's forward pass,
/// to exercise error containment without a broken model.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The forward pass of the request's sequences returns an error.
    Error,
    /// ... panics.
    Panic,
}

/// Handle to the scheduler thread. Dropping it shuts down with
/// `cancel_running = true`.
pub struct Scheduler {
    shared: Arc<Shared>,
    model: Arc<LoadedModel>,
    cfg: SchedulerConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

/// State shared by the handle (submit, cancel, stats) and the thread.
struct Shared {
    state: Mutex<State>,
    /// Signalled on submit, cancel and shutdown: wakes an idle thread.
    wake: Condvar,
}

struct State {
    queue: VecDeque<Queued>,
    /// Ids whose cancellation the thread has not yet applied.
    cancels: Vec<u64>,
    /// `Some(cancel_running)` once shutdown was asked for.
    shutdown: Option<bool>,
    /// The thread has exited (after shutdown, or if it ever died).
    stopped: bool,
    next_id: u64,
    /// Slots held by running requests (for submit's queue accounting).
    active_slots: usize,
    /// Moving average of request duration, for QueueFull's retry hint.
    avg_request_secs: f64,
    stats: SchedulerStats,
    faults: Vec<(u64, Fault)>,
}

struct Queued {
    id: u64,
    req: GenRequest,
    sink: EventSink,
    submitted: Instant,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain counters behind, still
    // usable; refusing service over it would be worse.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scheduler {
    /// Starts the scheduler thread, which owns `pool` from now on.
    pub fn start(model: Arc<LoadedModel>, pool: ThreadPool, cfg: SchedulerConfig) -> Scheduler {
        let cfg = SchedulerConfig {
            max_parallel: cfg.max_parallel.max(1),
            ctx: cfg.ctx.min(model.model.config().context_length).max(1),
            max_queue: cfg.max_queue,
            prefill_chunk: cfg.prefill_chunk.max(1),
            prefix_cache_bytes: cfg.prefix_cache_bytes,
            speculation: cfg.speculation,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                cancels: Vec::new(),
                shutdown: None,
                stopped: false,
                next_id: 1,
                active_slots: 0,
                avg_request_secs: 0.0,
                stats: SchedulerStats {
                    speculation: cfg.speculation.as_ref().map(|_| SpecTotals::default()),
                    ..SchedulerStats::default()
                },
                faults: Vec::new(),
            }),
            wake: Condvar::new(),
        });
        let worker = Worker {
            shared: shared.clone(),
            model: model.clone(),
            pool,
            prefix: PrefixCache::new(cfg.prefix_cache_bytes),
            answers: cfg
                .speculation
                .as_ref()
                .filter(|s| s.draft.is_none())
                .map(|_| LookupMemory::new(speculate::ANSWERS_KEPT)),
            cfg: cfg.clone(),
            running: Vec::new(),
            faults: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("minnow-scheduler".into())
            .spawn(move || worker.run())
            .expect("cannot spawn the scheduler thread");
        let thread_id = handle.thread().id();
        Scheduler { shared, model, cfg, thread: Mutex::new(Some(handle)), thread_id }
    }

    /// Checks and queues a request; its events go to `sink`. Returns the
    /// request id (for [`cancel`](Self::cancel)).
    pub fn submit(&self, req: GenRequest, sink: EventSink) -> Result<u64, SubmitError> {
        self.validate(&req)?;
        let mut st = lock(&self.shared);
        if st.shutdown.is_some() || st.stopped {
            return Err(SubmitError::ShuttingDown);
        }
        if st.queue.len() >= self.cfg.max_queue {
            // Still accept what can start at the next step: the queue is a
            // hand-off to the thread as much as a waiting room.
            let queued_slots: usize = st.queue.iter().map(|q| q.req.n).sum();
            if st.active_slots + queued_slots + req.n > self.cfg.max_parallel {
                let waves = (st.queue.len() + 1).div_ceil(self.cfg.max_parallel) as f64;
                let secs = (st.avg_request_secs * waves).ceil().clamp(1.0, 600.0) as u64;
                return Err(SubmitError::QueueFull { retry_after_secs: secs });
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.stats.requests_total += 1;
        st.queue.push_back(Queued { id, req, sink, submitted: Instant::now() });
        st.stats.queue_depth = st.queue.len();
        drop(st);
        self.shared.wake.notify_all();
        Ok(id)
    }

    fn validate(&self, req: &GenRequest) -> Result<(), SubmitError> {
        let invalid = |m: String| Err(SubmitError::Invalid(m));
        if req.prompt.is_empty() {
            return invalid("the prompt is empty".into());
        }
        if req.n == 0 || req.n > self.cfg.max_parallel {
            return invalid(format!("n must be between 1 and {}, got {}", self.cfg.max_parallel, req.n));
        }
        if let Some(k) = req.top_logprobs {
            if k > MAX_TOP_LOGPROBS {
                return invalid(format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"));
            }
        }
        req.params.sampling.validate().map_err(|e| SubmitError::Invalid(e.to_string()))?;
        // Ids the network can embed and the tokenizer can print.
        let vocab = self.model.model.config().vocab_size.min(self.model.tokenizer.vocab_size());
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return invalid(format!("token id {bad} is outside the vocabulary of {vocab} tokens"));
        }
        let (prompt_tokens, max_tokens) = (req.prompt.len(), req.params.max_tokens);
        if prompt_tokens.saturating_add(max_tokens) > self.cfg.ctx {
            return Err(SubmitError::ContextOverflow { prompt_tokens, max_tokens, ctx: self.cfg.ctx });
        }
        Ok(())
    }

    /// Cancels a queued or running request between steps: no further events
    /// reach its sink, which is dropped. Unknown or finished ids are ignored.
    pub fn cancel(&self, id: u64) {
        lock(&self.shared).cancels.push(id);
        self.shared.wake.notify_all();
    }

    pub fn stats(&self) -> SchedulerStats {
        let st = lock(&self.shared);
        let mut s = st.stats.clone();
        s.queue_depth = st.queue.len();
        s
    }

    /// The configuration in force: `max_parallel` and `prefill_chunk` at
    /// least 1, `ctx` at most the model's training context.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Stops accepting requests (`submit` answers `ShuttingDown`), then:
    /// - `cancel_running == false`: serves everything already accepted,
    ///   queued requests included, to the end;
    /// - `cancel_running == true`: ends every running and queued request at
    ///   the next step with [`GenEvent::Cancelled`], so a client can tell its
    ///   answer was cut short (a `Done { finish: Length }` would pass it off
    ///   as complete).
    ///
    /// Then joins the thread. Called from a sink (on the scheduler thread) it
    /// only asks; later calls after the first just wait for the thread.
    pub fn shutdown(&self, cancel_running: bool) {
        {
            let mut st = lock(&self.shared);
            // A later "cancel" upgrades an earlier graceful shutdown.
            st.shutdown = Some(st.shutdown.unwrap_or(false) || cancel_running);
        }
        self.shared.wake.notify_all();
        if std::thread::current().id() == self.thread_id {
            return;
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Makes the next forward pass that includes request `id` fail.
    #[doc(hidden)]
    pub fn inject_fault(&self, id: u64, fault: Fault) {
        lock(&self.shared).faults.push((id, fault));
        self.shared.wake.notify_all();
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

// ---------------------------------------------------------------------------
// The scheduler thread.

struct Worker {
    shared: Arc<Shared>,
    model: Arc<LoadedModel>,
    pool: ThreadPool,
    cfg: SchedulerConfig,
    running: Vec<Running>,
    prefix: PrefixCache,
    /// Recent answers for prompt lookup to draft from (`--lookup` only).
    answers: Option<LookupMemory>,
    faults: Vec<(u64, Fault)>,
}

/// A request that holds slots.
struct Running {
    id: u64,
    sink: EventSink,
    submitted: Instant,
    first_token: Option<Instant>,
    prompt: Vec<u32>,
    params: GenerateParams,
    n: usize,
    top_logprobs: Option<usize>,
    cached: usize,
    completion_tokens: usize,
    phase: Phase,
    /// The client is gone (sink said so, or `cancel`): drop silently.
    gone: bool,
    /// Failed: an Error event was sent; drop.
    failed: bool,
}

enum Phase {
    /// Reading the prompt; `cache` holds its first `cache.len()` tokens.
    Prefill {
        cache: KvCache,
    },
    Decode {
        samples: Vec<Sample>,
    },
}

struct Sample {
    cache: KvCache,
    /// Sampling, stop rule and generated ids (the last one is the next
    /// step's input).
    seq: Sequence,
    /// Speculation state while this sample decodes alone.
    spec: Option<Box<crate::speculative::SpecSeq>>,
}

/// Which sequence of a running request a batch row belongs to.
#[derive(Clone, Copy)]
enum Slot {
    /// A prompt chunk.
    Prefill,
    /// A decode step of sample `i`.
    Sample(usize),
}

impl Running {
    /// Sends an event unless the client is gone; a sink that refuses or
    /// panics marks the request gone.
    fn emit(&mut self, ev: GenEvent) {
        if self.gone {
            return;
        }
        let sink = &mut self.sink;
        match catch_unwind(AssertUnwindSafe(|| sink(ev))) {
            Ok(true) => {}
            Ok(false) | Err(_) => self.gone = true,
        }
    }

    fn fail(&mut self, msg: String) {
        if !self.failed {
            self.emit(GenEvent::Error(msg));
            self.failed = true;
        }
    }

    fn finished(&self) -> bool {
        match &self.phase {
            Phase::Prefill { .. } => false,
            Phase::Decode { samples } => samples.iter().all(|s| s.seq.is_done()),
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
    fn send_finished(&mut self) {
        let now = Instant::now();
        let total_secs = now.duration_since(self.submitted).as_secs_f64();
        let ttft_secs = self.first_token.map_or(total_secs, |t| t.duration_since(self.submitted).as_secs_f64());
        let usage = self.usage();
        self.emit(GenEvent::Finished { usage, ttft_secs, total_secs });
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".into()
    }
}

/// Marks the state stopped even if the thread unwinds, so `submit` refuses
/// instead of queueing work nobody will do.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let queued: Vec<Queued> = {
            let mut st = lock(&self.0);
            st.stopped = true;
            st.active_slots = 0;
            st.stats.active = 0;
            st.stats.active_requests = 0;
            st.stats.queue_depth = 0;
            st.queue.drain(..).collect()
        };
        for mut q in queued {
            let _ = catch_unwind(AssertUnwindSafe(|| (q.sink)(GenEvent::Cancelled(SHUTDOWN_CANCEL_MESSAGE.into()))));
        }
    }
}

impl Worker {
    fn run(mut self) {
        let _guard = StopGuard(self.shared.clone());
        loop {
            let admitted = match self.between_steps() {
                Some(a) => a,
                None => break,
            };
            // Anything unexpected in a step (a bug here, not in the model,
            // whose panics `forward` already contains) fails that step's
            // requests rather than the thread.
            let res = catch_unwind(AssertUnwindSafe(|| {
                for q in admitted {
                    self.admit(q);
                }
                if !self.running.is_empty() {
                    self.step();
                }
            }));
            if let Err(p) = res {
                let msg = format!("internal error in the scheduler: {}", panic_message(&*p));
                for r in &mut self.running {
                    r.fail(msg.clone());
                }
            }
            self.retire();
        }
    }

    /// Applies cancellations and shutdown, sleeps while there is nothing to
    /// do, and takes the requests that fit into free slots. `None`: exit.
    fn between_steps(&mut self) -> Option<Vec<Queued>> {
        let mut st = lock(&self.shared);
        loop {
            for id in std::mem::take(&mut st.cancels) {
                // The sink of a cancelled queued request is just dropped.
                st.queue.retain(|q| q.id != id);
                for r in self.running.iter_mut().filter(|r| r.id == id) {
                    r.gone = true;
                }
            }
            self.faults.append(&mut st.faults);
            if st.shutdown == Some(true) {
                let queued: Vec<Queued> = st.queue.drain(..).collect();
                drop(st);
                self.cancel_all(queued);
                return None;
            }
            if !self.running.is_empty() || !st.queue.is_empty() {
                break;
            }
            if st.shutdown == Some(false) {
                return None;
            }
            st = self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        // Free slots go to waiting requests in arrival order; one that needs
        // more slots than are free waits (and holds back those behind it, so
        // a request with large n is not starved by a stream of small ones).
        let mut used: usize = self.running.iter().filter(|r| !r.gone).map(|r| r.n).sum();
        let mut admitted = Vec::new();
        while let Some(q) = st.queue.front() {
            if used + q.req.n > self.cfg.max_parallel {
                break;
            }
            used += q.req.n;
            admitted.push(st.queue.pop_front().unwrap());
        }
        st.active_slots = used;
        st.stats.queue_depth = st.queue.len();
        Some(admitted)
    }

    /// Shutdown with cancellation: every running and queued request ends
    /// with [`GenEvent::Cancelled`].
    fn cancel_all(&mut self, queued: Vec<Queued>) {
        for mut r in std::mem::take(&mut self.running) {
            if r.gone || r.failed {
                continue;
            }
            r.emit(GenEvent::Cancelled(SHUTDOWN_CANCEL_MESSAGE.into()));
        }
        for mut q in queued {
            let _ = catch_unwind(AssertUnwindSafe(|| (q.sink)(GenEvent::Cancelled(SHUTDOWN_CANCEL_MESSAGE.into()))));
        }
    }

    /// Starts a request: resumes from the longest cached prefix of its prompt.
    fn admit(&mut self, q: Queued) {
        let Queued { id, req, sink, submitted } = q;
        let (cache, cached) =
            self.prefix.lookup(&req.prompt).unwrap_or_else(|| (self.model.model.new_cache(self.cfg.ctx), 0));
        {
            let mut st = lock(&self.shared);
            st.stats.prompt_tokens_total += req.prompt.len() as u64;
            st.stats.cached_prompt_tokens_total += cached as u64;
        }
        self.running.push(Running {
            id,
            sink,
            submitted,
            first_token: None,
            prompt: req.prompt,
            params: req.params,
            n: req.n,
            top_logprobs: req.top_logprobs,
            cached,
            completion_tokens: 0,
            phase: Phase::Prefill { cache },
            gone: false,
            failed: false,
        });
    }

    /// One forward pass over every running sequence, then sampling.
    fn step(&mut self) {
        if let Some((ri, si)) = self.lone_decoder() {
            return self.speculate(ri, si);
        }
        self.drop_spec_states();
        let chunk = self.cfg.prefill_chunk;
        // Build the batch: rows in request order (which rows sit where has no
        // effect on any row's result).
        let mut slots: Vec<(usize, Slot)> = Vec::new();
        let mut owners: Vec<u64> = Vec::new();
        let mut seqs: Vec<SeqBatch> = Vec::new();
        for (ri, r) in self.running.iter_mut().enumerate() {
            if r.gone || r.failed {
                continue;
            }
            let Running { prompt, phase, id, .. } = r;
            match phase {
                Phase::Prefill { cache } => {
                    let start = cache.len();
                    let end = (start + chunk).min(prompt.len());
                    let logits = if end == prompt.len() { Logits::Last } else { Logits::None };
                    slots.push((ri, Slot::Prefill));
                    owners.push(*id);
                    seqs.push(SeqBatch { tokens: &prompt[start..end], cache, logits });
                }
                Phase::Decode { samples } => {
                    for (si, s) in samples.iter_mut().enumerate() {
                        if s.seq.is_done() {
                            continue;
                        }
                        slots.push((ri, Slot::Sample(si)));
                        owners.push(*id);
                        let last = s.seq.ids().last().expect("a decoding sample has sampled a token");
                        seqs.push(SeqBatch {
                            tokens: std::slice::from_ref(last),
                            cache: &mut s.cache,
                            logits: Logits::Last,
                        });
                    }
                }
            }
        }
        if seqs.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let fwd = Forward { model: &self.model.model, pool: &self.pool, faults: &self.faults };
        let results = fwd.contained(&mut seqs, &owners);
        let busy = t0.elapsed().as_secs_f64();
        let batch = seqs.len();
        drop(seqs);
        {
            let mut st = lock(&self.shared);
            st.stats.steps_total += 1;
            st.stats.last_batch_size = batch;
            st.stats.batch_size_sum += batch as u64;
            st.stats.busy_secs += busy;
        }

        let mut sampled = 0u64;
        for ((ri, slot), res) in slots.into_iter().zip(results) {
            let logits = match res {
                Ok(l) => l,
                Err(e) => {
                    self.running[ri].fail(e);
                    continue;
                }
            };
            let r = &mut self.running[ri];
            if r.failed {
                continue;
            }
            match slot {
                Slot::Prefill => {
                    let Phase::Prefill { cache } = &r.phase else { unreachable!() };
                    if cache.len() == r.prompt.len() {
                        self.prefix.insert(&r.prompt, cache);
                        sampled += start_decoding(&self.model, r, &logits);
                    }
                }
                Slot::Sample(si) => {
                    sampled += sample_token(&self.model, r, si, &logits) as u64;
                }
            }
        }
        if sampled > 0 {
            lock(&self.shared).stats.completion_tokens_total += sampled;
        }
    }

    /// Drops requests that are finished, failed or gone, publishes the slot
    /// count, then sends `Finished` to the finished ones: a client that sees
    /// `Finished` also sees its slot released in [`Scheduler::stats`].
    fn retire(&mut self) {
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
            self.remember_answer(r);
            self.remember_for_lookup(r);
        }
        {
            let mut st = lock(&self.shared);
            for r in &finished {
                let secs = r.submitted.elapsed().as_secs_f64();
                st.avg_request_secs =
                    if st.avg_request_secs == 0.0 { secs } else { 0.9 * st.avg_request_secs + 0.1 * secs };
            }
            st.active_slots = self.running.iter().map(|r| r.n).sum();
            st.stats.active = st.active_slots;
            st.stats.active_requests = self.running.len();
            st.stats.prefix_cache_bytes = self.prefix.bytes();
            st.stats.prefix_cache_entries = self.prefix.len();
        }
        for mut r in finished {
            r.send_finished();
        }
    }

    /// With `--lookup`, a finished request's answers (each sample's) are kept
    /// for later requests with similar prompts to draft from.
    fn remember_for_lookup(&mut self, r: &Running) {
        let (Some(mem), Phase::Decode { samples }) = (self.answers.as_mut(), &r.phase) else { return };
        let tok = &self.model.tokenizer;
        for s in samples {
            let ids: Vec<u32> = s.seq.ids().iter().copied().filter(|&id| !tok.is_special(id)).collect();
            mem.record(&r.prompt, &tok.decode(&ids));
        }
    }

    /// A finished single-sample request's prompt + answer goes into the
    /// prefix cache: the next turn of a chat starts with exactly that.
    fn remember_answer(&mut self, r: &Running) {
        if r.n != 1 {
            return;
        }
        let Phase::Decode { samples } = &r.phase else { return };
        let s = &samples[0];
        // The cache holds every generated token but the last (never fed back).
        let fed = s.cache.len().saturating_sub(r.prompt.len());
        let mut tokens = r.prompt.clone();
        let ids = s.seq.ids();
        tokens.extend_from_slice(&ids[..fed.min(ids.len())]);
        self.prefix.insert(&tokens, &s.cache);
    }
}

/// What a forward pass needs, borrowed apart from the running requests
/// whose caches the batch borrows.
struct Forward<'a> {
    model: &'a crate::model::Model,
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
                Some(Fault::Error) => return Err(crate::model::ModelError::new("injected fault")),
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

/// The prompt is read: forks the cache per sample and samples each one's
/// first token from the prompt's last logits. Returns tokens sampled.
fn start_decoding(model: &LoadedModel, r: &mut Running, logits: &[f32]) -> u64 {
    let Phase::Prefill { cache } = std::mem::replace(&mut r.phase, Phase::Decode { samples: Vec::new() }) else {
        unreachable!()
    };
    let mut samples = Vec::with_capacity(r.n);
    let mut cache = Some(cache);
    let ctx = cache.as_ref().map_or(0, |c| c.max_len());
    for i in 0..r.n {
        // Sample i samples with the request's seed plus i.
        let seed = r.params.sampling.seed.wrapping_add(i as u64);
        let seq = Sequence::new(&r.prompt, &r.params, seed, ctx, r.top_logprobs);
        // The last sample takes the original cache; the others copy it.
        let c = if i + 1 == r.n { cache.take().unwrap() } else { cache.as_ref().unwrap().clone() };
        samples.push(Sample { cache: c, seq, spec: None });
    }
    r.phase = Phase::Decode { samples };
    if r.params.max_tokens == 0 {
        // Nothing to generate (the prompt still went into the prefix cache).
        for index in 0..r.n {
            r.emit(GenEvent::Done { index, finish: FinishReason::Length, text_tail: String::new() });
        }
        return 0;
    }
    (0..r.n).map(|si| sample_token(model, r, si, logits) as u64).sum()
}

/// Samples sample `si`'s next token from `logits` and sends its events.
/// Returns whether a token was sampled.
fn sample_token(model: &LoadedModel, r: &mut Running, si: usize, logits: &[f32]) -> bool {
    let Phase::Decode { samples } = &mut r.phase else { return false };
    let s = &mut samples[si];
    if s.seq.is_done() || logits.is_empty() {
        return false;
    }
    let next = s.seq.sample(logits);
    let pushed = s.seq.push(&model.tokenizer, next, true, Some(logits));
    emit_token(r, si, next, pushed);
    true
}

/// Sends the events of a token sample `si`'s [`Sequence`] took (sampled
/// here or committed by a speculative round).
fn emit_token(r: &mut Running, si: usize, id: u32, p: Pushed) {
    r.completion_tokens += 1;
    r.first_token.get_or_insert_with(Instant::now);
    if p.is_text {
        r.emit(GenEvent::Token { index: si, id, text: p.text, logprob: p.logprob });
    }
    if let Some(finish) = p.finish {
        r.emit(GenEvent::Done { index: si, finish, text_tail: p.tail });
    }
}
