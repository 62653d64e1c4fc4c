//! Request bodies, checked field by field.
//!
//! Bodies are parsed as `serde_json::Value` rather than into derived structs
//! so that every rejection can name the parameter at fault (OpenAI's `param`)
//! and say what was expected. Unknown fields are ignored, as OpenAI's clients
//! expect; `null` means absent for every optional field.
//!
//! # Parameters and defaults
//! | parameter | type, range | default |
//! |---|---|---|
//! | `max_tokens` / `max_completion_tokens` | integer ≥ 1 | the rest of the context (see below) |
//! | `temperature` | number in [0, 2] | 1 (OpenAI's) |
//! | `top_p` | number in [0, 1]; 0 keeps only the top token | 1 |
//! | `top_k` (extension) | integer ≥ 0, 0 = off | 0 |
//! | `min_p` (extension) | number in [0, 1] | 0 |
//! | `repeat_penalty` (extension) | number in (0, 10] | 1 (off) |
//! | `repeat_last_n` (extension) | integer ≥ -1 (-1 = whole context) | 64 |
//! | `presence_penalty`, `frequency_penalty` | number in [-2, 2] | 0 |
//! | `seed` | integer (64-bit, signed or not) | random per request |
//! | `stop` | string or array of at most 16 strings | none |
//! | `n` | integer in [1, 16] | 1 |
//! | `logprobs` | chat: boolean; completions: integer in [0, 20] | off |
//! | `top_logprobs` (chat) | integer in [0, 20], needs `logprobs: true` | 0 |
//! | `stream` | boolean | false |
//! | `stream_options.include_usage` | boolean | false |
//! | `ignore_eos` (extension) | boolean: keep going past end-of-generation tokens | false |
//!
//! **Default `max_tokens`**: all of the context the prompt leaves
//! (`ctx - prompt_tokens`), which is OpenAI's rule (a request without a limit
//! is bounded only by the context window) and means a request without
//! `max_tokens` never fails the context check unless its prompt alone fills
//! the context. The defaults of the sampling knobs are OpenAI's (plain
//! temperature-1 sampling), not llama.cpp's CLI defaults: a client written
//! for OpenAI gets the distribution it asked for.
//!
//! Structured outputs: `response_format` (`text`, `json_object`,
//! `json_schema` with `json_schema.schema`) as OpenAI shapes it, and vLLM's
//! `structured_outputs` (`{"json" | "regex" | "choice" | "grammar": …}`),
//! one of the two per request; `logit_bias` as OpenAI's (token id strings →
//! −100..=100). The handlers compile the constraint against the model.
//!
//! Tool calling (chat only): `tools` (function tools, at most 128, names as
//! OpenAI allows them), `tool_choice` (`none` | `auto` (the default) |
//! `required` | `{"type": "function", "function": {"name"}}`),
//! `parallel_tool_calls` (default true); assistant turns with `tool_calls`
//! (their `arguments` JSON strings, parsed for the template) and `tool`
//! turns with `tool_call_id`. A response format together with tools is
//! refused unless `tool_choice` is `none`.
//!
//! Unsupported features that would change the output if silently ignored
//! (the legacy `functions`, `echo`, `suffix`, `best_of` > 1, image or audio
//! content) are a 400 naming the parameter, rather than a quietly
//! different answer.

use crate::error::ApiError;
use minnow_engine::chat::ChatMessage;
use minnow_engine::constraint::ConstraintSpec;
use minnow_engine::sampler::SamplingParams;
pub use minnow_engine::tools::ToolChoice;
use serde_json::{Map, Value};

/// Upper bound of `n`: each choice is a sequence in the batch.
pub const MAX_N: usize = 16;
/// Upper bound of `top_logprobs` (chat) and `logprobs` (completions).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Upper bound of the number of stop strings.
pub const MAX_STOPS: usize = 16;

/// What the two generation endpoints have in common.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub stream: bool,
    pub include_usage: bool,
    pub n: usize,
    /// `None`: the rest of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `Some(k)`: return each token's logprob and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    /// `response_format` (json_object / json_schema) or `structured_outputs`
    /// (vLLM's json / regex / choice / grammar), with the parameter that
    /// asked for it (for errors when it does not compile).
    pub constraint: Option<(ConstraintSpec, &'static str)>,
    /// `logit_bias`: token id → bias in −100..=100.
    pub logit_bias: Vec<(u32, f32)>,
}

/// A chat request's own part.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub opts: GenOptions,
    /// `tools` with `tool_choice` and `parallel_tool_calls`; `None` without tools.
    pub tools: Option<ToolRequest>,
}

/// The tools a chat request offers and how the model may use them.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    /// OpenAI's function tools, checked (`{"type": "function", "function": {…}}`).
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): more than one call per reply.
    pub parallel: bool,
}

/// At most this many tools per request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A completion's prompt: text to tokenize, or token ids as given.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    pub opts: GenOptions,
}

