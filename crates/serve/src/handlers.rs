//! The endpoint handlers: read and check the body, tokenize off the async
//! threads, submit to the scheduler, and answer in OpenAI's shapes.

use crate::error::ApiError;
use crate::params::{self, GenOptions, PromptInput};
use crate::render::{Choice, Endpoint, Shape};
use crate::sse::{CancelGuard, SseBody};
use crate::{json_response, unix_now, AppState, RequestLog};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use minnow_engine::generate::GenerateParams;
use minnow_engine::lora::LoraAdapter;
use minnow_engine::scheduler::{GenEvent, GenRequest, SubmitError, Usage};
use serde_json::{json, Map, Value};
use std::pin::Pin;
use std::sync::Arc;

type Result<T> = std::result::Result<T, ApiError>;

/// The body, up to the limit: refused before reading when `Content-Length`
/// already says it is too large, else counted as it arrives (chunked
/// bodies). A body that stalls for the header timeout gets a 408.
async fn read_body(state: &AppState, headers: &HeaderMap, mut body: Body) -> Result<Vec<u8>> {
    let limit = state.opts.max_body_bytes;
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let mut buf = Vec::new();
    let stall = state.opts.limits.header_timeout;
    loop {
        let next = std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx));
        let Ok(frame) = tokio::time::timeout(stall, next).await else {
            return Err(ApiError::timeout(format!(
                "the request body stalled: nothing arrived for {:.0} s",
                stall.as_secs_f64()
            )));
        };
        match frame {
            None => return Ok(buf),
            Some(Err(e)) => return Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    if buf.len() + d.len() > limit {
                        return Err(ApiError::too_large(limit));
                    }
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

pub(crate) async fn read_object(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Map<String, Value>> {
    let bytes = read_body(state, headers, body).await?;
    params::parse_body(&bytes)
}

/// Runs CPU work (tokenizing, template rendering) on the blocking pool so a
/// megabyte prompt does not stall the connections sharing an async thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))
}

fn refuse_if_shutting_down(state: &AppState) -> Result<()> {
    if state.is_shutting_down() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    Ok(())
}

/// OpenAI's 404 for a model name this server does not serve, listing the
/// names it does.
fn model_not_found(state: &AppState, name: &str) -> ApiError {
    let mut names = vec![format!("`{}`", state.opts.model_id)];
    names.extend(state.opts.aliases.iter().map(|a| format!("`{a}`")));
    names.extend(state.opts.adapters.iter().map(|a| format!("`{}` (an adapter)", a.name)));
    ApiError::not_found(format!("The model `{name}` does not exist on this server; it serves {}", names.join(", ")))
        .with_code("model_not_found")
}

/// `model` must name what this server serves (its id, an alias or an
/// adapter); absent or null means the base model. Returns the adapter it
/// picks, if any.
fn check_model(state: &AppState, obj: &Map<String, Value>) -> Result<Option<Arc<LoraAdapter>>> {
    match params::opt_str(obj, "model")? {
        None => Ok(None),
        Some(name) => state.resolve(name).ok_or_else(|| model_not_found(state, name).with_param("model")),
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(log): Extension<Arc<RequestLog>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        refuse_if_shutting_down(&state)?;
        let obj = read_object(&state, &headers, body).await?;
        let req = params::parse_chat(&obj)?;
        let adapter = check_model(&state, &obj)?;
        let recording = crate::store::recording_for(&state, &obj, req.opts.n)?;
        let mut opts = req.opts;
        // `tool_choice: "none"`: the tools are not offered at all.
        let offered = req.tools.filter(|t| t.choice != params::ToolChoice::None);
        if let Some(t) = &offered {
            let spec = minnow_engine::tools::choice_constraint(&t.tools, &t.choice, t.parallel)
                .map_err(|e| ApiError::invalid("tools", e).with_code("invalid_value"))?;
            opts.constraint = spec.map(|s| (s, "tools"));
        }
        let format = offered.as_ref().and_then(|t| t.choice.reply_format());
        let tools = offered.map(|t| t.tools);
        let model = state.model().clone();
        let messages = req.messages;
        let prompt = blocking(move || model.chat_prompt_with_tools(&messages, tools.as_deref()))
            .await?
            .map_err(|e| ApiError::invalid("messages", format!("the chat template failed on these messages: {e:#}")))?;
        generate(&state, &log, Endpoint::Chat, prompt, opts, format, adapter, recording).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(log): Extension<Arc<RequestLog>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        refuse_if_shutting_down(&state)?;
        let obj = read_object(&state, &headers, body).await?;
        let req = params::parse_completion(&obj)?;
        let adapter = check_model(&state, &obj)?;
        if params::opt_bool(&obj, "store")? == Some(true) {
            return Err(ApiError::invalid(
                "store",
                "stored completions are chat completions: send `store` to /v1/chat/completions",
            ));
        }
        let prompt = match req.prompt {
            PromptInput::Tokens(ids) => {
                check_ids(&state, &ids, "prompt")?;
                ids
            }
            PromptInput::Text(text) => {
                let model = state.model().clone();
                // As llama-server does: BOS per the model's metadata, and
                // special-token text (`<|im_start|>`) parsed, so a prompt
                // formatted by hand means what it says.
                blocking(move || model.tokenizer.encode(&text, true, true))
                    .await?
                    .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}")))?
            }
        };
        generate(&state, &log, Endpoint::Completion, prompt, req.opts, None, adapter, None).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

fn check_ids(state: &AppState, ids: &[u32], param: &str) -> Result<()> {
    let vocab = state.model().tokenizer.vocab_size();
    match ids.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(ApiError::invalid(
            format!("{param}[{i}]"),
            format!("token id {} is outside the vocabulary of {vocab} tokens", ids[i]),
        )
        .with_code("invalid_value")),
        None => Ok(()),
    }
}

/// 400 `context_length_exceeded`, with both numbers, in OpenAI's wording.
fn context_overflow(endpoint: Endpoint, prompt: usize, max_tokens: usize, ctx: usize) -> ApiError {
    let (param, what) = match endpoint {
        Endpoint::Chat => ("messages", "messages"),
        Endpoint::Completion => ("prompt", "prompt"),
    };
    ApiError::invalid(
        param,
        format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the {what}, {max_tokens} in the completion). Please reduce the length of the {what} or the completion (max_tokens).",
            prompt.saturating_add(max_tokens)
        ),
    )
    .with_code("context_length_exceeded")
}

