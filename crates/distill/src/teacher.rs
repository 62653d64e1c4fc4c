//! Teachers: whatever answers conversations for `label`, `synth` and `eval`.
//!
//! - [`LocalModel`]: a GGUF run by minnow's own engine through the
//!   continuous-batching [`Scheduler`]: many conversations decode together,
//!   and the prefix cache makes a shared few-shot prefix nearly free after
//!   the first request. Students are evaluated through it too.
//! - [`RemoteTeacher`]: any OpenAI-compatible `/v1/chat/completions`
//!   endpoint (`minnow serve` is one), with concurrency, a per-request
//!   timeout, retries with exponential backoff on 429/5xx and connection
//!   errors (honouring `Retry-After`) and a requests-per-minute limit.
//!
//! Both answer a batch of [`Job`]s and hand each [`Answer`] to a callback as
//! soon as it is complete, so the caller can write it to disk at once.

use crate::data::{vocab_fingerprint, TeacherLogprobs};
use anyhow::{anyhow, bail, Result};
use minnow_engine::chat::ChatMessage;
use minnow_engine::constraint::ConstraintSpec;
use minnow_engine::generate::GenerateParams;
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_engine::scheduler::{GenEvent, GenRequest, Scheduler, SchedulerConfig, SubmitError};
use minnow_engine::tokenizer::Tokenizer;
use minnow_kernels::pool::ThreadPool;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// One conversation to answer; `index` is the caller's handle for it.
#[derive(Debug, Clone)]
pub struct Job {
    pub index: usize,
    pub messages: Vec<ChatMessage>,
}

/// How to generate (the same for every job of a batch).
#[derive(Debug, Clone)]
pub struct GenSettings {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// `Some(k)`: keep the top-k log-probabilities of every answer token.
    pub logprobs: Option<usize>,
    /// Answers must be JSON valid against this schema (structured output:
    /// a local model masks its tokens; a remote one gets it as
    /// `response_format`).
    pub json_schema: Option<Value>,
}

impl Default for GenSettings {
    fn default() -> Self {
        GenSettings { max_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0, logprobs: None, json_schema: None }
    }
}

impl GenSettings {
    /// The settings as recorded in a dataset's provenance.
    pub fn to_json(&self) -> Value {
        json!({
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "logprobs": self.logprobs,
            "json_schema": self.json_schema,
        })
    }

    fn sampling(&self) -> SamplingParams {
        if self.temperature == 0.0 {
            SamplingParams { seed: self.seed, ..SamplingParams::greedy() }
        } else {
            SamplingParams {
                temperature: self.temperature,
                top_k: 0,
                top_p: self.top_p,
                min_p: 0.0,
                seed: self.seed,
                ..SamplingParams::default()
            }
        }
    }
}

/// A teacher's answer to one job.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub text: String,
    pub prompt_tokens: u64,
    /// Prompt tokens served from a prefix cache (local teacher, or a server
    /// that reports `prompt_tokens_details.cached_tokens`).
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `stop` or `length`.
    pub finish_reason: String,
    pub logprobs: Option<TeacherLogprobs>,
    /// Submit → last token, as the teacher measured it (local) or as the
    /// client saw it (remote, including retries).
    pub secs: f64,
}

/// Something that answers conversations.
pub trait Teacher {
    /// Who answers: a GGUF path or `URL (model)`, for provenance.
    fn describe(&self) -> String;

    /// Answers every job; calls `on_answer` on the calling thread as each
    /// completes, in completion order. A job that fails alone (a prompt too
    /// long for the context, a request refused after all retries) gets
    /// `Err(message)` and the rest go on; an error returned by `on_answer`
    /// (or a failure that dooms every job, such as a wrong API key) stops
    /// the batch and is returned.
    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &GenSettings,
        on_answer: &mut dyn FnMut(usize, Result<Answer, String>) -> Result<()>,
    ) -> Result<()>;
}

// ---------------------------------------------------------------------------
// Local: minnow's engine.

