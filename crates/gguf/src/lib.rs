//! The GGUF file format (v2 and v3): a validated, memory-mapped reader.
//!
//! A GGUF file is untrusted input. Every count, length, offset, dimension and
//! type read from it is checked before use, so a truncated, corrupted or hostile
//! file yields a [`GgufError`] naming what is wrong — never a panic, an
//! out-of-bounds read, a huge allocation or a hang.
//!
//! Layout: `types` (ggml tensor types and their block geometry), `value`
//! (metadata values), `reader` (parsing and validation).

mod reader;
mod types;
mod value;

pub use reader::{GgufFile, TensorInfo, GgufError, MAX_DIMS};
pub use types::GgmlType;
pub use value::{Value, ValueType};
