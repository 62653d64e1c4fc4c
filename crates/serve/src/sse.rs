//! Response bodies that outlive their handler: the server-sent-event stream
//! of a generation, and the wrapper that logs a request when its body ends.
//!
//! Both are hand-written `http_body::Body`s. The stream's body owns the
//! receiving end of the scheduler's event channel: when the client goes
//! away, hyper drops the body, the receiver goes with it, and the
//! scheduler's next `sink(event)` returns `false`, which frees the slot; the
//! [`CancelGuard`] inside also cancels the request at once, without waiting
//! for the next token.

use crate::error::ApiError;
use crate::render::{client_view, Choice, Shape};
use crate::{AppState, RequestLog};
use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use minnow_engine::scheduler::{GenEvent, Scheduler, TokenLogprob};
use minnow_engine::tools::{CallSplitter, Piece};
use serde_json::Value;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc::UnboundedReceiver;

/// Cancels a submitted request when dropped before it finished: a client
/// that hung up, a handler future dropped mid-wait, a stream cut short.
pub struct CancelGuard {
    pub scheduler: Arc<Scheduler>,
    pub id: u64,
    pub finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.scheduler.cancel(self.id);
        }
    }
}

/// Wraps any response body; marks the request's log entry complete when the
/// body has been produced to its end. The log line itself is printed when
/// the last reference to the entry goes (this body's drop, usually).
pub struct LoggedBody {
    inner: Body,
    log: Option<Arc<RequestLog>>,
}

