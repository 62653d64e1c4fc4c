//! Property tests: mutated valid files never panic the reader, and whatever it
//! accepts is safe to use; random valid files survive a write/read round trip.
//!
//! This is the in-CI stand-in for the cargo-fuzz target in `/fuzz`: a fixed
//! number of cases so it runs in seconds, with mutations aimed at the fields
//! that matter (counts, lengths, offsets) rather than only random bytes.

mod common;

use common::{base_file, Emitter};
use minnow_gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use proptest::prelude::*;

/// One edit to a file. Positions are taken modulo the current length, so any
/// generated edit applies to any file.
#[derive(Debug, Clone)]
enum Mutation {
    FlipByte {
        pos: usize,
        xor: u8,
    },
    Insert {
        pos: usize,
        bytes: Vec<u8>,
    },
    Delete {
        pos: usize,
        len: usize,
    },
    Truncate {
        len: usize,
    },
    /// Overwrite the u64 or u32 starting at the `field`-th marked field.
    OverwriteU64 {
        field: usize,
        value: u64,
    },
    OverwriteU32 {
        field: usize,
        value: u32,
    },
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(31),
        Just(32),
        Just(33),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(1 << 63),
        (0u64..64).prop_map(|k| u64::MAX - k),
        (0u64..4096),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(pos, xor)| Mutation::FlipByte { pos, xor }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(pos, bytes)| Mutation::Insert { pos, bytes }),
        (any::<usize>(), 1usize..32).prop_map(|(pos, len)| Mutation::Delete { pos, len }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), interesting_u64()).prop_map(|(field, value)| Mutation::OverwriteU64 { field, value }),
        (any::<usize>(), interesting_u64()).prop_map(|(field, v)| Mutation::OverwriteU32 { field, value: v as u32 }),
    ]
}

