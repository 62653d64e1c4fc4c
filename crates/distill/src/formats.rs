//! The ecosystem's dataset formats, read and written, and the server's
//! store as data.
//!
//! A data argument (`distill train|eval|label --data`, `distill export`) is
//! a JSONL file or `store:DIR[?metadata.KEY=VALUE&…&model=NAME]` (the
//! stored completions of `minnow serve --store DIR`, filtered).
//!
//! A file's format is detected from its first record and every record must
//! be of it; an error names the line and the field:
//! - **OpenAI chat** (what OpenAI's fine-tuning takes, and what `distill
//!   label` writes): `{"messages": [{role, content, tool_calls?,
//!   tool_call_id?}], "tools"?}`; minnow's own `{"prompt"}` inputs and the
//!   legacy `{"prompt", "completion"}` pairs are read as one user turn (and
//!   the completion as the answer), so one file may mix them.
//! - **ShareGPT**: `{"conversations": [{"from", "value"}], "system"?,
//!   "tools"?}` with `from` one of system, human/user, gpt/assistant,
//!   function_call (a call: `{"name", "arguments"}`), observation/tool.
//! - **Alpaca**: `{"instruction", "input"?, "output"?, "system"?}`; the
//!   user turn is the instruction, then a blank line and the input when
//!   there is one.
//!
//! Every record becomes a [`DatasetRecord`]: its conversation (the last
//! message the answer when it is the assistant's), the tools it offered,
//! and what the source knew of its provenance and log-probabilities.
//! [`write()`] writes records as OpenAI chat, ShareGPT or Alpaca (one
//! instruction and its answer: a conversation with more turns or with tool
//! calls is refused, naming it), so a file read, written and read back holds
//! the same conversations.

use crate::data::{DatasetRecord, Provenance};
use anyhow::{anyhow, bail, Context, Result};
use minnow_engine::chat::ChatMessage;
use minnow_engine::tools::{calls_for_openai, calls_for_template};
use minnow_store::{Store, StoredCompletion};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenAi,
    ShareGpt,
    Alpaca,
}

impl Format {
    /// `openai`, `sharegpt` or `alpaca`.
    pub fn parse(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "openai" | "chat" | "messages" => Ok(Format::OpenAi),
            "sharegpt" => Ok(Format::ShareGpt),
            "alpaca" => Ok(Format::Alpaca),
            _ => bail!("unknown format {s:?}: openai, sharegpt or alpaca"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::OpenAi => "OpenAI chat",
            Format::ShareGpt => "ShareGPT",
            Format::Alpaca => "Alpaca",
        }
    }

    /// The format a record's keys say it is, if any.
    fn of(o: &Map<String, Value>) -> Option<Format> {
        if o.contains_key("messages") || o.contains_key("prompt") {
            Some(Format::OpenAi)
        } else if o.contains_key("conversations") {
            Some(Format::ShareGpt)
        } else if o.contains_key("instruction") {
            Some(Format::Alpaca)
        } else {
            None
        }
    }
}

/// Where a data argument points.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    /// `store:DIR?metadata.KEY=VALUE&model=NAME`: the filters all hold.
    Store {
        dir: PathBuf,
        metadata: Vec<(String, String)>,
        model: Option<String>,
    },
}

impl Source {
    pub fn parse(spec: &Path) -> Result<Source> {
        let Some(s) = spec.to_str().and_then(|s| s.strip_prefix("store:")) else {
            return Ok(Source::File(spec.to_path_buf()));
        };
        let (dir, query) = s.split_once('?').unwrap_or((s, ""));
        if dir.is_empty() {
            bail!("store:DIR needs the store's directory (store:DIR?metadata.KEY=VALUE)");
        }
        let mut metadata = Vec::new();
        let mut model = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| anyhow!("store filter {pair:?}: write KEY=VALUE"))?;
            if let Some(key) = k.strip_prefix("metadata.") {
                metadata.push((key.to_string(), v.to_string()));
            } else if k == "model" {
                model = Some(v.to_string());
            } else {
                bail!("store filter {k:?}: filters are metadata.KEY=VALUE and model=NAME");
            }
        }
        Ok(Source::Store { dir: PathBuf::from(dir), metadata, model })
    }
}