/// Submits and answers: an SSE stream or one JSON object. `tools`: the
/// form calls take in the reply, when tools were offered; `adapter`: the
/// LoRA adapter the request runs with; `recording`: what `--store` keeps of
/// it, written before the answer is complete for the client.
#[allow(clippy::too_many_arguments)]
async fn generate(
    state: &Arc<AppState>,
    log: &Arc<RequestLog>,
    endpoint: Endpoint,
    prompt: Vec<u32>,
    opts: GenOptions,
    tools: Option<minnow_engine::tools::ReplyFormat>,
    adapter: Option<Arc<LoraAdapter>>,
    recording: Option<crate::store::Recording>,
) -> Result<Response> {
    let param = if endpoint == Endpoint::Chat { "messages" } else { "prompt" };
    if prompt.is_empty() {
        return Err(ApiError::invalid(param, "the prompt has no tokens: nothing to continue from"));
    }
    let max_n = state.scheduler.config().max_parallel;
    if opts.n > max_n {
        // Each choice is a sequence in the batch: more than the slots cannot run.
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be at most {max_n} on this server (its --parallel), got {}", opts.n),
        )
        .with_code("invalid_value"));
    }
    let ctx = state.scheduler.config().ctx;
    let max_tokens = opts.max_tokens.unwrap_or_else(|| ctx.saturating_sub(prompt.len()).max(1));
    if prompt.len().saturating_add(max_tokens) > ctx {
        return Err(context_overflow(endpoint, prompt.len(), max_tokens, ctx));
    }
    log.update(|d| {
        d.prompt_tokens = Some(prompt.len());
        d.streaming = opts.stream;
    });
    let vocab = state.model().tokenizer.vocab_size();
    if let Some(&(id, _)) = opts.logit_bias.iter().find(|&&(id, _)| id as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("logit_bias.{id}"),
            format!("token id {id} is outside the vocabulary of {vocab} tokens"),
        )
        .with_code("invalid_value"));
    }
    let constraint =
        match opts.constraint.clone() {
            None => None,
            Some((spec, param)) => {
                let model = state.model().clone();
                // Compiling a schema or grammar is CPU work (bounded by
                // llguidance's limits): off the async threads.
                let compiled = blocking(move || model.compile_constraint(&spec)).await?;
                Some(compiled.map_err(|e| {
                    ApiError::invalid(param, format!("invalid {param}: {e}")).with_code("invalid_value")
                })?)
            }
        };
    let req = GenRequest {
        prompt,
        params: GenerateParams {
            max_tokens,
            sampling: opts.sampling.clone(),
            stop: opts.stop.clone(),
            stop_at_eog: !opts.ignore_eos,
            constraint,
            logit_bias: opts.logit_bias.clone(),
            adapter: adapter.clone(),
        },
        n: opts.n,
        // The store may want more alternatives than the client asked for.
        top_logprobs: match (opts.logprobs, recording.as_ref().map_or(0, |r| r.top_k())) {
            (k, 0) => k,
            (k, store_k) => Some(k.unwrap_or(0).max(store_k)),
        },
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Runs on the scheduler thread: an unbounded send never blocks, and it
    // fails exactly when the receiver (the response) is gone.
    let sink = Box::new(move |ev: GenEvent| tx.send(ev).is_ok());
    let id = state.scheduler.submit(req, sink).map_err(|e| match e {
        SubmitError::QueueFull { retry_after_secs } => ApiError::queue_full(retry_after_secs),
        SubmitError::ContextOverflow { prompt_tokens, max_tokens, ctx } => {
            context_overflow(endpoint, prompt_tokens, max_tokens, ctx)
        }
        SubmitError::Invalid(msg) => ApiError::bad_request(msg),
        SubmitError::ShuttingDown => ApiError::unavailable("the server is shutting down"),
    })?;
    let guard = CancelGuard { scheduler: state.scheduler.clone(), id, finished: false };
    let kind = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let shape = Shape {
        endpoint,
        id: format!("{kind}-{}-{}", state.id_prefix, log.id),
        created: unix_now(),
        // The name the request used for an adapter, as vLLM answers.
        model: adapter.as_ref().map_or_else(|| state.opts.model_id.clone(), |a| a.name.clone()),
        logprobs: opts.logprobs,
        include_usage: opts.include_usage,
        tools,
    };
    if opts.stream {
        let body = SseBody::new(rx, shape, state.clone(), guard, log.clone(), opts.n, recording);
        let mut r = Response::new(Body::new(body));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Reverse proxies (nginx) would otherwise buffer the stream.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return Ok(r);
    }
    collect(state, log, rx, guard, shape, opts.n, recording).await
}

