//! The JSONL shapes every stage reads and writes.
//!
//! - [`InputRecord`]: what a user has — `{"id"?, "prompt" | "messages"}`, one
//!   per line.
//! - [`DatasetRecord`]: one labeled example in the OpenAI chat fine-tuning
//!   shape (`{"messages": [...]}`), plus where it came from
//!   ([`Provenance`]) and, optionally, the teacher's top-k log-probabilities
//!   for logit distillation ([`TeacherLogprobs`]).
//!
//! - [`EvalCase`]: an input with a gold answer (`{"id"?, "prompt" |
//!   "messages", "answer"}`), for worked examples and evaluation.
//! - [`RecordLog`] (from `minnow_store`): the append-only, crash-safe JSONL
//!   file every stage writes through, so a killed run continues where it
//!   stopped.

use anyhow::{anyhow, bail, Context, Result};
use minnow_engine::chat::ChatMessage;
use minnow_engine::tokenizer::Tokenizer;
pub use minnow_store::{Keyed, RecordLog, Recovered, TeacherLogprobs};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::path::Path;

/// One input line: either a bare prompt (sent as one user message) or a
/// whole conversation to be answered. `id` defaults to the line number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
}

/// Who labeled a record, how, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// A local GGUF path or a remote URL + model name.
    pub teacher: String,
    /// Sampling settings as given (temperature, top_p, max_tokens, seed, ...).
    pub sampling: serde_json::Value,
    /// Unix seconds when the answer was received.
    pub time: f64,
    /// Prompt and completion token counts as reported by the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// `stop` or `length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}

/// One labeled example: the conversation the student learns from, ending
/// with the teacher's answer as the last (assistant) message. Worked
/// examples shown to the teacher are *not* in `messages`: the student
/// learns to answer zero-shot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub id: String,
    pub messages: Vec<ChatMessage>,
    /// The tools the conversation offered (OpenAI's function tools), when
    /// any: the prompt is rendered with them, as it was served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_logprobs: Option<TeacherLogprobs>,
}

/// A short stable fingerprint of a tokenizer's vocabulary: two models with
/// the same fingerprint share ids (see `Tokenizer::fingerprint`).
pub fn vocab_fingerprint(tokenizer: &Tokenizer) -> String {
    tokenizer.fingerprint()
}

impl InputRecord {
    /// The conversation to answer: `messages` as given, or `prompt` as one
    /// user turn. Exactly one of the two must be present and non-empty.
    pub fn conversation(&self) -> Result<Vec<ChatMessage>, String> {
        match (&self.prompt, &self.messages) {
            (Some(_), Some(_)) => Err("has both \"prompt\" and \"messages\"; give one".into()),
            (Some(p), None) => Ok(vec![ChatMessage::new("user", p.clone())]),
            (None, Some(m)) if m.is_empty() => Err("\"messages\" is empty".into()),
            (None, Some(m)) => Ok(m.clone()),
            (None, None) => Err("needs \"prompt\" (a string) or \"messages\" (a list of {role, content})".into()),
        }
    }
}

/// One input ready for a teacher: its id and the conversation to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub id: String,
    pub messages: Vec<ChatMessage>,
}

/// A case with a gold answer (the shape of the task's `dev.jsonl`): used as
/// worked examples shown to a teacher and as evaluation data.
#[derive(Debug, Clone)]
pub struct EvalCase {
    pub id: String,
    pub messages: Vec<ChatMessage>,
    /// The gold answer exactly as written in the file (a JSON string or any
    /// JSON value). Kept raw so a worked example shows an object's keys in
    /// the file's order, not sorted.
    pub answer: Box<RawValue>,
}

impl EvalCase {
    /// The answer as an assistant would write it: a JSON string's text, or
    /// any other value's JSON text as written in the file.
    pub fn answer_text(&self) -> String {
        match serde_json::from_str::<String>(self.answer.get()) {
            Ok(s) => s,
            Err(_) => self.answer.get().to_string(),
        }
    }

    /// The answer parsed (for scoring).
    pub fn answer_value(&self) -> serde_json::Value {
        serde_json::from_str(self.answer.get()).unwrap_or(serde_json::Value::Null)
    }

    /// The user's last message: what identifies the case across files
    /// (a teacher's dataset and the eval data share the prompt, not the id).
    pub fn last_user(&self) -> &str {
        last_user_text(&self.messages)
    }
}

/// The content of the last `user` message ("" when there is none).
pub fn last_user_text(messages: &[ChatMessage]) -> &str {
    messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str())
}

#[derive(Deserialize)]
struct RawCase {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    answer: Option<Box<RawValue>>,
}