/// The body as a JSON object, or a 400 saying why not.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")).with_code("invalid_json"))?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(format!("the body must be a JSON object, not {}", type_name(&other)))
            .with_code("invalid_json")),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(param, format!("`{param}` must be {expected}, not {}", type_name(got))).with_code("invalid_type")
}

fn out_of_range(param: &str, msg: String) -> ApiError {
    ApiError::invalid(param, msg).with_code("invalid_value")
}

/// A field, with `null` read as absent.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

pub(crate) fn opt_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(name, "a boolean", v)),
    }
}

/// OpenAI's bounds on `metadata`: at most 16 pairs, keys up to 64
/// characters, values up to 512.
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY: usize = 64;
pub const MAX_METADATA_VALUE: usize = 512;

/// `metadata`: an object of strings within OpenAI's bounds (absent or null:
/// none). `param` names it in errors (`metadata` in a request body).
pub(crate) fn metadata(v: Option<&Value>, param: &str) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let mut out = std::collections::BTreeMap::new();
    let obj = match v {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(wrong_type(param, "an object of strings", v)),
    };
    if obj.len() > MAX_METADATA_PAIRS {
        return Err(out_of_range(
            param,
            format!("`{param}` may hold at most {MAX_METADATA_PAIRS} pairs, got {}", obj.len()),
        ));
    }
    for (k, v) in obj {
        let p = format!("{param}.{k}");
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY {
            return Err(out_of_range(
                &p,
                format!("`{param}` keys must be 1 to {MAX_METADATA_KEY} characters, got {:?}", k),
            ));
        }
        let Value::String(s) = v else { return Err(wrong_type(&p, "a string", v)) };
        if s.chars().count() > MAX_METADATA_VALUE {
            return Err(out_of_range(&p, format!("`{p}` must be at most {MAX_METADATA_VALUE} characters")));
        }
        out.insert(k.clone(), s.clone());
    }
    Ok(out)
}

/// An integer (a float with no fraction, like `5.0`, counts) in `[min, max]`.
pub(crate) fn opt_int(obj: &Map<String, Value>, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    let Some(v) = field(obj, name) else { return Ok(None) };
    let i = as_integer(v).ok_or_else(|| wrong_type(name, "an integer", v))?;
    if i < min as i128 || i > max as i128 {
        return Err(out_of_range(name, format!("`{name}` must be between {min} and {max}, got {i}")));
    }
    Ok(Some(i as i64))
}

pub(crate) fn as_integer(v: &Value) -> Option<i128> {
    let Value::Number(n) = v else { return None };
    if let Some(i) = n.as_i64() {
        return Some(i as i128);
    }
    if let Some(u) = n.as_u64() {
        return Some(u as i128);
    }
    let f = n.as_f64()?;
    // 2^63 and beyond are not exact in the range we accept anyway.
    (f.fract() == 0.0 && f.abs() < 9.0e18).then_some(f as i128)
}

/// A finite number in `[min, max]`.
fn opt_num(obj: &Map<String, Value>, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
    let Some(v) = field(obj, name) else { return Ok(None) };
    let x = v.as_f64().ok_or_else(|| wrong_type(name, "a number", v))?;
    if !(x >= min && x <= max) {
        return Err(out_of_range(name, format!("`{name}` must be between {min} and {max}, got {x}")));
    }
    Ok(Some(x))
}

pub fn opt_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type(name, "a string", v)),
    }
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::invalid(param, format!("{what} is not supported by this server")).with_code("unsupported_parameter")
}

/// A seed for requests that give none: different per request, so unseeded
/// sampling is not the same every time (OpenAI's behaviour).
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // RandomState is seeded from the OS once per process; the counter and
    // the clock make successive calls differ.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// The parameters both endpoints share. `chat` selects the `logprobs` shape.
