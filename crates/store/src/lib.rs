//! Records that must survive a crash, shared by the server (which writes
//! stored completions) and distillation (which reads them as data and keeps
//! its own outputs in record logs).
//!
//! - [`log`]: [`RecordLog`], an append-only JSONL file of keyed records:
//!   whole lines, `fsync` after each, a torn last line dropped on reopening.
//! - [`completions`]: [`Store`], OpenAI's stored chat completions on top of
//!   the same discipline, with metadata updates, deletes, a size bound and
//!   compaction.
//!
//! This crate knows nothing of models or HTTP: a stored completion's request
//! and response are kept as the JSON the server received and sent.

pub mod completions;
pub mod log;

pub use completions::{ListQuery, Order, Page, Store, StoreError, StoredCompletion};
pub use log::{Keyed, RecordLog, Recovered};

use serde::{Deserialize, Serialize};

/// The teacher's top-k distribution at every generated token.
///
/// Ids are in the teacher's vocabulary, identified by `vocab` (a tokenizer
/// fingerprint, `Tokenizer::fingerprint` in the engine); a KL term against a
/// student is only meaningful when the student's fingerprint is the same.
/// `tokens[i]` is the token the teacher emitted at position `i` of its
/// answer and `top[i]` its top-k `(id, logprob)` pairs there, most likely
/// first.
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
