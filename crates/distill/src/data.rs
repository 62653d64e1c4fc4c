//! The JSONL shapes every stage reads and writes.
//!
//! - [`InputRecord`]: what a user has — `{"id"?, "prompt" | "messages"}`, one
//!   per line.
//! - [`DatasetRecord`]: one labeled example in the OpenAI chat fine-tuning
//!   shape (`{"messages": [...]}`), plus where it came from
//!   ([`Provenance`]) and, optionally, the teacher's top-k log-probabilities
//!   for logit distillation ([`TeacherLogprobs`]).
//!
//! Record logs (append-only, crash-safe, resumable) are built on these.

use minnow_engine::chat::ChatMessage;
use minnow_engine::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

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

/// The teacher's top-k distribution at every generated token.
///
/// Ids are in the teacher's vocabulary, identified by `vocab` (see
/// [`vocab_fingerprint`]); a KL term against a student is only meaningful
/// when the student's fingerprint is the same. `tokens[i]` is the token the
/// teacher emitted at position `i` of its answer and `top[i]` its top-k
/// `(id, logprob)` pairs there, most likely first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherLogprobs {
    /// Fingerprint of the teacher's vocabulary; `None` when unknown (a
    /// remote teacher), in which case the KL term is refused.
    pub vocab: Option<String>,
    /// Answer token ids, as generated: shape `[n_answer_tokens]`.
    pub tokens: Vec<u32>,
    /// Top-k `(id, logprob)` per answer token: shape `[n_answer_tokens][k]`.
    pub top: Vec<Vec<(u32, f32)>>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_logprobs: Option<TeacherLogprobs>,
}

/// A short stable fingerprint of a tokenizer's vocabulary (every token's
/// bytes, in id order): two models with the same fingerprint share ids.
/// FNV-1a 64 over length-prefixed token bytes, printed as `vocab-<n>-<hex>`.
pub fn vocab_fingerprint(tokenizer: &Tokenizer) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    let n = tokenizer.vocab_size();
    for id in 0..n as u32 {
        let bytes = tokenizer.token_bytes(id);
        for b in (bytes.len() as u32).to_le_bytes() {
            eat(b);
        }
        for b in bytes {
            eat(b);
        }
    }
    format!("vocab-{n}-{h:016x}")
}