fn parse_common(obj: &Map<String, Value>, chat: bool) -> Result<GenOptions, ApiError> {
    opt_str(obj, "model")?;
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(so)) => match field(so, "include_usage") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(wrong_type("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };

    // OpenAI's newer name wins when both are given, as in their API.
    let mut max_tokens = None;
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(m) = opt_int(obj, name, 1, i64::MAX)? {
            max_tokens = Some(usize::try_from(m).unwrap_or(usize::MAX));
        }
    }

    // OpenAI's defaults: temperature 1, no filter, no penalty.
    let mut s = SamplingParams { temperature: 1.0, ..SamplingParams::greedy() };
    if let Some(t) = opt_num(obj, "temperature", 0.0, 2.0)? {
        s.temperature = t as f32;
    }
    if let Some(p) = opt_num(obj, "top_p", 0.0, 1.0)? {
        if p == 0.0 {
            // The sampler wants top_p > 0; a zero nucleus is the top token alone.
            s.top_k = 1;
        } else {
            s.top_p = p as f32;
        }
    }
    if let Some(k) = opt_int(obj, "top_k", 0, i64::from(u32::MAX))? {
        // An explicit top_k overrides the top_p = 0 rule only when it is stricter.
        s.top_k = if s.top_k == 1 && k != 0 { 1 } else { k as usize };
    }
    if let Some(m) = opt_num(obj, "min_p", 0.0, 1.0)? {
        s.min_p = m as f32;
    }
    if let Some(r) = opt_num(obj, "repeat_penalty", f64::MIN_POSITIVE, 10.0)? {
        s.repeat_penalty = r as f32;
    }
    if let Some(n) = opt_int(obj, "repeat_last_n", -1, 1 << 20)? {
        s.repeat_last_n = if n < 0 { usize::MAX } else { n as usize };
    }
    if let Some(p) = opt_num(obj, "presence_penalty", -2.0, 2.0)? {
        s.presence_penalty = p as f32;
    }
    if let Some(f) = opt_num(obj, "frequency_penalty", -2.0, 2.0)? {
        s.frequency_penalty = f as f32;
    }
    s.seed = match field(obj, "seed") {
        None => fresh_seed(),
        Some(v) => match as_integer(v) {
            // Negative seeds (OpenAI's are int64) wrap to their bit pattern.
            Some(i) if i >= i64::MIN as i128 && i <= u64::MAX as i128 => i as u64,
            Some(_) => return Err(out_of_range("seed", "`seed` must fit in 64 bits".to_string())),
            None => return Err(wrong_type("seed", "an integer", v)),
        },
    };
    s.validate().map_err(|e| out_of_range(e.param, e.to_string()))?;

    let stop = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOPS {
                return Err(out_of_range(
                    "stop",
                    format!("`stop` may hold at most {MAX_STOPS} strings, got {}", items.len()),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                match it {
                    Value::String(x) => out.push(x.clone()),
                    v => return Err(wrong_type(&format!("stop[{i}]"), "a string", v)),
                }
            }
            out
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };

    let n = opt_int(obj, "n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    let logprobs = if chat {
        let on = opt_bool(obj, "logprobs")?.unwrap_or(false);
        let top = opt_int(obj, "top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
        match (on, top) {
            (true, t) => Some(t.unwrap_or(0) as usize),
            (false, Some(_)) => {
                return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true")
                    .with_code("invalid_value"))
            }
            (false, None) => None,
        }
    } else {
        match field(obj, "logprobs") {
            None => None,
            // `true` is the chat form; accept it here as "the chosen token only".
            Some(Value::Bool(b)) => b.then_some(0),
            Some(_) => opt_int(obj, "logprobs", 0, MAX_TOP_LOGPROBS as i64)?.map(|k| k as usize),
        }
    };
    let ignore_eos = opt_bool(obj, "ignore_eos")?.unwrap_or(false);

    if let Some(b) = opt_int(obj, "best_of", 1, MAX_N as i64)? {
        if b != 1 && b as usize != n {
            return Err(unsupported("best_of", "`best_of` other than 1"));
        }
    }
    let logit_bias = parse_logit_bias(obj)?;
    if field(obj, "functions").is_some() || field(obj, "function_call").is_some() {
        return Err(unsupported("functions", "the legacy `functions` API (use `tools`)"));
    }
    let constraint = parse_constraint(obj)?;

    Ok(GenOptions {
        stream,
        include_usage: stream && include_usage,
        n,
        max_tokens,
        sampling: s,
        stop,
        logprobs,
        ignore_eos,
        constraint,
        logit_bias,
    })
}

/// `POST /v1/chat/completions`.
pub fn parse_chat(obj: &Map<String, Value>) -> Result<ChatRequest, ApiError> {
    let msgs = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("messages", "`messages` is required").with_code("missing_parameter"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type("messages", "an array", v)),
    };
    if msgs.is_empty() {
        return Err(out_of_range("messages", "`messages` must hold at least one message".to_string()));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Value::Object(m) = m else { return Err(wrong_type(&p, "an object", m)) };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(format!("{p}.role"), format!("`{p}.role` is required"))
                    .with_code("missing_parameter"))
            }
            Some(v) => return Err(wrong_type(&format!("{p}.role"), "a string", v)),
        };
        // OpenAI's "developer" is its new name for system instructions;
        // chat templates know only "system".
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            "function" => return Err(unsupported(&format!("{p}.role"), "the legacy `function` role (use `tool`)")),
            other => {
                return Err(out_of_range(
                    &format!("{p}.role"),
                    format!("`{p}.role` must be system, developer, user, assistant or tool, not {other:?}"),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // An assistant turn may be empty (OpenAI allows null content there).
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(format!("{p}.content"), format!("`{p}.content` is required"))
                    .with_code("missing_parameter"))
            }
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let pp = format!("{p}.content[{j}]");
                    let Value::Object(part) = part else { return Err(wrong_type(&pp, "an object", part)) };
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => match part.get("text") {
                            Some(Value::String(t)) => text.push_str(t),
                            v => return Err(wrong_type(&format!("{pp}.text"), "a string", v.unwrap_or(&Value::Null))),
                        },
                        Some(other) => {
                            return Err(unsupported(&format!("{pp}.type"), &format!("content of type `{other}`")))
                        }
                        None => {
                            return Err(wrong_type(
                                &format!("{pp}.type"),
                                "a string",
                                part.get("type").unwrap_or(&Value::Null),
                            ))
                        }
                    }
                }
                text
            }
            Some(v) => return Err(wrong_type(&format!("{p}.content"), "a string or an array of content parts", v)),
        };
        let mut msg = ChatMessage::new(role, content);
        if role == "tool" {
            msg.tool_call_id = match m.get("tool_call_id") {
                Some(Value::String(id)) => Some(id.clone()),
                None | Some(Value::Null) => {
                    return Err(ApiError::invalid(
                        format!("{p}.tool_call_id"),
                        format!("`{p}.tool_call_id` is required: the id of the call this message answers"),
                    )
                    .with_code("missing_parameter"))
                }
                Some(v) => return Err(wrong_type(&format!("{p}.tool_call_id"), "a string", v)),
            };
        }
        if role == "assistant" {
            msg.tool_calls = parse_assistant_calls(m, &p)?;
        }
        messages.push(msg);
    }
    let opts = parse_common(obj, true)?;
    let tools = parse_tools(obj)?;
    if let (Some(t), Some((_, param))) = (&tools, &opts.constraint) {
        if t.choice != ToolChoice::None {
            return Err(unsupported(
                param,
                "a response format together with tools (set `tool_choice` to \"none\" or drop one)",
            ));
        }
    }
    Ok(ChatRequest { messages, opts, tools })
}