/// Whether a data argument is a store (`store:…`).
pub fn is_store(spec: &Path) -> bool {
    spec.to_str().is_some_and(|s| s.starts_with("store:"))
}

/// What [`load`] read.
#[derive(Debug)]
pub struct Loaded {
    pub records: Vec<DatasetRecord>,
    /// The file's format, or "store".
    pub format: &'static str,
    /// Stored answers left out because they were cut at `max_tokens`.
    pub skipped_truncated: usize,
}

/// Reads a data argument: a file in any of the formats, or a store.
pub fn load(spec: &Path) -> Result<Loaded> {
    match Source::parse(spec)? {
        Source::File(p) => {
            let (records, format) = read_file(&p)?;
            Ok(Loaded { records, format: format.name(), skipped_truncated: 0 })
        }
        Source::Store { dir, metadata, model } => {
            let mut skipped_truncated = 0;
            let mut records = Vec::new();
            for r in Store::read_all(&dir)? {
                if !r.matches(model.as_deref(), &metadata) {
                    continue;
                }
                match from_stored(&r).with_context(|| format!("{}: stored completion {}", dir.display(), r.id))? {
                    Some(rec) => records.push(rec),
                    None => skipped_truncated += 1,
                }
            }
            Ok(Loaded { records, format: "store", skipped_truncated })
        }
    }
}

/// Reads one JSONL file, detecting its format from the first record.
pub fn read_file(path: &Path) -> Result<(Vec<DatasetRecord>, Format)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut format: Option<(Format, usize)> = None;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let no = i + 1;
        let at = |e: String| anyhow!("{}:{no}: {e}", path.display());
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let Value::Object(o) = v else { return Err(at("a record must be a JSON object".into())) };
        let Some(this) = Format::of(&o) else {
            return Err(at(
                "fits no format: needs \"prompt\" or \"messages\" (OpenAI chat; \"completion\" for a prompt's \
                 answer), \"conversations\" (ShareGPT) or \"instruction\" (Alpaca)"
                    .into(),
            ));
        };
        let (f, first) = *format.get_or_insert((this, no));
        if this != f {
            return Err(at(format!(
                "a {} record in a {} file (so says line {first}); one format a file",
                this.name(),
                f.name()
            )));
        }
        let id = match o.get("id") {
            None | Some(Value::Null) => no.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(v) => return Err(at(format!("\"id\" must be a non-empty string or a number, got {v}"))),
        };
        if !seen.insert(id.clone()) {
            return Err(at(format!("id {id:?} appears twice; ids must be unique")));
        }
        let rec = match f {
            Format::OpenAi => openai_record(id, &o),
            Format::ShareGpt => sharegpt_record(id, &o),
            Format::Alpaca => alpaca_record(id, &o),
        }
        .map_err(at)?;
        out.push(rec);
    }
    let Some((f, _)) = format else { bail!("{} holds no records", path.display()) };
    Ok((out, f))
}