/// An `id` may be written as a string or a number; anything else is refused.
fn id_text(id: Option<serde_json::Value>, line_no: usize) -> Result<String, String> {
    match id {
        None => Ok(line_no.to_string()),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(v) => Err(format!("\"id\" must be a non-empty string or a number, got {v}")),
    }
}

/// Non-blank lines of a JSONL file with their 1-based line numbers.
fn jsonl_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.to_string())).collect())
}

/// Reads one record per line; the error names the file and line. Ids must
/// be unique (a duplicate would be labeled once and silently dropped).
fn read_cases(path: &Path, need_answer: bool) -> Result<Vec<(Input, Option<Box<RawValue>>)>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (no, line) in jsonl_lines(path)? {
        let at = || format!("{}:{no}", path.display());
        let raw: RawCase = serde_json::from_str(&line)
            .map_err(|e| anyhow!("{}: not a JSON object with \"prompt\" or \"messages\": {e}", at()))?;
        let id = id_text(raw.id, no).map_err(|e| anyhow!("{}: {e}", at()))?;
        let rec = InputRecord { id: None, prompt: raw.prompt, messages: raw.messages };
        let messages = rec.conversation().map_err(|e| anyhow!("{}: {e}", at()))?;
        if need_answer && raw.answer.is_none() {
            bail!("{}: no \"answer\": every case here needs its gold answer", at());
        }
        if !seen.insert(id.clone()) {
            bail!("{}: id {id:?} appears twice; ids must be unique", at());
        }
        out.push((Input { id, messages }, raw.answer));
    }
    Ok(out)
}

/// Whether `path` is minnow's own `{"prompt" | "messages", "answer"?}`
/// JSONL (the first record says so: a prompt without a completion, or
/// messages with a gold answer or without an assistant reply) rather than
/// another format, a labeled conversation or a store, which
/// [`crate::formats`] reads.
fn own_format(path: &Path) -> Result<bool> {
    if crate::formats::is_store(path) {
        return Ok(false);
    }
    // Only the first record is read here; the reader chosen reads the file.
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let first = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok());
    let Some(v) = first else { return Ok(true) };
    let answered = v["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["role"] == "assistant");
    Ok((v.get("prompt").is_some() && v.get("completion").is_none())
        || (v.get("messages").is_some() && (v.get("answer").is_some() || !answered)))
}

/// A conversation without its answer: what a teacher is asked.
fn question(mut messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    if messages.len() > 1 && messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop();
    }
    messages
}

/// Reads inputs: minnow's `{"id"?, "prompt" | "messages"}` per line (other
/// keys, such as a gold `answer`, are ignored; ids default to line
/// numbers), or any format or store [`crate::formats`] reads, each
/// conversation without its answer (a teacher answers it again).
pub fn read_inputs(path: &Path) -> Result<Vec<Input>> {
    if !own_format(path)? {
        let loaded = crate::formats::load(path)?;
        if loaded.records.is_empty() {
            bail!("{} has no records", path.display());
        }
        return Ok(loaded.records.into_iter().map(|r| Input { id: r.id, messages: question(r.messages) }).collect());
    }
    Ok(read_cases(path, false)?.into_iter().map(|(i, _)| i).collect())
}

/// Reads cases with gold answers: `{"id"?, "prompt" | "messages",
/// "answer"}`, or conversations in any format or store
/// [`crate::formats`] reads, whose last (assistant) message is the answer.
pub fn read_eval_cases(path: &Path) -> Result<Vec<EvalCase>> {
    if !own_format(path)? {
        let mut out = Vec::new();
        for r in crate::formats::load(path)?.records {
            let Some((answer, convo)) = r.messages.split_last().filter(|(a, c)| a.role == "assistant" && !c.is_empty())
            else {
                bail!(
                    "{}: record {}: the last message is not an (assistant) answer to score against",
                    path.display(),
                    r.id
                );
            };
            let answer = RawValue::from_string(serde_json::to_string(&answer.content)?)?;
            out.push(EvalCase { id: r.id, messages: convo.to_vec(), answer });
        }
        return Ok(out);
    }
    Ok(read_cases(path, true)?
        .into_iter()
        .map(|(i, a)| EvalCase { id: i.id, messages: i.messages, answer: a.expect("checked by read_cases") })
        .collect())
}

/// Inputs written by `synth` always carry their id.
impl Keyed for InputRecord {
    fn key(&self) -> &str {
        self.id.as_deref().unwrap_or("")
    }
}

impl Keyed for DatasetRecord {
    fn key(&self) -> &str {
        &self.id
    }
}