/// Waits for the whole generation. If the client leaves meanwhile, this
/// future is dropped, and with it the receiver and the guard: cancelled.
async fn collect(
    state: &Arc<AppState>,
    log: &Arc<RequestLog>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    mut guard: CancelGuard,
    shape: Shape,
    n: usize,
    mut recording: Option<crate::store::Recording>,
) -> Result<Response> {
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut usage: Option<Usage> = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { index, id, text, logprob } => {
                if let Some(r) = &mut recording {
                    r.token(index, id, logprob.as_ref());
                }
                if let Some(c) = choices.get_mut(index) {
                    c.push_token(&text, logprob.as_ref(), shape.logprobs);
                }
            }
            GenEvent::Done { index, finish, text_tail } => {
                if let Some(c) = choices.get_mut(index) {
                    c.end(finish, &text_tail);
                }
            }
            GenEvent::Finished { usage: u, ttft_secs, total_secs } => {
                guard.finished = true;
                state.metrics.observe_generation(&shape.model, &u, ttft_secs, total_secs, n);
                log.update(|d| {
                    d.prompt_tokens = Some(u.prompt_tokens);
                    d.cached_tokens = u.cached_prompt_tokens;
                    d.completion_tokens = u.completion_tokens;
                    d.ttft_secs = Some(ttft_secs);
                });
                usage = Some(u);
                break;
            }
            GenEvent::Error(msg) => {
                guard.finished = true;
                return Err(ApiError::internal(format!("generation failed: {msg}")));
            }
            GenEvent::Cancelled(msg) => {
                guard.finished = true;
                return Err(ApiError::unavailable(msg));
            }
        }
    }
    let Some(usage) = usage else {
        guard.finished = true;
        return Err(ApiError::unavailable(minnow_engine::scheduler::SHUTDOWN_CANCEL_MESSAGE));
    };
    let response = shape.full(&state.model().tokenizer, &choices, &usage);
    if let Some(r) = recording {
        // Durable before the client has its answer.
        crate::store::save(state.clone(), r.into_record(state, &shape, response.clone())).await;
    }
    Ok(json_response(&response))
}