/// One OpenAI chat message (`developer` read as `system`; text parts joined).
pub fn openai_message(m: &Value, at: &str) -> Result<ChatMessage, String> {
    let Value::Object(m) = m else { return Err(format!("{at} must be an object")) };
    let role = match m.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => "system",
        Some(r @ ("user" | "assistant" | "tool")) => r,
        Some(r) => return Err(format!("{at}.role {r:?} is not system, developer, user, assistant or tool")),
        None => return Err(format!("{at}.role is required (a string)")),
    };
    let content = match m.get("content") {
        None | Some(Value::Null) if role == "assistant" => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut t = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(x)) => t.push_str(x),
                    _ => {
                        return Err(format!(
                            "{at}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\"}}) are read"
                        ))
                    }
                }
            }
            t
        }
        _ => return Err(format!("{at}.content is required (a string)")),
    };
    let mut msg = ChatMessage::new(role, content);
    if let Some(c) = m.get("tool_calls") {
        msg.tool_calls = calls_for_template(c).map_err(|(f, why)| format!("{at}.tool_calls{f} {why}"))?;
    }
    if let Some(Value::String(id)) = m.get("tool_call_id") {
        msg.tool_call_id = Some(id.clone());
    }
    Ok(msg)
}

/// A message in OpenAI's shape (tool calls with JSON-text arguments).
pub fn openai_message_json(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if let Some(c) = &m.tool_calls {
        v["tool_calls"] = calls_for_openai(c, 0);
        if m.content.is_empty() {
            v["content"] = Value::Null;
        }
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

fn tools_of(o: &Map<String, Value>) -> Result<Option<Vec<Value>>, String> {
    match o.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a.clone())),
        // ShareGPT files (LLaMA-Factory) keep the tools as a JSON text.
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => Ok(Some(a)),
            _ => Err("\"tools\" must be an array of tools (or its JSON text)".into()),
        },
        Some(_) => Err("\"tools\" must be an array of tools".into()),
    }
}

fn openai_record(id: String, o: &Map<String, Value>) -> Result<DatasetRecord, String> {
    let messages = match (o.get("messages"), o.get("prompt")) {
        (Some(_), Some(_)) => return Err("has both \"prompt\" and \"messages\"; give one".into()),
        (Some(Value::Array(ms)), None) => ms
            .iter()
            .enumerate()
            .map(|(j, m)| openai_message(m, &format!("messages[{j}]")))
            .collect::<Result<_, _>>()?,
        (Some(_), None) => return Err("\"messages\" must be an array of messages".into()),
        (None, Some(Value::String(p))) => {
            let mut ms = vec![ChatMessage::new("user", p.clone())];
            match o.get("completion") {
                None | Some(Value::Null) => {}
                Some(Value::String(c)) => ms.push(ChatMessage::new("assistant", c.clone())),
                Some(_) => return Err("\"completion\" must be a string".into()),
            }
            ms
        }
        (None, _) => return Err("\"prompt\" must be a string".into()),
    };
    if messages.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let provenance = match o.get("provenance") {
        None | Some(Value::Null) => None,
        Some(p) => Some(serde_json::from_value::<Provenance>(p.clone()).map_err(|e| format!("\"provenance\": {e}"))?),
    };
    let teacher_logprobs = match o.get("teacher_logprobs") {
        None | Some(Value::Null) => None,
        Some(t) => Some(serde_json::from_value(t.clone()).map_err(|e| format!("\"teacher_logprobs\": {e}"))?),
    };
    Ok(DatasetRecord { id, messages, tools: tools_of(o)?, provenance, teacher_logprobs })
}