fn apply(bytes: &mut Vec<u8>, fields: &[usize], m: &Mutation) {
    let len = bytes.len();
    if len == 0 {
        return;
    }
    match m {
        Mutation::FlipByte { pos, xor } => bytes[pos % len] ^= xor,
        Mutation::Insert { pos, bytes: new } => {
            let at = pos % (len + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Delete { pos, len: n } => {
            let at = pos % len;
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Truncate { len: n } => bytes.truncate(n % len),
        Mutation::OverwriteU64 { field, value } => {
            let at = fields[field % fields.len()];
            if at + 8 <= len {
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::OverwriteU32 { field, value } => {
            let at = fields[field % fields.len()];
            if at + 4 <= len {
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
    }
}

/// Touches every value, so a value the reader built wrongly would show here.
fn walk(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(ty, elems) => elems
            .iter()
            .map(|e| {
                assert_eq!(e.value_type(), *ty, "array not homogeneous");
                walk(e)
            })
            .sum(),
        other => {
            let _ = (other.as_u64(), other.as_i64(), other.as_f64(), other.as_bool());
            1
        }
    }
}

/// What must hold of any file the reader accepts.
fn check_accepted(file: &GgufFile) {
    let size = file.file_size();
    assert!(file.alignment().is_power_of_two());
    assert_eq!(file.data_offset() % file.alignment(), 0);
    for t in file.tensors() {
        assert!((1..=minnow_gguf::MAX_DIMS).contains(&t.dims.len()));
        assert_eq!(t.ty.bytes_for(t.n_elements()), Some(t.n_bytes));
        assert_eq!(t.offset % file.alignment(), 0);
        assert!(file.data_offset() + t.offset + t.n_bytes <= size);
        assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
        assert!(std::ptr::eq(file.tensor(&t.name).unwrap(), t));
    }
    for (key, value) in file.metadata() {
        walk(value);
        assert!(std::ptr::eq(file.get(key).unwrap(), value));
    }
}

/// The seeds: the marked base file, and a file with deeper array nesting.
fn seeds() -> Vec<Emitter> {
    let mut nested = Emitter::new();
    nested.header(3, 0, 1).kv("deep", "test.deep", ValueType::Array);
    for level in 0..6 {
        nested.mark(format!("level{level}")).u32(ValueType::Array.id()).u64(1);
    }
    nested.mark("leaf").u32(ValueType::U16.id()).u64(2).u32(0x0001_0002);
    vec![base_file(), nested]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(
        seed in 0usize..2,
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let seed = &seeds()[seed];
        let fields: Vec<usize> = seed.marks().collect();
        let mut bytes = seed.bytes.clone();
        for m in &mutations {
            apply(&mut bytes, &fields, m);
        }
        match GgufFile::from_bytes(bytes) {
            Ok(file) => check_accepted(&file),
            Err(e) => prop_assert!(!e.to_string().contains('\n')),
        }
    }
}

// ---- random valid files round-trip through the writer ----

fn leaf_value(ty: ValueType) -> BoxedStrategy<Value> {
    match ty {
        ValueType::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        ValueType::I8 => any::<i8>().prop_map(Value::I8).boxed(),
        ValueType::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        ValueType::I16 => any::<i16>().prop_map(Value::I16).boxed(),
        ValueType::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        ValueType::I32 => any::<i32>().prop_map(Value::I32).boxed(),
        // NaN != NaN would break the equality check, not the format.
        ValueType::F32 => (-1e30f32..1e30).prop_map(Value::F32).boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::String => ".{0,12}".prop_map(Value::String).boxed(),
        ValueType::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        ValueType::I64 => any::<i64>().prop_map(Value::I64).boxed(),
        ValueType::F64 => (-1e300f64..1e300).prop_map(Value::F64).boxed(),
        ValueType::Array => unreachable!("arrays are built by value()"),
    }
}

fn leaf_type() -> impl Strategy<Value = ValueType> {
    proptest::sample::select(ValueType::ALL.iter().copied().filter(|t| *t != ValueType::Array).collect::<Vec<_>>())
}

/// A value of any type, arrays homogeneous and nested up to three deep.
fn value() -> impl Strategy<Value = Value> {
    leaf_type().prop_flat_map(leaf_value).prop_recursive(3, 64, 8, |inner| {
        // An array's elements share one type: pick a template element, then
        // keep only generated elements of that type.
        (inner.clone(), proptest::collection::vec(inner, 0..8)).prop_map(|(first, rest)| {
            let ty = first.value_type();
            let mut elems = vec![first];
            elems.extend(rest.into_iter().filter(|v| v.value_type() == ty && !matches!(v, Value::Array(..))));
            Value::Array(ty, elems)
        })
    })
}

fn tensor_type() -> impl Strategy<Value = GgmlType> {
    proptest::sample::select(GgmlType::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_files_round_trip(
        metadata in proptest::collection::vec(value(), 0..6),
        tensors in proptest::collection::vec((tensor_type(), 1u64..3, 1u64..4, any::<u8>()), 0..5),
        alignment_log2 in proptest::option::of(0u32..9),
    ) {
        let mut writer = GgufWriter::new();
        if let Some(log2) = alignment_log2 {
            writer.add_metadata("general.alignment", Value::U32(1 << log2)).unwrap();
        }
        for (i, v) in metadata.iter().enumerate() {
            writer.add_metadata(format!("test.key{i}"), v.clone()).unwrap();
        }
        let mut datas = Vec::new();
        for (i, &(ty, blocks, rows, fill)) in tensors.iter().enumerate() {
            let dims = [blocks * ty.block_size() as u64, rows];
            let n_bytes = ty.bytes_for(dims[0] * dims[1]).unwrap() as usize;
            let data: Vec<u8> = (0..n_bytes).map(|b| fill.wrapping_add(b as u8)).collect();
            writer.add_tensor(format!("t{i}"), &dims, ty, data.clone()).unwrap();
            datas.push(data);
        }
        let bytes = writer.to_bytes();
        let file = GgufFile::from_bytes(bytes.clone()).unwrap();
        check_accepted(&file);
        prop_assert_eq!(file.alignment(), 1u64 << alignment_log2.unwrap_or(5));
        prop_assert_eq!(file.tensors().len(), tensors.len());
        for (i, data) in datas.iter().enumerate() {
            prop_assert_eq!(file.tensor_data_by_name(&format!("t{i}")).unwrap(), &data[..]);
        }
        for (i, v) in metadata.iter().enumerate() {
            prop_assert_eq!(file.get(&format!("test.key{i}")), Some(v));
        }
        // And writing what was read reproduces the bytes.
        prop_assert_eq!(GgufWriter::from_file(&file).to_bytes(), bytes);
    }
}