/// An assistant turn's `tool_calls` (OpenAI's shape, the arguments a JSON
/// string) → the shape chat templates read (the arguments an object); the
/// rule is the engine's (`tools::calls_for_template`).
fn parse_assistant_calls(m: &Map<String, Value>, p: &str) -> Result<Option<Value>, ApiError> {
    let Some(calls) = m.get("tool_calls") else { return Ok(None) };
    minnow_engine::tools::calls_for_template(calls).map_err(|(field, why)| {
        let param = format!("{p}.tool_calls{field}");
        let code = if why.starts_with("must be") { "invalid_type" } else { "invalid_value" };
        ApiError::invalid(param.clone(), format!("`{param}` {why}")).with_code(code)
    })
}

/// `tools`, `tool_choice` and `parallel_tool_calls`, checked; `None` when
/// no tools are offered.
fn parse_tools(obj: &Map<String, Value>) -> Result<Option<ToolRequest>, ApiError> {
    let list = match field(obj, "tools") {
        None => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) => Some(a),
        Some(v) => return Err(wrong_type("tools", "an array of tools", v)),
    };
    let parallel = opt_bool(obj, "parallel_tool_calls")?.unwrap_or(true);
    let Some(list) = list else {
        // "none" and "auto" mean the same as no choice when nothing is offered.
        return match field(obj, "tool_choice") {
            None => Ok(None),
            Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`: there is nothing to call")
                .with_code("invalid_value")),
        };
    };
    if list.len() > MAX_TOOLS {
        return Err(out_of_range("tools", format!("at most {MAX_TOOLS} tools, got {}", list.len())));
    }
    let mut tools = Vec::with_capacity(list.len());
    let mut names: Vec<&str> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let p = format!("tools[{i}]");
        let Value::Object(t) = t else { return Err(wrong_type(&p, "an object", t)) };
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err(unsupported(&format!("{p}.type"), &format!("tools of type `{other}`"))),
            None => {
                return Err(wrong_type(
                    &format!("{p}.type"),
                    "the string \"function\"",
                    t.get("type").unwrap_or(&Value::Null),
                ))
            }
        }
        let f = match t.get("function") {
            Some(Value::Object(f)) => f,
            v => return Err(wrong_type(&format!("{p}.function"), "an object", v.unwrap_or(&Value::Null))),
        };
        let name = match f.get("name") {
            Some(Value::String(n)) => n.as_str(),
            v => return Err(wrong_type(&format!("{p}.function.name"), "a string", v.unwrap_or(&Value::Null))),
        };
        // OpenAI's rule: letters, digits, underscores and dashes, at most 64.
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(out_of_range(
                &format!("{p}.function.name"),
                format!("a function name is 1 to 64 letters, digits, underscores or dashes, not {name:?}"),
            ));
        }
        if names.contains(&name) {
            return Err(out_of_range(&format!("{p}.function.name"), format!("two tools are named {name:?}")));
        }
        names.push(name);
        if let Some(d) = f.get("description").filter(|d| !d.is_null() && !d.is_string()) {
            return Err(wrong_type(&format!("{p}.function.description"), "a string", d));
        }
        match f.get("parameters") {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(v) => return Err(wrong_type(&format!("{p}.function.parameters"), "a JSON Schema object", v)),
        }
        let mut clean = Map::new();
        clean.insert("type".into(), Value::String("function".into()));
        let mut fc = f.clone();
        fc.retain(|k, v| matches!(k.as_str(), "name" | "description" | "parameters") && !v.is_null());
        clean.insert("function".into(), Value::Object(fc));
        tools.push(Value::Object(clean));
    }
    let choice = match field(obj, "tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(out_of_range(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or a function, not {other:?}"),
                ))
            }
        },
        Some(Value::Object(c)) => {
            let name = c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice.function.name",
                    "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": …}}",
                )
                .with_code("missing_parameter")
            })?;
            if !names.contains(&name) {
                return Err(out_of_range(
                    "tool_choice.function.name",
                    format!("no tool is named {name:?}; the tools are {}", names.join(", ")),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(v) => return Err(wrong_type("tool_choice", "a string or an object", v)),
    };
    Ok(Some(ToolRequest { tools, choice, parallel }))
}

/// `POST /v1/completions`.
pub fn parse_completion(obj: &Map<String, Value>) -> Result<CompletionRequest, ApiError> {
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required").with_code("missing_parameter"))
        }
        Some(v) => parse_prompt(v)?,
    };
    if opt_bool(obj, "echo")?.unwrap_or(false) {
        return Err(unsupported("echo", "`echo`"));
    }
    if opt_str(obj, "suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "`suffix` (fill-in-the-middle)"));
    }
    if field(obj, "tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(unsupported("tools", "tool calling on /v1/completions (use /v1/chat/completions)"));
    }
    Ok(CompletionRequest { prompt, opts: parse_common(obj, false)? })
}

/// A string, token ids, or a one-element array of either (OpenAI's batch
/// form; more than one prompt per request is refused).
fn parse_prompt(v: &Value) -> Result<PromptInput, ApiError> {
    match v {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(out_of_range("prompt", "`prompt` is empty".to_string()));
            }
            if items.iter().all(|x| x.is_number()) {
                return token_ids(items, "prompt").map(PromptInput::Tokens);
            }
            if items.len() > 1 {
                return Err(unsupported("prompt", "more than one prompt per request"));
            }
            match &items[0] {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                Value::Array(ids) => token_ids(ids, "prompt[0]").map(PromptInput::Tokens),
                other => Err(wrong_type("prompt[0]", "a string or an array of token ids", other)),
            }
        }
        other => Err(wrong_type("prompt", "a string, an array of token ids, or an array of one of those", other)),
    }
}

/// An array of token ids (range against the vocabulary is checked later).
pub(crate) fn token_ids(items: &[Value], param: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match as_integer(x) {
            Some(t) if (0..=u32::MAX as i128).contains(&t) => Ok(t as u32),
            Some(t) => Err(out_of_range(&format!("{param}[{i}]"), format!("token id {t} is out of range"))),
            None => Err(wrong_type(&format!("{param}[{i}]"), "an integer token id", x)),
        })
        .collect()
}

/// `logit_bias`: an object of token ids (as strings, OpenAI's form) to
/// numbers in −100..=100. Ids are checked against the vocabulary by the
/// handler.
fn parse_logit_bias(obj: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let m = match field(obj, "logit_bias") {
        None => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => return Err(wrong_type("logit_bias", "an object of token ids to numbers", v)),
    };
    if m.len() > 1024 {
        return Err(ApiError::invalid("logit_bias", format!("at most 1024 entries, got {}", m.len()))
            .with_code("invalid_value"));
    }
    let mut out = Vec::with_capacity(m.len());
    for (k, v) in m {
        let p = format!("logit_bias.{k}");
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::invalid(&p, format!("`{k}` is not a token id (a non-negative integer as a string)"))
                .with_code("invalid_value")
        })?;
        let bias = v.as_f64().ok_or_else(|| wrong_type(&p, "a number", v))?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::invalid(&p, format!("a bias must be between -100 and 100, got {bias}"))
                .with_code("invalid_value"));
        }
        out.push((id, bias as f32));
    }
    Ok(out)
}

/// `response_format` or `structured_outputs` → the constraint asked for and
/// the parameter that asked (one of them per request).
fn parse_constraint(obj: &Map<String, Value>) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    let from_format = match field(obj, "response_format") {
        None => None,
        Some(Value::Object(rf)) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some((ConstraintSpec::JsonObject, "response_format")),
            Some("json_schema") => {
                let js = match rf.get("json_schema") {
                    Some(Value::Object(js)) => js,
                    Some(v) => return Err(wrong_type("response_format.json_schema", "an object", v)),
                    None => {
                        return Err(ApiError::invalid(
                            "response_format.json_schema",
                            "`json_schema` is required with type `json_schema`",
                        )
                        .with_code("missing_parameter"))
                    }
                };
                let schema = match js.get("schema") {
                    Some(s @ (Value::Object(_) | Value::Bool(_))) => s.clone(),
                    Some(v) => return Err(wrong_type("response_format.json_schema.schema", "an object", v)),
                    // OpenAI allows a schema-less json_schema: any JSON object.
                    None => serde_json::json!({"type": "object"}),
                };
                Some((ConstraintSpec::JsonSchema(schema), "response_format"))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!("`{other}` is not a response format: use text, json_object or json_schema"),
                )
                .with_code("invalid_value"))
            }
            None => return Err(wrong_type("response_format.type", "a string", rf.get("type").unwrap_or(&Value::Null))),
        },
        Some(v) => return Err(wrong_type("response_format", "an object", v)),
    };
    let from_extension = match field(obj, "structured_outputs") {
        None => None,
        Some(Value::Object(so)) => {
            let present: Vec<&String> = so.keys().filter(|k| !matches!(k.as_str(), "disable_any_whitespace")).collect();
            if present.len() != 1 {
                return Err(ApiError::invalid(
                    "structured_outputs",
                    "give exactly one of `json`, `regex`, `choice` or `grammar`",
                )
                .with_code("invalid_value"));
            }
            let key = present[0].as_str();
            let v = &so[key];
            let spec = match key {
                "json" => match v {
                    Value::String(s) => ConstraintSpec::JsonSchema(serde_json::from_str(s).map_err(|e| {
                        ApiError::invalid("structured_outputs.json", format!("not JSON: {e}"))
                            .with_code("invalid_value")
                    })?),
                    Value::Object(_) | Value::Bool(_) => ConstraintSpec::JsonSchema(v.clone()),
                    v => return Err(wrong_type("structured_outputs.json", "a JSON Schema", v)),
                },
                "regex" => match v {
                    Value::String(s) => ConstraintSpec::Regex(s.clone()),
                    v => return Err(wrong_type("structured_outputs.regex", "a string", v)),
                },
                "grammar" => match v {
                    Value::String(s) => ConstraintSpec::Grammar(s.clone()),
                    v => return Err(wrong_type("structured_outputs.grammar", "a string", v)),
                },
                "choice" => match v {
                    Value::Array(a) if !a.is_empty() => ConstraintSpec::Choice(
                        a.iter()
                            .enumerate()
                            .map(|(i, x)| {
                                x.as_str().map(str::to_string).ok_or_else(|| {
                                    wrong_type(&format!("structured_outputs.choice[{i}]"), "a string", x)
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                    v => return Err(wrong_type("structured_outputs.choice", "a non-empty array of strings", v)),
                },
                other => {
                    return Err(ApiError::invalid(
                        "structured_outputs",
                        format!("`{other}` is not a structured output: use json, regex, choice or grammar"),
                    )
                    .with_code("invalid_value"))
                }
            };
            let compact = match so.get("disable_any_whitespace") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(wrong_type("structured_outputs.disable_any_whitespace", "a boolean", v)),
            };
            Some((if compact { spec.compact() } else { spec }, "structured_outputs"))
        }
        Some(v) => return Err(wrong_type("structured_outputs", "an object", v)),
    };
    match (from_format, from_extension) {
        (Some(_), Some(_)) => {
            Err(ApiError::invalid("structured_outputs", "give `response_format` or `structured_outputs`, not both")
                .with_code("invalid_value"))
        }
        (a, b) => Ok(a.or(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn chat_err(v: Value) -> ApiError {
        parse_chat(&obj(v)).unwrap_err()
    }

    #[test]
    fn defaults_are_openai_s() {
        let r =
            parse_chat(&obj(json!({"messages": [{"role": "user", "content": "hi"}], "unknown": {"x": 1}}))).unwrap();
        assert_eq!(r.opts.n, 1);
        assert_eq!(r.opts.max_tokens, None);
        assert_eq!(r.opts.sampling.temperature, 1.0);
        assert_eq!(r.opts.sampling.top_p, 1.0);
        assert_eq!(r.opts.sampling.top_k, 0);
        assert!(!r.opts.stream && r.opts.logprobs.is_none());
    }

    #[test]
    fn wrong_types_and_ranges_name_the_parameter() {
        let base = |k: &str, v: Value| {
            let mut o = json!({"messages": [{"role": "user", "content": "hi"}]});
            o[k] = v;
            o
        };
        for (k, v) in [
            ("temperature", json!("hot")),
            ("temperature", json!(2.5)),
            ("top_p", json!(1.5)),
            ("max_tokens", json!(0)),
            ("max_tokens", json!(1.5)),
            ("n", json!(0)),
            ("n", json!(17)),
            ("stop", json!(5)),
            ("seed", json!("x")),
            ("presence_penalty", json!(3)),
            ("frequency_penalty", json!(-2.5)),
            ("top_k", json!(-1)),
            ("min_p", json!(2)),
            ("repeat_penalty", json!(0)),
            ("stream", json!("yes")),
            ("logprobs", json!(1)),
            ("top_logprobs", json!(2)),
            ("logit_bias", json!([1, 5])),
            ("structured_outputs", json!({"regex": "a", "choice": ["b"]})),
        ] {
            let e = chat_err(base(k, v.clone()));
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(k), "{k}={v}: {}", e.message);
        }
        let e = chat_err(json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", 3]}));
        assert_eq!(e.param.as_deref(), Some("stop[1]"));
        let e = chat_err(json!({"messages": [{"role": "wizard", "content": "hi"}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = chat_err(json!({"messages": [{"role": "user"}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = chat_err(json!({"messages": "hi"}));
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn tools_choices_and_tool_turns_parse() {
        let weather = json!({"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}});
        let history = json!([
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "-3 C"},
        ]);
        let r = parse_chat(&obj(json!({"messages": history, "tools": [weather.clone()]}))).unwrap();
        let t = r.tools.unwrap();
        assert_eq!((t.choice, t.parallel, t.tools.len()), (ToolChoice::Auto, true, 1));
        assert!(t.tools[0]["function"].get("strict").is_none(), "only name, description, parameters are kept");
        // The call's arguments reach the template as an object.
        assert_eq!(r.messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"], json!({"city": "Oslo"}));
        assert_eq!(r.messages[2].role, "tool");
        assert_eq!(r.messages[2].tool_call_id.as_deref(), Some("call_9"));
        for (choice, want) in [
            (json!("none"), ToolChoice::None),
            (json!("required"), ToolChoice::Required),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                ToolChoice::Function("get_weather".into()),
            ),
        ] {
            let r =
                parse_chat(&obj(json!({"messages": [{"role": "user", "content": "hi"}], "tools": [weather.clone()],
                "tool_choice": choice, "parallel_tool_calls": false})))
                .unwrap();
            let t = r.tools.unwrap();
            assert_eq!((t.choice, t.parallel), (want, false));
        }
        // No tools: none and auto are fine, anything else names tool_choice.
        let r =
            parse_chat(&obj(json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}))).unwrap();
        assert!(r.tools.is_none());

        let user = json!([{"role": "user", "content": "hi"}]);
        for (body, param) in [
            (json!({"messages": user, "tool_choice": "required"}), "tool_choice"),
            (json!({"messages": user, "tools": [weather], "tool_choice": "sometimes"}), "tool_choice"),
            (
                json!({"messages": user, "tools": [weather], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice.function.name",
            ),
            (
                json!({"messages": user, "tools": [weather], "tool_choice": {"type": "function"}}),
                "tool_choice.function.name",
            ),
            (json!({"messages": user, "tools": {"a": 1}}), "tools"),
            (json!({"messages": user, "tools": [{"type": "code_interpreter"}]}), "tools[0].type"),
            (json!({"messages": user, "tools": [{"type": "function"}]}), "tools[0].function"),
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "has space"}}]}),
                "tools[0].function.name",
            ),
            (json!({"messages": user, "tools": [weather, weather]}), "tools[1].function.name"),
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"messages": user, "tools": [weather], "parallel_tool_calls": "yes"}), "parallel_tool_calls"),
            (
                json!({"messages": user, "tools": [weather], "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"messages": user, "functions": [{"name": "f"}]}), "functions"),
            (json!({"messages": [{"role": "tool", "content": "42"}]}), "messages[0].tool_call_id"),
            (json!({"messages": [{"role": "function", "content": "42"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (json!({"messages": [{"role": "assistant", "tool_calls": "f"}]}), "messages[0].tool_calls"),
        ] {
            let e = chat_err(body.clone());
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        let many: Vec<Value> =
            (0..=MAX_TOOLS).map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}})).collect();
        assert_eq!(chat_err(json!({"messages": user, "tools": many})).param.as_deref(), Some("tools"));
        // Completions have no tools.
        let e = parse_completion(&obj(json!({"prompt": "hi", "tools": [weather]}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
        // With tool_choice none a response format is fine.
        let r = parse_chat(&obj(json!({"messages": user, "tools": [weather], "tool_choice": "none",
            "response_format": {"type": "json_object"}})))
        .unwrap();
        assert!(r.opts.constraint.is_some());
    }

    #[test]
    fn disable_any_whitespace_makes_json_compact() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let schema = json!({"type": "object"});
        let r = parse_chat(&obj(
            json!({"messages": msgs, "structured_outputs": {"json": schema, "disable_any_whitespace": true}}),
        ))
        .unwrap();
        assert_eq!(
            r.opts.constraint,
            Some((ConstraintSpec::JsonSchema(schema.clone()).compact(), "structured_outputs"))
        );
        let Some((ConstraintSpec::JsonSchema(s), _)) = r.opts.constraint else { panic!() };
        assert_eq!(s["x-guidance"]["whitespace_flexible"], json!(false));
        let r = parse_chat(&obj(
            json!({"messages": msgs, "structured_outputs": {"json": schema, "disable_any_whitespace": false}}),
        ))
        .unwrap();
        assert_eq!(r.opts.constraint, Some((ConstraintSpec::JsonSchema(schema.clone()), "structured_outputs")));
        let e =
            chat_err(json!({"messages": msgs, "structured_outputs": {"json": schema, "disable_any_whitespace": 1}}));
        assert_eq!(e.param.as_deref(), Some("structured_outputs.disable_any_whitespace"));
    }

    #[test]
    fn structured_outputs_and_logit_bias_parse() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let with = |k: &str, v: Value| {
            let mut o = obj(json!({"messages": msgs.clone()}));
            o.insert(k.into(), v);
            o
        };
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema.clone(), "strict": true}});
        let r = parse_chat(&with("response_format", rf)).unwrap();
        assert_eq!(r.opts.constraint, Some((ConstraintSpec::JsonSchema(schema.clone()), "response_format")));
        let r = parse_chat(&with("response_format", json!({"type": "json_object"}))).unwrap();
        assert_eq!(r.opts.constraint, Some((ConstraintSpec::JsonObject, "response_format")));
        let r = parse_chat(&with("response_format", json!({"type": "text"}))).unwrap();
        assert_eq!(r.opts.constraint, None);
        let r = parse_chat(&with("structured_outputs", json!({"choice": ["a", "b"]}))).unwrap();
        assert_eq!(
            r.opts.constraint,
            Some((ConstraintSpec::Choice(vec!["a".into(), "b".into()]), "structured_outputs"))
        );
        let r = parse_chat(&with("structured_outputs", json!({"json": schema.to_string()}))).unwrap();
        assert_eq!(r.opts.constraint, Some((ConstraintSpec::JsonSchema(schema), "structured_outputs")));
        let r = parse_chat(&with("logit_bias", json!({"15": -100, "7": 2.5}))).unwrap();
        let mut bias = r.opts.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, 2.5), (15, -100.0)]);

        let err = |k: &str, v: Value| parse_chat(&with(k, v)).expect_err("refused");
        assert_eq!(err("response_format", json!({"type": "xml"})).param.as_deref(), Some("response_format.type"));
        let e = err("response_format", json!({"type": "json_schema"}));
        assert_eq!(e.param.as_deref(), Some("response_format.json_schema"));
        let e = err("response_format", json!({"type": "json_schema", "json_schema": {"schema": 3}}));
        assert_eq!(e.param.as_deref(), Some("response_format.json_schema.schema"));
        assert_eq!(err("structured_outputs", json!({"tree": "x"})).param.as_deref(), Some("structured_outputs"));
        assert_eq!(
            err("structured_outputs", json!({"choice": []})).param.as_deref(),
            Some("structured_outputs.choice")
        );
        let mut both = with("structured_outputs", json!({"regex": "a"}));
        both.insert("response_format".into(), json!({"type": "json_object"}));
        assert_eq!(parse_chat(&both).err().unwrap().param.as_deref(), Some("structured_outputs"));
        assert_eq!(err("logit_bias", json!({"x": 1})).param.as_deref(), Some("logit_bias.x"));
        assert_eq!(err("logit_bias", json!({"3": 101})).param.as_deref(), Some("logit_bias.3"));
        assert_eq!(err("logit_bias", json!({"3": "up"})).param.as_deref(), Some("logit_bias.3"));
    }

    #[test]
    fn max_completion_tokens_and_integral_floats() {
        let r = parse_chat(&obj(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7.0, "n": 2}),
        ))
        .unwrap();
        assert_eq!(r.opts.max_tokens, Some(7));
        assert_eq!(r.opts.n, 2);
    }

    #[test]
    fn prompts_in_every_form() {
        let p = |v: Value| parse_completion(&obj(json!({"prompt": v}))).map(|r| r.prompt);
        assert!(matches!(p(json!("hi")), Ok(PromptInput::Text(t)) if t == "hi"));
        assert!(matches!(p(json!(["hi"])), Ok(PromptInput::Text(t)) if t == "hi"));
        assert!(matches!(p(json!([1, 2])), Ok(PromptInput::Tokens(t)) if t == vec![1, 2]));
        assert!(matches!(p(json!([[3]])), Ok(PromptInput::Tokens(t)) if t == vec![3]));
        assert_eq!(p(json!(["a", "b"])).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(p(json!([1, -2])).unwrap_err().param.as_deref(), Some("prompt[1]"));
        assert_eq!(p(json!(5)).unwrap_err().param.as_deref(), Some("prompt"));
    }

    #[test]
    fn content_parts_join_and_images_are_refused() {
        let r = parse_chat(&obj(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))).unwrap();
        assert_eq!(r.messages[0].content, "ab");
        let e = chat_err(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn body_must_be_a_json_object() {
        assert_eq!(parse_body(b"{bad").unwrap_err().status, 400);
        assert_eq!(parse_body(b"[1]").unwrap_err().status, 400);
        assert!(parse_body(b"{}").is_ok());
    }
}
