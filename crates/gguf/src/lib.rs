//! The GGUF file format (v2 and v3): a validated, memory-mapped reader and a
//! writer.
//!
//! A GGUF file is untrusted input. Every count, length, offset, dimension and
//! type read from it is checked before use, so a truncated, corrupted or hostile
//! file yields a [`GgufError`] naming what is wrong — never a panic, an
//! out-of-bounds read, a huge allocation or a hang.
//!
//! Layout: `types` (ggml tensor types and their block geometry), `value`
//! (metadata values), `reader` (parsing and validation), `writer` (building
//! GGUF v3 files that the reader accepts).

mod reader;
mod types;
mod value;
mod writer;

pub use reader::{
    GgufError, GgufFile, TensorInfo, DEFAULT_ALIGNMENT, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_LEN,
    MAX_METADATA_VALUES, MAX_TENSOR_NAME_LEN,
};
pub use types::GgmlType;
pub use value::{Value, ValueType};
pub use writer::{GgufWriter, WRITE_VERSION};
