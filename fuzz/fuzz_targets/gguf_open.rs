//! Fuzz target: any byte string given to the GGUF reader must yield `Ok` or
//! `Err`, never a panic, an out-of-bounds read or a runaway allocation; and
//! when it yields `Ok`, everything the file offers must be usable.
//!
//! Good seeds are real models' first few kilobytes and the small files the
//! hostile tests build (`crates/gguf/tests/common`). The in-CI counterpart is
//! `crates/gguf/tests/fuzz_props.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minnow_gguf::{GgufFile, Value};

/// Reads every value, so a malformed one built by the reader would be touched.
fn touch(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(_, elems) => elems.iter().map(touch).sum(),
        other => other.as_f64().is_some() as usize,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for (key, value) in file.metadata() {
        assert!(file.get(key).is_some());
        touch(value);
    }
    for t in file.tensors() {
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes);
        assert!(file.data_offset() + t.offset + t.n_bytes <= file.file_size());
    }
});