fn sharegpt_record(id: String, o: &Map<String, Value>) -> Result<DatasetRecord, String> {
    let Some(Value::Array(turns)) = o.get("conversations") else {
        return Err("\"conversations\" must be an array of {\"from\", \"value\"}".into());
    };
    let mut messages = Vec::new();
    if let Some(Value::String(s)) = o.get("system") {
        if !s.is_empty() {
            messages.push(ChatMessage::new("system", s.clone()));
        }
    }
    for (j, t) in turns.iter().enumerate() {
        let at = format!("conversations[{j}]");
        let from = t.get("from").and_then(Value::as_str).ok_or(format!("{at}.from is required (a string)"))?;
        let value = t.get("value").and_then(Value::as_str).ok_or(format!("{at}.value is required (a string)"))?;
        match from {
            "system" => messages.push(ChatMessage::new("system", value)),
            "human" | "user" => messages.push(ChatMessage::new("user", value)),
            "gpt" | "assistant" => messages.push(ChatMessage::new("assistant", value)),
            "observation" | "tool" => messages.push(ChatMessage::new("tool", value)),
            "function_call" => {
                let v: Value = serde_json::from_str(value)
                    .map_err(|e| format!("{at}.value: a function_call is a JSON {{\"name\", \"arguments\"}} ({e})"))?;
                let calls: Vec<Value> = match v {
                    Value::Array(a) => a,
                    one => vec![one],
                };
                let calls: Vec<Value> = calls
                    .into_iter()
                    .map(|c| {
                        json!({"type": "function", "function": {"name": c.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": c.get("arguments").cloned().unwrap_or_else(|| json!({}))}})
                    })
                    .collect();
                let calls =
                    calls_for_template(&Value::Array(calls)).map_err(|(f, why)| format!("{at}.value{f} {why}"))?;
                // A call right after the assistant's text belongs to that turn.
                match messages.last_mut() {
                    Some(m) if m.role == "assistant" && m.tool_calls.is_none() => m.tool_calls = calls,
                    _ => messages.push(ChatMessage { tool_calls: calls, ..ChatMessage::new("assistant", "") }),
                }
            }
            other => {
                return Err(format!("{at}.from {other:?} is not system, human, gpt, function_call or observation"))
            }
        }
    }
    if messages.is_empty() {
        return Err("\"conversations\" is empty".into());
    }
    Ok(DatasetRecord { id, messages, tools: tools_of(o)?, provenance: None, teacher_logprobs: None })
}

fn alpaca_record(id: String, o: &Map<String, Value>) -> Result<DatasetRecord, String> {
    let s = |k: &str| -> Result<Option<String>, String> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"{k}\" must be a string")),
        }
    };
    let instruction = s("instruction")?.ok_or("\"instruction\" is required")?;
    let mut messages = Vec::new();
    if let Some(sys) = s("system")?.filter(|x| !x.is_empty()) {
        messages.push(ChatMessage::new("system", sys));
    }
    let user = match s("input")?.filter(|x| !x.is_empty()) {
        Some(input) => format!("{instruction}\n\n{input}"),
        None => instruction,
    };
    messages.push(ChatMessage::new("user", user));
    if let Some(out) = s("output")? {
        messages.push(ChatMessage::new("assistant", out));
    }
    Ok(DatasetRecord { id, messages, tools: None, provenance: None, teacher_logprobs: None })
}

