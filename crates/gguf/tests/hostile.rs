//! Hand-made broken files: each must be refused with an error that names what
//! is wrong, and none may panic, over-allocate or read out of bounds.
//!
//! Most cases start from the small valid file of `common::base_file` and break
//! one marked field; cases that need a different structure (deep nesting, five
//! dimensions) are emitted whole.

mod common;

use common::{base_file, base_file_from_writer, Emitter, Q8_TENSOR_BYTES};
use minnow_gguf::{GgmlType, GgufError, GgufFile, TensorInfo, ValueType, MAX_ARRAY_DEPTH, MAX_METADATA_VALUES};

/// Parses `bytes`, requires an error whose one-line message contains every
/// needle, and returns the message.
#[track_caller]
fn expect_err(bytes: Vec<u8>, needles: &[&str]) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("a broken file was accepted; expected an error mentioning {needles:?}"),
        Err(e) => {
            let message = e.to_string();
            for needle in needles {
                assert!(message.contains(needle), "error {message:?} does not mention {needle:?}");
            }
            assert!(!message.contains('\n'), "error is not one line: {message:?}");
            message
        }
    }
}

fn truncated(e: &Emitter, len: usize) -> Vec<u8> {
    e.bytes[..len].to_vec()
}

// ---- the base file itself ----

#[test]
fn base_file_is_valid_and_matches_the_writer() {
    let base = base_file();
    assert_eq!(base.bytes, base_file_from_writer(), "hand-made base file and writer output differ");
    let file = GgufFile::from_bytes(base.bytes.clone()).unwrap();
    assert_eq!(file.tensors().len(), 2);
    assert_eq!(file.tensor_data_by_name("t.q8").unwrap(), &common::tensor_q8_data()[..]);
    assert_eq!(file.data_offset() as usize, base.at("data"));
}

#[test]
fn version_2_is_accepted() {
    let mut e = base_file();
    e.set_u32(e.at("version"), 2);
    assert_eq!(GgufFile::from_bytes(e.bytes).unwrap().version(), 2);
}

// ---- truncation ----

#[test]
fn truncated_at_every_byte() {
    let base = base_file();
    // Past the last tensor's data only padding remains, so the file stays valid.
    let data_end = base.at("data_end");
    for len in 0..base.bytes.len() {
        let result = GgufFile::from_bytes(truncated(&base, len));
        match result {
            Err(e) => {
                assert!(len < data_end, "truncated to {len} bytes: unexpected error {e}");
                assert!(!e.to_string().is_empty());
            }
            Ok(file) => {
                assert!(len >= data_end, "truncated to {len} of {} bytes and still accepted", base.bytes.len());
                assert_eq!(file.tensor_data_by_name("t.q8").unwrap().len(), Q8_TENSOR_BYTES);
            }
        }
    }
}

#[test]
fn truncated_in_header() {
    let base = base_file();
    expect_err(vec![], &["0 bytes", "too short"]);
    expect_err(truncated(&base, 3), &["3 bytes", "too short"]);
    expect_err(truncated(&base, 6), &["header: version: needs 4 bytes at offset 4", "ends at 6 bytes"]);
    expect_err(truncated(&base, 30), &["header: kv_count 5", "cannot fit"]);
    expect_err(truncated(&base, base.at("kv_count") + 7), &["header: kv_count", "needs 8 bytes"]);
}

