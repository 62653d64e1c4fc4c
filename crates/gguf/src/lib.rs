//! The GGUF file format (v2 and v3): a validated, memory-mapped reader and a
//! writer.
//!
//! A GGUF file is untrusted input. Every count, length, offset, dimension and
//! type read from it is checked before use, so a truncated, corrupted or hostile
//! file yields a [`GgufError`] naming what is wrong — never a panic, an
//! out-of-bounds read, a huge allocation or a hang.
//!
//! A model split into several files (llama.cpp's `gguf-split` layout,
//! `PREFIX-00001-of-00003.gguf` …) opens as one [`GgufFile`] from any of its
//! parts, and [`GgufWriter::write_split`] writes one.
//!
//! Layout: `types` (ggml tensor types and their block geometry), `value`
//! (metadata values), `reader` (parsing and validation, split models),
//! `writer` (building GGUF v3 files, whole or split, that the reader accepts).

mod reader;
mod types;
mod value;
mod writer;

pub use reader::{
    GgufError, GgufFile, TensorInfo, DEFAULT_ALIGNMENT, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_LEN,
    MAX_METADATA_VALUES, MAX_SPLIT_PARTS, MAX_TENSOR_NAME_LEN, SPLIT_KEYS,
};
pub use types::GgmlType;
pub use value::{Value, ValueType};
pub use writer::{GgufWriter, WRITE_VERSION};
