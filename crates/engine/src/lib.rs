//! The inference engine: everything between a GGUF file and generated text.
//! Knows nothing of HTTP or training.
//!
//! - [`tokenizer`]: BPE and SentencePiece-style tokenizers built from GGUF metadata.
//! - [`chat`]: chat templates (`tokenizer.chat_template`) rendered with minijinja.
//! - [`model`]: architecture families and their batched forward pass.
//! - [`kv_cache`]: per-sequence key/value cache.
//! - [`sampler`]: seeded token sampling (temperature, top-k/p, min-p, penalties).
//! - [`sequence`]: one sequence's generation state (sampler, stop strings, limits,
//!   logprobs, constraint) and the one rule for when it stops; every decoding path holds one.
//! - [`constraint`]: structured outputs (JSON Schema, regex, choice, grammar) as token
//!   masks, through llguidance over the model's own vocabulary.
//! - [`generate`]: one request in-process on the scheduler's decode loop (`minnow run`), timing.
//! - [`loader`]: a model file's network, tokenizer and chat template together.
//! - [`scheduler`]: the one decode loop (`Core::step`) and continuous batching of many
//!   requests around it (the server's engine): chunked prefill interleaved with decoding,
//!   `n` samples per prompt, prefix cache.
//! - [`speculative`]: speculative decoding (draft model or prompt lookup), output exactly the
//!   target's: drafters, the answer memory, the controller and verification, one directory.
//! - [`tools`]: tool calls in the `<tool_call>` format: the fallback for templates without
//!   tools, the grammar that makes a call valid, the parser that splits a reply.
//! - [`vote`]: many samples sharing one prefill, and self-consistency voting.
//! - [`upcycle`]: a dense model file → a mixture-of-experts one computing the same function.

pub mod chat;
pub mod constraint;
pub mod generate;
pub mod imatrix;
pub mod kv_cache;
pub mod loader;
pub mod lora;
pub mod model;
pub mod quantize;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod speculative;
pub mod tokenizer;
pub mod tools;
pub mod upcycle;
pub mod vote;