/// A stored completion as a record: the request's conversation, then the
/// first choice's reply (content and tool calls); `None` when the reply was
/// cut at `max_tokens` (not an answer to learn from).
pub fn from_stored(r: &StoredCompletion) -> Result<Option<DatasetRecord>> {
    let mut messages = r
        .messages()
        .iter()
        .enumerate()
        .map(|(j, m)| openai_message(m, &format!("request.messages[{j}]")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!(e))?;
    let choice = &r.response["choices"][0];
    if choice["finish_reason"] == "length" {
        return Ok(None);
    }
    let reply = openai_message(&choice["message"], "response.choices[0].message").map_err(|e| anyhow!(e))?;
    messages.push(reply);
    let tools = match r.request.get("tools") {
        Some(Value::Array(t)) => Some(t.clone()),
        _ => None,
    };
    let sampling: Map<String, Value> =
        ["temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "response_format", "tool_choice"]
            .iter()
            .filter_map(|k| r.request.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
    let usage = &r.response["usage"];
    Ok(Some(DatasetRecord {
        id: r.id.clone(),
        messages,
        tools,
        provenance: Some(Provenance {
            teacher: r.model.clone(),
            sampling: Value::Object(sampling),
            time: r.created as f64,
            prompt_tokens: usage["prompt_tokens"].as_u64(),
            completion_tokens: usage["completion_tokens"].as_u64(),
            finish_reason: choice["finish_reason"].as_str().map(String::from),
        }),
        teacher_logprobs: r.logprobs.first().cloned(),
    }))
}

/// One record in `format`'s shape.
pub fn to_json(r: &DatasetRecord, format: Format) -> Result<Value> {
    Ok(match format {
        Format::OpenAi => {
            // OpenAI links a tool's answer to its call by id: calls without
            // one (from ShareGPT) get `call_N`, and the tool turns after
            // them take those ids in order.
            let mut messages = Vec::with_capacity(r.messages.len());
            let mut pending: std::collections::VecDeque<String> = Default::default();
            let mut n_calls = 0;
            for m in &r.messages {
                let mut v = openai_message_json(m);
                if let Some(Value::Array(calls)) = m.tool_calls.as_ref().map(|c| calls_for_openai(c, n_calls)) {
                    n_calls += calls.len();
                    pending = calls.iter().filter_map(|c| c["id"].as_str().map(String::from)).collect();
                    v["tool_calls"] = Value::Array(calls);
                }
                if m.role == "tool" && m.tool_call_id.is_none() {
                    if let Some(id) = pending.pop_front() {
                        v["tool_call_id"] = json!(id);
                    }
                }
                messages.push(v);
            }
            let mut v = json!({"id": r.id, "messages": messages});
            if let Some(t) = &r.tools {
                v["tools"] = json!(t);
            }
            v
        }
        Format::ShareGpt => {
            let mut turns = Vec::new();
            for m in &r.messages {
                let from = match m.role.as_str() {
                    "system" => "system",
                    "user" => "human",
                    "assistant" => "gpt",
                    "tool" => "observation",
                    other => bail!("record {}: ShareGPT has no speaker for role {other:?}", r.id),
                };
                if m.role != "assistant" || !m.content.is_empty() || m.tool_calls.is_none() {
                    turns.push(json!({"from": from, "value": m.content}));
                }
                if let Some(Value::Array(calls)) = &m.tool_calls {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|c| {
                            let f = c.get("function").unwrap_or(c);
                            json!({"name": f["name"], "arguments": f.get("arguments").cloned().unwrap_or_else(|| json!({}))})
                        })
                        .collect();
                    let value = if calls.len() == 1 { calls[0].to_string() } else { Value::Array(calls).to_string() };
                    turns.push(json!({"from": "function_call", "value": value}));
                }
            }
            let mut v = json!({"id": r.id, "conversations": turns});
            if let Some(t) = &r.tools {
                v["tools"] = json!(Value::Array(t.clone()).to_string());
            }
            v
        }
        Format::Alpaca => {
            let (system, rest) = match r.messages.split_first() {
                Some((s, rest)) if s.role == "system" => (Some(s.content.as_str()), rest),
                _ => (None, &r.messages[..]),
            };
            let fits = matches!(rest, [u, a] if u.role == "user" && a.role == "assistant" && a.tool_calls.is_none())
                || matches!(rest, [u] if u.role == "user");
            if !fits || r.tools.is_some() {
                bail!(
                    "record {}: Alpaca holds one instruction and its answer; this conversation has {} turns{} (use --format openai or sharegpt)",
                    r.id,
                    rest.len(),
                    if r.tools.is_some() { " and tools" } else { "" }
                );
            }
            let mut v = json!({"id": r.id, "instruction": rest[0].content, "input": ""});
            if let Some(a) = rest.get(1) {
                v["output"] = json!(a.content);
            }
            if let Some(s) = system {
                v["system"] = json!(s);
            }
            v
        }
    })
}

/// Writes `records` to `out` in `format`, atomically (a temporary file
/// renamed over `out` once whole).
pub fn write(records: &[DatasetRecord], format: Format, out: &Path) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&to_json(r, format)?.to_string());
        text.push('\n');
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = out.with_extension("jsonl.partial");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    Ok(())
}