#[test]
fn truncated_in_each_kv() {
    let base = base_file();
    // Cut early, the file cannot even hold kv_count minimal entries, which
    // the header check reports before any entry is read.
    expect_err(truncated(&base, base.at("arch.key") + 4), &["header: kv_count 5", "cannot fit"]);
    expect_err(truncated(&base, base.at("arch.value") + 9), &["header: kv_count 5", "cannot fit"]);
    // Past that, the entry being read is named.
    let mut e = Emitter::new();
    e.header(3, 0, 1).u64(100).raw(b"general.name.is.cut.short");
    expect_err(e.bytes, &["metadata entry 0: key: needs 100 bytes at offset 32"]);
    let mut e = Emitter::new();
    e.header(3, 0, 1).string(b"a.key").raw(&[8, 0]);
    expect_err(e.bytes, &["metadata 'a.key': value type: needs 4 bytes"]);
    expect_err(truncated(&base, base.at("align.value") + 1), &["metadata 'general.alignment': u32 value"]);
    expect_err(truncated(&base, base.at("flag.value")), &["metadata 'test.flag': bool value"]);
    // Inside an array the count check fires first: 2 strings need 16 bytes.
    expect_err(truncated(&base, base.at("tokens.elem0") + 4), &["metadata 'test.tokens'", "2 items"]);
    expect_err(truncated(&base, base.at("tokens.elem1") + 9), &["metadata 'test.tokens': string value"]);
    expect_err(truncated(&base, base.at("nested.inner1") + 12), &["metadata 'test.nested'"]);
}

#[test]
fn truncated_in_tensor_table() {
    let base = base_file();
    expect_err(truncated(&base, base.at("t.f32.name") + 9), &["tensor 0: name"]);
    expect_err(truncated(&base, base.at("t.f32.n_dims") + 1), &["tensor 't.f32': n_dims"]);
    expect_err(truncated(&base, base.at("t.q8.dims") + 12), &["tensor 't.q8': dimension 1"]);
    expect_err(truncated(&base, base.at("t.q8.ggml_type")), &["tensor 't.q8': type"]);
    expect_err(truncated(&base, base.at("t.q8.offset") + 7), &["tensor 't.q8': data offset"]);
}

#[test]
fn truncated_in_data() {
    let base = base_file();
    // Table complete, data section cut inside the first tensor.
    expect_err(
        truncated(&base, base.at("data") + 8),
        &["tensor 't.f32': data [offset 0, 16 bytes] runs past the end of the file"],
    );
    expect_err(truncated(&base, base.at("data_end") - 1), &["tensor 't.q8'", "offset 32, 68 bytes", "runs past"]);
}

// ---- header ----

#[test]
fn wrong_magic() {
    let mut e = base_file();
    e.bytes[..4].copy_from_slice(b"GGML");
    expect_err(e.bytes, &["wrong magic", "GGML", "expected \"GGUF\""]);
    // A short non-GGUF file gets the short-file message.
    expect_err(b"PK\x03\x04".to_vec(), &["4 bytes", "too short"]);
}

#[test]
fn version_1_is_refused_with_a_hint() {
    let mut e = base_file();
    e.set_u32(e.at("version"), 1);
    let err = GgufFile::from_bytes(e.bytes.clone()).unwrap_err();
    assert!(matches!(err, GgufError::UnsupportedVersion { version: 1, .. }));
    expect_err(e.bytes, &["version 1", "obsolete", "re-convert"]);
}

#[test]
fn version_99_and_big_endian_are_refused() {
    let mut e = base_file();
    e.set_u32(e.at("version"), 99);
    expect_err(e.bytes.clone(), &["unsupported GGUF version 99", "2 and 3"]);
    e.set_u32(e.at("version"), 3u32.swap_bytes());
    expect_err(e.bytes, &["big-endian"]);
}

#[test]
fn absurd_tensor_count() {
    let mut e = base_file();
    e.set_u64(e.at("tensor_count"), u64::MAX);
    expect_err(e.bytes.clone(), &["tensor_count 18446744073709551615", "cannot fit"]);
    // Large but not overflowing: still more entries than the file can hold.
    e.set_u64(e.at("tensor_count"), 1 << 40);
    expect_err(e.bytes, &["tensor_count 1099511627776"]);
}

#[test]
fn absurd_kv_count() {
    let mut e = base_file();
    e.set_u64(e.at("kv_count"), u64::MAX);
    expect_err(e.bytes.clone(), &["kv_count 18446744073709551615", "cannot fit"]);
    // One more entry than there is: the first tensor entry is misread as
    // metadata, which throws the tensor table out of step.
    e.set_u64(e.at("kv_count"), 6);
    expect_err(e.bytes, &["tensor"]);
}

// ---- metadata ----

