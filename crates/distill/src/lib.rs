//! Distillation: a big teacher labels data (and writes synthetic inputs), a
//! small student is fine-tuned on it, and an evaluation measures the student
//! against the teacher on quality, speed and cost.
//!
//! - [`data`]: the JSONL shapes (inputs, chat fine-tuning records, provenance)
//!   and the crash-safe append-only record log every stage writes through.
//! - [`teacher`]: a teacher is a local GGUF (minnow's engine, batched) or an
//!   OpenAI-compatible endpoint (retries, backoff, rate limit).
//! - [`label`]: the teacher answers every input; resumable.
//! - [`synth`]: the teacher writes new inputs from a task description and
//!   seed examples; near-duplicate removal (MinHash) and filters.
//! - [`train`]: fine-tuning (full or LoRA) with candle autograd; masked
//!   cross-entropy and top-k KL losses; checkpoints; GGUF export.
//! - [`score`], [`eval`], [`report`]: scorers, evaluation runs, the Markdown /
//!   JSON report and the quality-against-cost chart.
//! - [`pipeline`]: `minnow distill run CONFIG.toml`, label → train → eval.
//!
//! The inference engine knows nothing of this crate; training has its own
//! forward pass (candle), tested to agree with the engine's.

pub mod data;
pub mod eval;
pub mod fleet;
pub mod formats;
pub mod label;
pub mod pipeline;
pub mod report;
pub mod score;
pub mod synth;
pub mod teacher;
pub mod train;
