//! The inference engine: everything between a GGUF file and generated text.
//! Knows nothing of HTTP or training.
//!
//! - [`tokenizer`]: BPE and SentencePiece-style tokenizers built from GGUF metadata.
//! - [`chat`]: chat templates (`tokenizer.chat_template`) rendered with minijinja.

pub mod chat;
pub mod tokenizer;