#[test]
fn absurd_string_lengths() {
    let mut e = base_file();
    e.set_u64(e.at("arch.key"), u64::MAX);
    expect_err(e.bytes, &["metadata entry 0: key", "string length 18446744073709551615", "exceeds the limit"]);
    let mut e = base_file();
    e.set_u64(e.at("arch.value"), u64::MAX - 3);
    expect_err(e.bytes, &["metadata 'general.architecture': string value", "needs 18446744073709551612 bytes"]);
    let mut e = base_file();
    e.set_u64(e.at("t.q8.name"), 1 << 20);
    expect_err(e.bytes, &["tensor 1: name", "string length 1048576", "limit of 65535"]);
}

#[test]
fn absurd_array_count() {
    let mut e = base_file();
    e.set_u64(e.at("tokens.count"), u64::MAX);
    expect_err(e.bytes.clone(), &["metadata 'test.tokens'", "18446744073709551615 items", "cannot fit"]);
    // 2^61 × 8 overflows u64: the check must not wrap around to a small number.
    e.set_u64(e.at("tokens.count"), 1 << 61);
    expect_err(e.bytes, &["metadata 'test.tokens'", "2305843009213693952 items"]);
}

#[test]
fn too_many_metadata_values() {
    // A u8 array whose bytes are all present but whose count exceeds the cap
    // on decoded values (each takes 32 bytes of memory for 1 in the file).
    let count = MAX_METADATA_VALUES + 1;
    let mut e = Emitter::new();
    e.header(3, 0, 1).kv("big", "test.big", ValueType::Array).u32(ValueType::U8.id()).u64(count);
    e.bytes.resize(e.bytes.len() + count as usize, 7);
    expect_err(e.bytes, &["metadata 'test.big'", "16777217 more values exceed the limit of 16777216"]);
}

/// A file whose only metadata value is `levels` arrays nested in each other.
fn nested_arrays(levels: usize) -> Vec<u8> {
    let mut e = Emitter::new();
    e.header(3, 0, 1).kv("deep", "test.deep", ValueType::Array);
    for _ in 1..levels {
        e.u32(ValueType::Array.id()).u64(1);
    }
    e.u32(ValueType::U8.id()).u64(0);
    e.bytes
}

#[test]
fn nested_arrays_too_deep() {
    assert!(GgufFile::from_bytes(nested_arrays(MAX_ARRAY_DEPTH)).is_ok());
    expect_err(nested_arrays(MAX_ARRAY_DEPTH + 1), &["metadata 'test.deep'", "nested more than 8 deep"]);
    // Far deeper than any stack could recurse: refused at the bound, no overflow.
    expect_err(nested_arrays(1_000_000), &["nested more than 8 deep"]);
}

#[test]
fn unknown_value_type() {
    let mut e = base_file();
    e.set_u32(e.at("flag.type"), 13);
    expect_err(e.bytes, &["metadata 'test.flag'", "unknown value type 13"]);
    let mut e = base_file();
    e.set_u32(e.at("tokens.value"), 0xdead_beef);
    expect_err(e.bytes, &["metadata 'test.tokens'", "unknown value type 3735928559"]);
}

#[test]
fn invalid_utf8() {
    let mut e = base_file();
    let at = e.at("arch.value") + 8;
    e.bytes[at] = 0xff; // "test" -> "\xffest"
    expect_err(e.bytes, &["metadata 'general.architecture'", "not valid UTF-8"]);
    let mut e = base_file();
    let at = e.at("tokens.elem1") + 9;
    e.bytes[at] = 0xc3; // "bc" -> "b\xc3": a truncated two-byte sequence
    expect_err(e.bytes, &["metadata 'test.tokens'", "not valid UTF-8"]);
    let mut e = base_file();
    let at = e.at("flag.key") + 8;
    e.bytes[at] = 0x80;
    expect_err(e.bytes, &["metadata entry 2: key", "not valid UTF-8"]);
    let mut e = base_file();
    let at = e.at("t.q8.name") + 8;
    e.bytes[at] = 0xfe;
    expect_err(e.bytes, &["tensor 1: name", "not valid UTF-8"]);
}

