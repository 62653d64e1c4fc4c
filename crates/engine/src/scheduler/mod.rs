//! Continuous batching: many generation requests served together by one
//! thread that owns the model's thread pool.
//!
//! The loop that advances sequences lives in `core` (`Core::step`); this
//! module is the thread around it (queue, admission, cancellation,
//! shutdown, statistics). `minnow run` and the other in-process callers
//! drive a `Core` of their own with one request (`run_one`), so every way
//! minnow generates goes through the same step.
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

mod core;
mod prefix_cache;
mod speculate;

pub use crate::sequence::{token_logprob, TokenLogprob};
pub use prefix_cache::MIN_PREFIX;
pub use speculate::{SpecTotals, Speculation};

use self::core::panic_message;
pub(crate) use self::core::{run_one, Core, Outcome, StepCtx};
use crate::generate::{FinishReason, GenerateParams};
use crate::loader::LoadedModel;
use minnow_kernels::pool::ThreadPool;
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
    /// Requests with a constraint (structured output).
    pub constrained_requests_total: u64,
    /// Tokens constraints forced (taken without sampling).
    pub forced_tokens_total: u64,
    /// Seconds spent computing token masks and forced tokens.
    pub mask_secs: f64,
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
        let worker =
            Worker { shared: shared.clone(), model: model.clone(), pool, core: Core::new(&cfg), cfg: cfg.clone() };
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
// The scheduler thread: a `Core` fed from the queue.

struct Worker {
    shared: Arc<Shared>,
    model: Arc<LoadedModel>,
    pool: ThreadPool,
    cfg: SchedulerConfig,
    core: Core<EventSink>,
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
            let draft = self.cfg.speculation.as_ref().and_then(|s| s.draft.as_ref()).map(|d| &d.model);
            let ctx = StepCtx { model: &self.model.model, tokenizer: &self.model.tokenizer, pool: &self.pool, draft };
            let core = &mut self.core;
            let res = catch_unwind(AssertUnwindSafe(|| {
                for q in admitted {
                    core.admit(ctx.model, q.id, q.req, q.sink, q.submitted, None);
                }
                if !core.running.is_empty() {
                    core.step(&ctx);
                }
            }));
            if let Err(p) = res {
                let msg = format!("internal error in the scheduler: {}", panic_message(&*p));
                for r in &mut self.core.running {
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
                self.core.cancel(id);
            }
            self.core.faults.append(&mut st.faults);
            if st.shutdown == Some(true) {
                let queued: Vec<Queued> = st.queue.drain(..).collect();
                drop(st);
                self.cancel_all(queued);
                return None;
            }
            if !self.core.running.is_empty() || !st.queue.is_empty() {
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
        let mut used = self.core.slots();
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
        for mut r in std::mem::take(&mut self.core.running) {
            if r.gone || r.failed {
                continue;
            }
            r.emit(GenEvent::Cancelled(SHUTDOWN_CANCEL_MESSAGE.into()));
        }
        for mut q in queued {
            let _ = catch_unwind(AssertUnwindSafe(|| (q.sink)(GenEvent::Cancelled(SHUTDOWN_CANCEL_MESSAGE.into()))));
        }
    }

    /// Drops requests that are finished, failed or gone, publishes the
    /// counters and the slot count, then sends `Finished` to the finished
    /// ones: a client that sees `Finished` also sees its slot released in
    /// [`Scheduler::stats`].
    fn retire(&mut self) {
        let finished = self.core.retire(&self.model.tokenizer);
        {
            let mut st = lock(&self.shared);
            for r in &finished {
                let secs = r.submitted.elapsed().as_secs_f64();
                st.avg_request_secs =
                    if st.avg_request_secs == 0.0 { secs } else { 0.9 * st.avg_request_secs + 0.1 * secs };
            }
            let c = &self.core.stats;
            let s = &mut st.stats;
            s.prompt_tokens_total = c.prompt_tokens_total;
            s.cached_prompt_tokens_total = c.cached_prompt_tokens_total;
            s.completion_tokens_total = c.completion_tokens_total;
            s.steps_total = c.steps_total;
            s.last_batch_size = c.last_batch_size;
            s.batch_size_sum = c.batch_size_sum;
            s.busy_secs = c.busy_secs;
            s.speculation.clone_from(&c.speculation);
            s.constrained_requests_total = c.constrained_requests_total;
            s.forced_tokens_total = c.forced_tokens_total;
            s.mask_secs = c.mask_secs;
            s.prefix_cache_bytes = self.core.prefix.bytes();
            s.prefix_cache_entries = self.core.prefix.len();
            st.active_slots = self.core.running.iter().map(|r| r.n).sum();
            st.stats.active = st.active_slots;
            st.stats.active_requests = self.core.running.len();
        }
        for mut r in finished {
            r.send_finished();
        }
    }
}