impl LoggedBody {
    pub fn new(inner: Body, log: Arc<RequestLog>) -> LoggedBody {
        LoggedBody { inner, log: Some(log) }
    }
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once `is_end_stream` says so, so a body that
        // ends with its last frame (a plain JSON one) never returns None.
        let ended =
            matches!(r, Poll::Ready(None)) || (matches!(r, Poll::Ready(Some(Ok(_)))) && self.inner.is_end_stream());
        if ended {
            if let Some(log) = self.log.take() {
                log.update(|d| d.body_done = true);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The SSE body of one streaming generation.
pub struct SseBody {
    pub rx: UnboundedReceiver<GenEvent>,
    pub shape: Shape,
    pub state: Arc<AppState>,
    pub guard: CancelGuard,
    pub log: Arc<RequestLog>,
    pub n: usize,
    /// Text length (chars) streamed so far per choice, for `text_offset`.
    pub offsets: Vec<usize>,
    pub queued: VecDeque<Bytes>,
    pub finished: bool,
    /// With tools offered, each choice's text split into content and calls.
    pub splitters: Vec<CallSplitter>,
    /// Calls streamed so far per choice (the next call's `index`).
    pub calls_sent: Vec<usize>,
    /// What `--store` keeps of this request, while it is answered, and the
    /// choices as a plain response would hold them (empty when not stored).
    pub recording: Option<crate::store::Recording>,
    pub recorded: Vec<Choice>,
    /// The record being written; the stream's end waits for it.
    pub saving: Option<tokio::task::JoinHandle<()>>,
    /// The last chunks (usage, `[DONE]`), held until the record is durable.
    pub held: Vec<Bytes>,
}

fn data_line(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl SseBody {
    pub fn new(
        rx: UnboundedReceiver<GenEvent>,
        shape: Shape,
        state: Arc<AppState>,
        guard: CancelGuard,
        log: Arc<RequestLog>,
        n: usize,
        recording: Option<crate::store::Recording>,
    ) -> SseBody {
        let mut queued = VecDeque::new();
        // Chat streams open each choice with its role, before any text,
        // as OpenAI's do (some clients key on it).
        for i in 0..n {
            if let Some(c) = shape.role_chunk(i) {
                queued.push_back(data_line(&c));
            }
        }
        let splitters = match &shape.tools {
            Some(f) => (0..n).map(|_| CallSplitter::new(f.clone())).collect(),
            None => Vec::new(),
        };
        SseBody {
            rx,
            shape,
            state,
            guard,
            log,
            n,
            offsets: vec![0; n],
            queued,
            finished: false,
            splitters,
            calls_sent: vec![0; n],
            recorded: if recording.is_some() { (0..n).map(|_| Choice::default()).collect() } else { Vec::new() },
            recording,
            saving: None,
            held: Vec::new(),
        }
    }

    /// New text of choice `index`; with tools, what of it is content goes
    /// out as text and each completed call as its chunks. `end`: the
    /// choice's last text.
    fn reply_text(&mut self, index: usize, text: &str, lps: &[TokenLogprob], end: bool) {
        if index >= self.n {
            return;
        }
        let Some(split) = self.splitters.get_mut(index) else {
            return self.text(index, text, lps);
        };
        let mut pieces = split.push(text);
        if end {
            pieces.extend(split.finish());
        }
        let mut lps = lps;
        for p in pieces {
            match p {
                Piece::Text(t) => {
                    self.text(index, &t, lps);
                    lps = &[];
                }
                Piece::Call(c) => {
                    let k = self.calls_sent[index];
                    self.calls_sent[index] += 1;
                    for chunk in self.shape.tool_call_chunks(index, k, &c) {
                        self.queued.push_back(data_line(&chunk));
                    }
                }
            }
        }
        // Logprobs of tokens whose text is held back (or is a call) still go out.
        self.text(index, "", lps);
    }

    fn text(&mut self, index: usize, text: &str, lps: &[TokenLogprob]) {
        if index >= self.n || (text.is_empty() && lps.is_empty()) {
            return;
        }
        let tok = &self.state.model().tokenizer;
        let chunk = self.shape.text_chunk(tok, index, text, lps, self.offsets[index]);
        self.offsets[index] += text.chars().count();
        self.queued.push_back(data_line(&chunk));
    }

    fn fail(&mut self, e: ApiError) {
        self.log.update(|d| d.note = Some(e.message.clone()));
        self.queued.push_back(data_line(&e.body()));
        self.finished = true;
    }

    fn handle(&mut self, ev: GenEvent) {
        match ev {
            GenEvent::Token { index, id, text, logprob } => {
                // Counted as they go, so a stream cut short logs what it got.
                self.log.update(|d| d.completion_tokens += 1);
                if let Some(r) = &mut self.recording {
                    r.token(index, id, logprob.as_ref());
                }
                if let Some(c) = self.recorded.get_mut(index) {
                    c.push_token(&text, logprob.as_ref(), self.shape.logprobs);
                }
                let lps: Vec<TokenLogprob> = match (self.shape.logprobs, &logprob) {
                    (Some(k), Some(lp)) => vec![client_view(lp, k)],
                    _ => Vec::new(),
                };
                self.reply_text(index, &text, &lps, false);
            }
            GenEvent::Done { index, finish, text_tail } => {
                if let Some(c) = self.recorded.get_mut(index) {
                    c.end(finish, &text_tail);
                }
                self.reply_text(index, &text_tail, &[], true);
                if index < self.n {
                    let calls = self.calls_sent[index] > 0;
                    let c = self.shape.finish_chunk(index, crate::render::finish_reason(finish, calls));
                    self.queued.push_back(data_line(&c));
                }
            }
            GenEvent::Finished { usage, ttft_secs, total_secs } => {
                self.guard.finished = true;
                self.state.metrics.observe_generation(&self.shape.model, &usage, ttft_secs, total_secs, self.n);
                self.log.update(|d| {
                    d.prompt_tokens = Some(usage.prompt_tokens);
                    d.cached_tokens = usage.cached_prompt_tokens;
                    d.completion_tokens = usage.completion_tokens;
                    d.ttft_secs = Some(ttft_secs);
                });
                let mut last = Vec::new();
                if self.shape.include_usage {
                    last.push(data_line(&self.shape.usage_chunk(&usage)));
                }
                last.push(Bytes::from_static(b"data: [DONE]\n\n"));
                match self.recording.take() {
                    // The client learns its answer is whole only once it is stored.
                    Some(r) => {
                        let response = self.shape.full(&self.state.model().tokenizer, &self.recorded, &usage);
                        let rec = r.into_record(&self.state, &self.shape, response);
                        let state = self.state.clone();
                        self.saving =
                            Some(tokio::task::spawn_blocking(move || crate::store::save_blocking(&state, rec)));
                        self.held = last;
                    }
                    None => self.queued.extend(last),
                }
                self.finished = true;
            }
            GenEvent::Error(msg) => {
                self.guard.finished = true;
                self.fail(ApiError::internal(format!("generation failed: {msg}")));
            }
            // An error event and no `[DONE]`: the official clients raise on
            // it, so nobody takes a cut answer for a whole one.
            GenEvent::Cancelled(msg) => {
                self.guard.finished = true;
                self.fail(ApiError::unavailable(msg));
            }
        }
    }

    /// The scheduler let go of the sink without a last event (its thread
    /// stopped): the answer is incomplete.
    fn closed(&mut self) {
        self.guard.finished = true;
        self.fail(ApiError::unavailable(minnow_engine::scheduler::SHUTDOWN_CANCEL_MESSAGE));
    }
}

/// Most events folded into one body frame: fewer, larger writes when the
/// client reads slower than the scheduler produces.
const MAX_EVENTS_PER_FRAME: usize = 64;

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if !this.queued.is_empty() {
                let mut out = Vec::new();
                for b in this.queued.drain(..) {
                    out.extend_from_slice(&b);
                }
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
            if let Some(saving) = &mut this.saving {
                match Pin::new(saving).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => {
                        this.saving = None;
                        this.queued.extend(this.held.drain(..));
                        continue;
                    }
                }
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(ev)) => {
                    this.handle(ev);
                    let mut more = 0;
                    while !this.finished && more < MAX_EVENTS_PER_FRAME {
                        match this.rx.try_recv() {
                            Ok(ev) => this.handle(ev),
                            Err(_) => break,
                        }
                        more += 1;
                    }
                }
                Poll::Ready(None) => this.closed(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.queued.is_empty() && self.saving.is_none() && self.held.is_empty()
    }
}