#[test]
fn bad_bool() {
    let mut e = base_file();
    let at = e.at("flag.value");
    e.bytes[at] = 2;
    expect_err(e.bytes, &["metadata 'test.flag'", "bool value 2", "not 0 or 1"]);
}

#[test]
fn duplicate_key() {
    let mut e = Emitter::new();
    e.header(3, 0, 2);
    e.kv("a", "general.architecture", ValueType::String).string(b"x");
    e.kv("b", "general.architecture", ValueType::U8).u8(0);
    expect_err(e.bytes, &["metadata 'general.architecture': duplicate key"]);
}

#[test]
fn names_with_control_characters_are_escaped_in_errors() {
    // A key that contains a newline and an escape sequence, duplicated so the
    // error quotes it: the message must stay one line and inert in a terminal.
    let mut e = Emitter::new();
    e.header(3, 0, 2);
    e.kv("a", "evil\nkey\x1b[2J", ValueType::U8).u8(0);
    e.kv("b", "evil\nkey\x1b[2J", ValueType::U8).u8(0);
    let message = expect_err(e.bytes, &["metadata 'evil\\nkey\\u{1b}[2J': duplicate key"]);
    assert!(!message.contains('\x1b'), "{message:?}");
}

// ---- alignment ----

#[test]
fn alignment_zero() {
    let mut e = base_file();
    e.set_u32(e.at("align.value"), 0);
    expect_err(e.bytes, &["general.alignment", "0 is not a power of two"]);
}

#[test]
fn alignment_not_a_power_of_two() {
    let mut e = base_file();
    e.set_u32(e.at("align.value"), 48);
    expect_err(e.bytes, &["general.alignment", "48 is not a power of two"]);
}

#[test]
fn alignment_absurd() {
    let mut e = base_file();
    e.set_u32(e.at("align.value"), 1 << 31);
    expect_err(e.bytes, &["general.alignment", "2147483648"]);
}

#[test]
fn alignment_of_the_wrong_type() {
    let mut e = Emitter::new();
    e.header(3, 0, 1).kv("align", "general.alignment", ValueType::String).string(b"32");
    expect_err(e.bytes, &["general.alignment", "expected an unsigned integer", "string"]);
    let mut e = Emitter::new();
    e.header(3, 0, 1).kv("align", "general.alignment", ValueType::I32).u32((-32i32) as u32);
    expect_err(e.bytes, &["general.alignment", "expected an unsigned integer"]);
}

#[test]
fn larger_alignment_moves_the_data_section() {
    // With alignment 64 the table ends at the same place but the data section
    // and the second tensor's offset (32) no longer line up.
    let mut e = base_file();
    e.set_u32(e.at("align.value"), 64);
    expect_err(e.bytes, &["tensor 't.q8': data offset 32 is not a multiple of the alignment 64"]);
}

// ---- tensor table ----

/// A file with one F32 tensor of the given shape (no data needed: the shape
/// checks come first).
fn one_tensor(dims: &[u64], ty_id: u32) -> Vec<u8> {
    let mut e = Emitter::new();
    e.header(3, 1, 0).tensor("w", dims, ty_id, 0).pad(32);
    e.bytes.resize(e.bytes.len() + 64, 0);
    e.bytes
}

#[test]
fn n_dims_zero() {
    expect_err(one_tensor(&[], GgmlType::F32.id()), &["tensor 'w': n_dims 0 is not in 1..=4"]);
}

#[test]
fn n_dims_five() {
    expect_err(one_tensor(&[1, 1, 1, 1, 1], GgmlType::F32.id()), &["tensor 'w': n_dims 5 is not in 1..=4"]);
    let mut e = base_file();
    e.set_u32(e.at("t.q8.n_dims"), u32::MAX);
    expect_err(e.bytes, &["tensor 't.q8': n_dims 4294967295"]);
}

#[test]
fn dim_zero() {
    expect_err(one_tensor(&[4, 0], GgmlType::F32.id()), &["tensor 'w': dimension 1 is 0"]);
}