fn model_object(state: &AppState) -> Value {
    let cfg = state.model().model.config();
    json!({
        "id": state.opts.model_id,
        "object": "model",
        "created": state.started_unix,
        "owned_by": "minnow",
        "meta": {
            "architecture": cfg.arch.name(),
            "n_ctx_train": cfg.context_length,
            "n_ctx": state.scheduler.config().ctx,
            "n_vocab": cfg.vocab_size,
            "parallel": state.scheduler.config().max_parallel,
            "aliases": state.opts.aliases,
        },
    })
}

/// An adapter's `/v1/models` entry: its name, and the base it runs on
/// (`parent`, vLLM's field).
fn adapter_object(state: &AppState, a: &LoraAdapter) -> Value {
    json!({
        "id": a.name,
        "object": "model",
        "created": state.started_unix,
        "owned_by": "minnow",
        "parent": state.opts.model_id,
        "meta": {"adapter": "lora", "rank": a.rank, "alpha": a.alpha, "scale": a.scale},
    })
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let mut data = vec![model_object(&state)];
    data.extend(state.opts.adapters.iter().map(|a| adapter_object(&state, a)));
    json_response(&json!({"object": "list", "data": data}))
}

pub async fn model_by_id(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.resolve(&id) {
        Some(None) => json_response(&model_object(&state)),
        Some(Some(a)) => json_response(&adapter_object(&state, &a)),
        None => model_not_found(&state, &id).into_response(),
    }
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let s = state.scheduler.stats();
    let (status, code) = if state.is_shutting_down() {
        ("shutting_down", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ok", StatusCode::OK)
    };
    let body = json!({"status": status, "active": s.active, "queue_depth": s.queue_depth});
    (code, json_response(&body)).into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.scheduler.stats(), state.opts.price_per_hour);
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// `{content|prompt, add_special = false, parse_special = true, with_pieces = false}` → `{tokens}`
/// (llama-server's defaults; with `with_pieces`, `[{id, piece}]`).
pub async fn tokenize(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r: Result<Response> = async {
        let obj = read_object(&state, &headers, body).await?;
        let (param, text) = match (obj.get("content"), obj.get("prompt")) {
            (Some(Value::String(s)), _) => ("content", s.clone()),
            (Some(v), _) if !v.is_null() => {
                return Err(ApiError::invalid(
                    "content",
                    format!("`content` must be a string, not {}", params::type_name(v)),
                ))
            }
            (_, Some(Value::String(s))) => ("prompt", s.clone()),
            (_, Some(v)) if !v.is_null() => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("`prompt` must be a string, not {}", params::type_name(v)),
                ))
            }
            _ => return Err(ApiError::invalid("content", "`content` is required").with_code("missing_parameter")),
        };
        let add_special = params::opt_bool(&obj, "add_special")?.unwrap_or(false);
        let parse_special = params::opt_bool(&obj, "parse_special")?.unwrap_or(true);
        let with_pieces = params::opt_bool(&obj, "with_pieces")?.unwrap_or(false);
        let model = state.model().clone();
        let ids = blocking(move || model.tokenizer.encode(&text, add_special, parse_special))
            .await?
            .map_err(|e| ApiError::invalid(param, format!("cannot tokenize: {e}")))?;
        let tokens: Vec<Value> = if with_pieces {
            let tok = &state.model().tokenizer;
            ids.iter().map(|&id| json!({"id": id, "piece": String::from_utf8_lossy(&tok.token_bytes(id))})).collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        Ok(json_response(&json!({"tokens": tokens})))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `{tokens: [ids]}` → `{content}`.
pub async fn detokenize(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r: Result<Response> = async {
        let obj = read_object(&state, &headers, body).await?;
        let ids = match obj.get("tokens") {
            Some(Value::Array(a)) => params::token_ids(a, "tokens")?,
            None | Some(Value::Null) => {
                return Err(ApiError::invalid("tokens", "`tokens` is required").with_code("missing_parameter"))
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    "tokens",
                    format!("`tokens` must be an array of token ids, not {}", params::type_name(v)),
                ))
            }
        };
        check_ids(&state, &ids, "tokens")?;
        let model = state.model().clone();
        let content = blocking(move || model.tokenizer.decode(&ids)).await?;
        Ok(json_response(&json!({"content": content})))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

const INDEX_HTML: &str = include_str!("web/index.html");

pub async fn index() -> Response {
    let mut r = Response::new(Body::from(INDEX_HTML));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}