/// A GGUF model served by the continuous-batching scheduler.
pub struct LocalModel {
    name: String,
    scheduler: Scheduler,
    vocab: String,
}

impl LocalModel {
    /// Loads `path` and starts a scheduler decoding up to `parallel`
    /// sequences together, each with a context of `ctx` tokens.
    pub fn load(path: &Path, threads: usize, parallel: usize, ctx: usize) -> Result<LocalModel> {
        let model = Arc::new(LoadedModel::load(path)?);
        Ok(Self::start(path.display().to_string(), model, ThreadPool::new(threads.max(1)), parallel, ctx))
    }

    pub fn start(name: String, model: Arc<LoadedModel>, pool: ThreadPool, parallel: usize, ctx: usize) -> LocalModel {
        let vocab = vocab_fingerprint(&model.tokenizer);
        let cfg = SchedulerConfig {
            max_parallel: parallel.max(1),
            ctx,
            // The window below never has more than 2 × parallel submitted.
            max_queue: 2 * parallel.max(1),
            ..SchedulerConfig::default()
        };
        LocalModel { name, scheduler: Scheduler::start(model, pool, cfg), vocab }
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        self.scheduler.model()
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The vocabulary fingerprint stored with log-probabilities.
    pub fn vocab(&self) -> &str {
        &self.vocab
    }
}

/// An answer being assembled from scheduler events.
#[derive(Default)]
struct Partial {
    text: String,
    ids: Vec<u32>,
    top: Vec<Vec<(u32, f32)>>,
    finish: String,
}

impl Teacher for LocalModel {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &GenSettings,
        on_answer: &mut dyn FnMut(usize, Result<Answer, String>) -> Result<()>,
    ) -> Result<()> {
        let constraint = match &settings.json_schema {
            Some(schema) => Some(
                self.scheduler
                    .model()
                    .compile_constraint(&ConstraintSpec::JsonSchema(schema.clone()))
                    .map_err(|e| anyhow::anyhow!("the JSON Schema does not compile: {e}"))?,
            ),
            None => None,
        };
        let params = GenerateParams {
            max_tokens: settings.max_tokens,
            sampling: settings.sampling(),
            stop: Vec::new(),
            stop_at_eog: true,
            constraint,
            logit_bias: Vec::new(),
            adapter: None,
        };
        let (tx, rx) = mpsc::channel::<(usize, GenEvent)>();
        // Keep the scheduler's slots full plus one wave waiting, not the whole
        // batch queued: a caller that stops early leaves little to cancel.
        let window = 2 * self.scheduler.config().max_parallel;
        let mut pending: VecDeque<Job> = jobs.into();
        let mut partial: HashMap<usize, Partial> = HashMap::new();
        let mut ids: HashMap<usize, u64> = HashMap::new();
        let cancel_all = |ids: &HashMap<usize, u64>| {
            for id in ids.values() {
                self.scheduler.cancel(*id);
            }
        };
        // The first job runs alone until its prompt is read: it then sits in
        // the prefix cache, and every later prompt sharing its start (a
        // system prompt, worked examples) resumes from it instead of
        // recomputing it. Submitted all at once, none would benefit.
        let mut first: Option<usize> = None;
        let mut started = false;
        while !pending.is_empty() || !partial.is_empty() {
            while partial.len() < window && first.is_none() {
                let Some(job) = pending.pop_front() else { break };
                let prompt = match self.model().chat_prompt(&job.messages) {
                    Ok(p) => p,
                    Err(e) => {
                        on_answer(job.index, Err(format!("cannot build the prompt: {e}")))?;
                        continue;
                    }
                };
                let req = GenRequest { prompt, params: params.clone(), n: 1, top_logprobs: settings.logprobs };
                let tx = tx.clone();
                let index = job.index;
                let sink = Box::new(move |ev: GenEvent| tx.send((index, ev)).is_ok());
                match self.scheduler.submit(req, sink) {
                    Ok(id) => {
                        partial.insert(index, Partial::default());
                        ids.insert(index, id);
                        if !started {
                            started = true;
                            first = Some(index);
                        }
                    }
                    Err(SubmitError::QueueFull { .. }) => {
                        pending.push_front(job);
                        break;
                    }
                    Err(e @ (SubmitError::ContextOverflow { .. } | SubmitError::Invalid(_))) => {
                        if let Err(e) = on_answer(index, Err(e.to_string())) {
                            cancel_all(&ids);
                            return Err(e);
                        }
                    }
                    Err(SubmitError::ShuttingDown) => bail!("the model's scheduler stopped"),
                }
            }
            if partial.is_empty() {
                continue;
            }
            let (index, ev) = rx.recv().map_err(|_| anyhow!("the model's scheduler stopped"))?;
            if first == Some(index) {
                first = None;
            }
            let result = match ev {
                GenEvent::Token { text, id, logprob, .. } => {
                    let p = partial.get_mut(&index).expect("events come for submitted jobs");
                    p.text.push_str(&text);
                    p.ids.push(id);
                    if let Some(lp) = logprob {
                        p.top.push(lp.top);
                    }
                    None
                }
                GenEvent::Done { finish, text_tail, .. } => {
                    let p = partial.get_mut(&index).expect("events come for submitted jobs");
                    p.text.push_str(&text_tail);
                    p.finish = finish.as_str().to_string();
                    None
                }
                GenEvent::Finished { usage, total_secs, .. } => {
                    let p = partial.remove(&index).expect("events come for submitted jobs");
                    ids.remove(&index);
                    let logprobs = settings.logprobs.map(|_| TeacherLogprobs {
                        vocab: Some(self.vocab.clone()),
                        tokens: p.ids.clone(),
                        top: p.top,
                    });
                    Some(Ok(Answer {
                        text: p.text,
                        prompt_tokens: usage.prompt_tokens as u64,
                        cached_prompt_tokens: usage.cached_prompt_tokens as u64,
                        completion_tokens: usage.completion_tokens as u64,
                        finish_reason: p.finish,
                        logprobs,
                        secs: total_secs,
                    }))
                }
                GenEvent::Error(e) | GenEvent::Cancelled(e) => {
                    partial.remove(&index);
                    ids.remove(&index);
                    Some(Err(e))
                }
            };
            if let Some(r) = result {
                if let Err(e) = on_answer(index, r) {
                    cancel_all(&ids);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Remote: an OpenAI-compatible endpoint.

/// Token bytes → id, for turning a remote teacher's logprob tokens (which
/// come as text and bytes) back into ids of a known vocabulary.
#[derive(Clone)]
pub struct VocabMap {
    ids: HashMap<Vec<u8>, u32>,
    fingerprint: String,
}

impl VocabMap {
    /// From the teacher's own tokenizer (its GGUF). When several ids share
    /// the same bytes, the lowest id wins.
    pub fn from_tokenizer(t: &Tokenizer) -> VocabMap {
        let mut ids = HashMap::new();
        for id in (0..t.vocab_size() as u32).rev() {
            ids.insert(t.token_bytes(id), id);
        }
        VocabMap { ids, fingerprint: vocab_fingerprint(t) }
    }

    fn id(&self, bytes: &[u8]) -> Option<u32> {
        self.ids.get(bytes).copied()
    }
}

/// How to talk to a remote teacher.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// A server root (`http://host:port`), its `/v1`, or the full
    /// `/v1/chat/completions` URL.
    pub url: String,
    /// The `model` field sent; servers with one model ignore it.
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Whole-request timeout (connect to last byte).
    pub timeout: Duration,
    /// Retries after the first attempt, for 429, 5xx and connection errors.
    pub max_retries: u32,
    /// First backoff; doubled after each failed attempt, capped at `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Requests started per minute at most (`None`: no limit).
    pub requests_per_minute: Option<f64>,
}

impl RemoteConfig {
    /// How long to wait after failed attempt number `attempt` (0 for the
    /// first): the server's `Retry-After` when it gave one (a server knows
    /// its own load; our backoff is a guess), else `backoff` doubled per
    /// earlier failure; capped at `max_backoff` either way.
    pub fn wait_after(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff.saturating_mul(1 << attempt.min(16)).min(self.max_backoff);
        retry_after.map_or(backoff, |a| a.min(self.max_backoff))
    }

    pub fn new(url: &str) -> RemoteConfig {
        RemoteConfig {
            url: url.to_string(),
            model: None,
            api_key: None,
            concurrency: 4,
            timeout: Duration::from_secs(300),
            max_retries: 6,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            requests_per_minute: None,
        }
    }
}

/// Counters a caller (or a test) can read after a batch.
#[derive(Debug, Default, Clone)]
pub struct RemoteStats {
    pub requests: u64,
    pub retries: u64,
    /// Responses by status code that were retried (429, 5xx).
    pub retried_statuses: HashMap<u16, u64>,
    pub connection_errors: u64,
}

pub struct RemoteTeacher {
    cfg: RemoteConfig,
    endpoint: String,
    agent: ureq::Agent,
    vocab: Option<VocabMap>,
    limiter: RateLimiter,
    stats: Mutex<RemoteStats>,
}

/// Spaces request starts at least `interval` apart, across threads.
struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(per_minute: Option<f64>) -> RateLimiter {
        let interval = per_minute.map(|r| Duration::from_secs_f64(60.0 / r));
        RateLimiter { interval, next: Mutex::new(Instant::now()) }
    }

    /// Blocks until this caller may start a request.
    fn wait(&self) {
        let Some(interval) = self.interval else { return };
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        let now = Instant::now();
        if slot > now {
            std::thread::sleep(slot - now);
        }
    }
}

/// Why one attempt failed.
pub(crate) enum Failure {
    /// Worth another try after `after` (a `Retry-After`) or the backoff.
    Retry { why: String, after: Option<Duration>, status: Option<u16> },
    /// This job cannot succeed (a 400, an unparsable answer).
    Job(String),
    /// No job can succeed (401, 403, 404): stop the batch.
    Fatal(String),
}

impl RemoteTeacher {
    /// `vocab`: the teacher's tokenizer, needed only for `--logprobs`
    /// (OpenAI logprobs name tokens by text; ids need the vocabulary).
    pub fn new(cfg: RemoteConfig, vocab: Option<VocabMap>) -> Result<RemoteTeacher> {
        if cfg.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if let Some(r) = cfg.requests_per_minute {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rpm must be a positive number of requests per minute");
            }
        }
        let endpoint = chat_endpoint(&cfg.url)?;
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(cfg.timeout)).build().into();
        let limiter = RateLimiter::new(cfg.requests_per_minute);
        Ok(RemoteTeacher { cfg, endpoint, agent, vocab, limiter, stats: Mutex::new(RemoteStats::default()) })
    }

    pub fn stats(&self) -> RemoteStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn body(&self, messages: &[ChatMessage], s: &GenSettings) -> Value {
        // Without --teacher-model the field is left out: the server's default
        // model answers (minnow serve and vLLM take an absent `model` so; a
        // made-up name would be a 404 `model_not_found` there).
        let mut b = json!({
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        });
        if let Some(m) = &self.cfg.model {
            b["model"] = json!(m);
        }
        if let Some(k) = s.logprobs {
            b["logprobs"] = json!(true);
            b["top_logprobs"] = json!(k);
        }
        if let Some(schema) = &s.json_schema {
            b["response_format"] =
                json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}});
        }
        b
    }

    /// One attempt at one job (after the rate limit), no retry: what a
    /// fleet ([`crate::fleet`]) hands each endpoint.
    pub(crate) fn try_once(&self, messages: &[ChatMessage], s: &GenSettings) -> Result<Answer, Failure> {
        let body = self.body(messages, s);
        let t0 = Instant::now();
        self.limiter.wait();
        self.count(|st| st.requests += 1);
        let v = self.attempt(&body)?;
        self.parse_answer(&v, s).map(|mut a| {
            a.secs = t0.elapsed().as_secs_f64();
            a
        })
    }

    pub(crate) fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// One job, with retries.
    fn answer_one(&self, messages: &[ChatMessage], s: &GenSettings) -> Result<Answer, Failure> {
        let body = self.body(messages, s);
        let t0 = Instant::now();
        let mut attempt = 0u32;
        loop {
            self.limiter.wait();
            self.count(|st| st.requests += 1);
            let failure = match self.attempt(&body) {
                Ok(v) => {
                    return self.parse_answer(&v, s).map(|mut a| {
                        a.secs = t0.elapsed().as_secs_f64();
                        a
                    })
                }
                Err(f) => f,
            };
            let Failure::Retry { why, after, status } = failure else { return Err(failure) };
            if attempt >= self.cfg.max_retries {
                return Err(Failure::Job(format!("{why} (gave up after {} attempts)", attempt + 1)));
            }
            self.count(|st| {
                st.retries += 1;
                match status {
                    Some(code) => *st.retried_statuses.entry(code).or_default() += 1,
                    None => st.connection_errors += 1,
                }
            });
            std::thread::sleep(self.cfg.wait_after(attempt, after));
            attempt += 1;
        }
    }

    fn count(&self, f: impl FnOnce(&mut RemoteStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn attempt(&self, body: &Value) -> Result<Value, Failure> {
        let mut req = self.agent.post(&self.endpoint).header("Content-Type", "application/json");
        if let Some(k) = &self.cfg.api_key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = match req.send(body.to_string()) {
            Ok(r) => r,
            Err(e) => return Err(Failure::Retry { why: format!("{}: {e}", self.endpoint), after: None, status: None }),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = match resp.body_mut().with_config().limit(64 << 20).read_to_string() {
            Ok(t) => t,
            Err(e) => {
                return Err(Failure::Retry {
                    why: format!("{}: reading the answer: {e}", self.endpoint),
                    after: None,
                    status: None,
                })
            }
        };
        let detail = || {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            format!("{} answered {status}: {msg}", self.endpoint)
        };
        match status {
            200..=299 => serde_json::from_str(&text).map_err(|e| Failure::Retry {
                why: format!("{}: answer is not JSON: {e}", self.endpoint),
                after: None,
                status: None,
            }),
            429 | 500..=599 => Err(Failure::Retry { why: detail(), after: retry_after, status: Some(status) }),
            401 | 403 => Err(Failure::Fatal(format!("{}; check --api-key (or OPENAI_API_KEY)", detail()))),
            404 => Err(Failure::Fatal(format!(
                "{}; check --teacher-url (a server root, its /v1, or /v1/chat/completions)",
                detail()
            ))),
            _ => Err(Failure::Job(detail())),
        }
    }

    fn parse_answer(&self, v: &Value, s: &GenSettings) -> Result<Answer, Failure> {
        let bad = |what: &str| Failure::Job(format!("{}: unexpected answer: {what}", self.endpoint));
        let choice = &v["choices"][0];
        let text = choice["message"]["content"].as_str().ok_or_else(|| bad("no choices[0].message.content"))?;
        let usage = &v["usage"];
        let logprobs = match s.logprobs {
            None => None,
            Some(_) => Some(self.parse_logprobs(&choice["logprobs"]["content"]).map_err(|e| bad(&e))?),
        };
        Ok(Answer {
            text: text.to_string(),
            prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
            cached_prompt_tokens: usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
            completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
            finish_reason: choice["finish_reason"].as_str().unwrap_or("stop").to_string(),
            logprobs,
            secs: 0.0,
        })
    }

    /// OpenAI chat logprobs → ids through the teacher's vocabulary.
    fn parse_logprobs(&self, content: &Value) -> Result<TeacherLogprobs, String> {
        let vocab = self.vocab.as_ref().ok_or("logprobs need the teacher's vocabulary")?;
        let entries = content.as_array().ok_or("no choices[0].logprobs.content")?;
        let id_of = |e: &Value| -> Result<(u32, f32), String> {
            let bytes: Vec<u8> = match e["bytes"].as_array() {
                Some(b) => b.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect(),
                None => e["token"].as_str().ok_or("a logprob entry without token")?.as_bytes().to_vec(),
            };
            let id = vocab.id(&bytes).ok_or_else(|| {
                format!(
                    "token {:?} is not in the vocabulary given with --teacher-vocab",
                    String::from_utf8_lossy(&bytes)
                )
            })?;
            Ok((id, e["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32))
        };
        let mut tokens = Vec::with_capacity(entries.len());
        let mut top = Vec::with_capacity(entries.len());
        for e in entries {
            tokens.push(id_of(e)?.0);
            let alts = e["top_logprobs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            top.push(alts.iter().map(id_of).collect::<Result<Vec<_>, _>>()?);
        }
        Ok(TeacherLogprobs { vocab: Some(vocab.fingerprint.clone()), tokens, top })
    }
}

/// The chat completions URL for what the user gave.
fn chat_endpoint(url: &str) -> Result<String> {
    let u = url.trim().trim_end_matches('/');
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        bail!("--teacher-url {url:?} must start with http:// or https://");
    }
    Ok(if u.ends_with("/chat/completions") {
        u.to_string()
    } else if u.ends_with("/v1") {
        format!("{u}/chat/completions")
    } else {
        format!("{u}/v1/chat/completions")
    })
}

impl Teacher for RemoteTeacher {
    fn describe(&self) -> String {
        match &self.cfg.model {
            Some(m) => format!("{} ({m})", self.endpoint),
            None => self.endpoint.clone(),
        }
    }

    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &GenSettings,
        on_answer: &mut dyn FnMut(usize, Result<Answer, String>) -> Result<()>,
    ) -> Result<()> {
        if settings.logprobs.is_some() && self.vocab.is_none() {
            bail!(
                "--logprobs with --teacher-url needs --teacher-vocab GGUF (the teacher's tokenizer) to store token ids"
            );
        }
        let queue = Mutex::new(VecDeque::from(jobs));
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<(usize, Result<Answer, Failure>)>();
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..self.cfg.concurrency {
                let (tx, queue, stop) = (tx.clone(), &queue, &stop);
                scope.spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let Some(job) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else { break };
                        let r = self.answer_one(&job.messages, settings);
                        if tx.send((job.index, r)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            deliver(&rx, &stop, on_answer, "the teacher refused the request")
        })
    }
}

/// Hands workers' results to `on_answer` in arrival order until the
/// workers are done. The first error (from `on_answer`, or a refusal that
/// dooms every job, reported after `fatal`) sets `stop` and is returned
/// once the workers have finished their requests in flight (the caller's
/// thread scope joins them: at most one timeout).
pub(crate) fn deliver(
    rx: &mpsc::Receiver<(usize, Result<Answer, Failure>)>,
    stop: &AtomicBool,
    on_answer: &mut dyn FnMut(usize, Result<Answer, String>) -> Result<()>,
    fatal: &str,
) -> Result<()> {
    let mut outcome = Ok(());
    for (index, r) in rx.iter() {
        if outcome.is_err() {
            continue;
        }
        let r = match r {
            Ok(a) => on_answer(index, Ok(a)),
            Err(Failure::Job(e)) | Err(Failure::Retry { why: e, .. }) => on_answer(index, Err(e)),
            Err(Failure::Fatal(e)) => Err(anyhow!("{fatal}: {e}")),
        };
        if let Err(e) = r {
            stop.store(true, Ordering::SeqCst);
            outcome = Err(e);
        }
    }
    outcome
}