#[test]
fn dims_product_overflows() {
    expect_err(one_tensor(&[1 << 32, 1 << 32], GgmlType::F32.id()), &["tensor 'w': element count overflows"]);
    expect_err(one_tensor(&[u64::MAX, 2], GgmlType::F32.id()), &["tensor 'w': element count overflows"]);
    // Fits in u64 but not in ggml's i64 element count.
    expect_err(one_tensor(&[1 << 62, 2], GgmlType::F32.id()), &["tensor 'w'", "more than ggml can address"]);
    // Element count fine, byte size overflows: 2^62 F32 elements are 2^64 bytes.
    expect_err(one_tensor(&[1 << 62], GgmlType::F32.id()), &["tensor 'w': size of 4611686018427387904 F32"]);
}

#[test]
fn element_count_not_a_whole_number_of_blocks() {
    expect_err(one_tensor(&[33], GgmlType::Q4_0.id()), &["tensor 'w': innermost dimension 33", "Q4_0 block size 32"]);
    // 16 × 2 = 32 elements is one block in total, but rows must be whole blocks.
    expect_err(one_tensor(&[16, 2], GgmlType::Q8_0.id()), &["innermost dimension 16", "block size 32"]);
    expect_err(one_tensor(&[128], GgmlType::Q4_K.id()), &["Q4_K block size 256"]);
}

#[test]
fn unknown_ggml_type() {
    // 4 and 5 were Q4_2 / Q4_3, removed from ggml long ago.
    expect_err(one_tensor(&[32], 4), &["tensor 'w': unknown or unsupported ggml type id 4"]);
    let mut e = base_file();
    e.set_u32(e.at("t.q8.ggml_type"), 1000);
    expect_err(e.bytes, &["tensor 't.q8'", "ggml type id 1000"]);
}

#[test]
fn offset_not_aligned() {
    let mut e = base_file();
    e.set_u64(e.at("t.q8.offset"), 33);
    expect_err(e.bytes, &["tensor 't.q8': data offset 33 is not a multiple of the alignment 32"]);
}

#[test]
fn offset_past_the_end() {
    let mut e = base_file();
    let len = e.bytes.len() as u64;
    e.set_u64(e.at("t.q8.offset"), 1 << 20);
    let message =
        expect_err(e.bytes, &["tensor 't.q8': data [offset 1048576, 68 bytes] runs past the end of the file"]);
    assert!(message.contains(&format!("({len} bytes")), "{message}");
}

#[test]
fn offset_plus_size_overflows() {
    let mut e = base_file();
    // Aligned, and data_offset + offset + size wraps around u64.
    e.set_u64(e.at("t.q8.offset"), !31u64);
    expect_err(e.bytes, &["tensor 't.q8'", "offset 18446744073709551584, 68 bytes", "runs past the end"]);
}

#[test]
fn duplicate_tensor_name() {
    let mut e = Emitter::new();
    e.header(3, 2, 0).tensor("w", &[4], 0, 0).tensor("w", &[4], 0, 32).pad(32);
    e.bytes.resize(e.bytes.len() + 64, 0);
    expect_err(e.bytes, &["tensor 'w': duplicate tensor name"]);
}

#[test]
fn tensor_data_refuses_a_foreign_tensor_info() {
    let file = GgufFile::from_bytes(base_file().bytes).unwrap();
    let foreign = TensorInfo { name: "t.q8".into(), dims: vec![32], ty: GgmlType::Q8_0, offset: 1 << 40, n_bytes: 34 };
    let result = std::panic::catch_unwind(|| file.tensor_data(&foreign).len());
    assert!(result.is_err(), "a TensorInfo that is not this file's must not yield bytes");
    let own = file.tensor("t.q8").unwrap().clone();
    assert_eq!(file.tensor_data(&own).len(), Q8_TENSOR_BYTES);
}

#[test]
fn io_error_names_the_path() {
    let err = GgufFile::open("/nonexistent/dir/model.gguf").unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/dir/model.gguf"), "{err}");
}
