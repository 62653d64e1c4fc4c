//! Byte-level builders for hand-made GGUF files, shared by the hostile-file
//! tests and the property tests.
//!
//! The writer refuses to produce broken files, so broken files are made here:
//! [`Emitter`] writes raw fields and remembers where each named one starts,
//! letting a test overwrite exactly the field it wants to break.
#![allow(dead_code)] // each test binary uses a different part

use minnow_gguf::{GgmlType, GgufWriter, Value, ValueType};

/// Raw little-endian GGUF fields, with named positions.
#[derive(Default, Clone)]
pub struct Emitter {
    pub bytes: Vec<u8>,
    marks: Vec<(String, usize)>,
}

impl Emitter {
    pub fn new() -> Emitter {
        Emitter::default()
    }

    /// Remembers the current position under `name`.
    pub fn mark(&mut self, name: impl Into<String>) -> &mut Self {
        self.marks.push((name.into(), self.bytes.len()));
        self
    }

    /// Where the field `name` starts.
    pub fn at(&self, name: &str) -> usize {
        self.marks.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no mark '{name}'")).1
    }

    /// All named positions (field starts), for the property tests.
    pub fn marks(&self) -> impl Iterator<Item = usize> + '_ {
        self.marks.iter().map(|(_, pos)| *pos)
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.raw(&[v])
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    /// A GGUF string: u64 length, then the bytes (not necessarily UTF-8).
    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64).raw(s)
    }
    /// The 24-byte header.
    pub fn header(&mut self, version: u32, tensor_count: u64, kv_count: u64) -> &mut Self {
        self.mark("magic").raw(b"GGUF");
        self.mark("version").u32(version);
        self.mark("tensor_count").u64(tensor_count);
        self.mark("kv_count").u64(kv_count)
    }
    /// A metadata key and value type; the caller writes the value.
    pub fn kv(&mut self, name: &str, key: &str, ty: ValueType) -> &mut Self {
        self.mark(format!("{name}.key")).string(key.as_bytes());
        self.mark(format!("{name}.type")).u32(ty.id());
        self.mark(format!("{name}.value"))
    }
    /// A tensor-table entry.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty_id: u32, offset: u64) -> &mut Self {
        self.mark(format!("{name}.name")).string(name.as_bytes());
        self.mark(format!("{name}.n_dims")).u32(dims.len() as u32);
        self.mark(format!("{name}.dims"));
        for &d in dims {
            self.u64(d);
        }
        self.mark(format!("{name}.ggml_type")).u32(ty_id);
        self.mark(format!("{name}.offset")).u64(offset)
    }
    /// Zero padding up to a multiple of `alignment`.
    pub fn pad(&mut self, alignment: usize) -> &mut Self {
        let len = self.bytes.len().next_multiple_of(alignment);
        self.bytes.resize(len, 0);
        self
    }

    pub fn set_u32(&mut self, pos: usize, v: u32) -> &mut Self {
        self.bytes[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    pub fn set_u64(&mut self, pos: usize, v: u64) -> &mut Self {
        self.bytes[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
        self
    }
}

/// Data of the base file's first tensor, `t.f32`: 4 × F32.
pub const F32_TENSOR_BYTES: usize = 16;
/// Data of the base file's second tensor, `t.q8`: [32, 2] × Q8_0 = 2 blocks.
pub const Q8_TENSOR_BYTES: usize = 68;

/// A small valid file touching every part of the format: strings, a bool, an
/// explicit alignment, a string array, an array of arrays, and two tensors
/// (plain and block-quantized). Every field is marked.
pub fn base_file() -> Emitter {
    let mut e = Emitter::new();
    e.header(3, 2, 5);
    e.kv("arch", "general.architecture", ValueType::String).string(b"test");
    e.kv("align", "general.alignment", ValueType::U32).u32(32);
    e.kv("flag", "test.flag", ValueType::Bool).u8(1);
    e.kv("tokens", "test.tokens", ValueType::Array).u32(ValueType::String.id()).mark("tokens.count").u64(2);
    e.mark("tokens.elem0").string(b"a").mark("tokens.elem1").string(b"bc");
    e.kv("nested", "test.nested", ValueType::Array).u32(ValueType::Array.id()).u64(2);
    e.mark("nested.inner0").u32(ValueType::U8.id()).u64(2).raw(&[1, 2]);
    e.mark("nested.inner1").u32(ValueType::U8.id()).u64(1).raw(&[3]);
    e.tensor("t.f32", &[4], GgmlType::F32.id(), 0);
    e.tensor("t.q8", &[32, 2], GgmlType::Q8_0.id(), 32);
    e.mark("table_end").pad(32).mark("data");
    e.mark("t.f32.data").raw(&tensor_f32_data()).pad(32);
    e.mark("t.q8.data").raw(&tensor_q8_data()).mark("data_end").pad(32);
    e
}

pub fn tensor_f32_data() -> Vec<u8> {
    [1.0f32, -2.0, 3.5, 0.25].iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn tensor_q8_data() -> Vec<u8> {
    (0..Q8_TENSOR_BYTES as u8).collect()
}

/// The same file as [`base_file`], made by the writer.
pub fn base_file_from_writer() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("test".into())).unwrap();
    w.add_metadata("general.alignment", Value::U32(32)).unwrap();
    w.add_metadata("test.flag", Value::Bool(true)).unwrap();
    let tokens = vec![Value::String("a".into()), Value::String("bc".into())];
    w.add_metadata("test.tokens", Value::Array(ValueType::String, tokens)).unwrap();
    let inner0 = Value::Array(ValueType::U8, vec![Value::U8(1), Value::U8(2)]);
    let inner1 = Value::Array(ValueType::U8, vec![Value::U8(3)]);
    w.add_metadata("test.nested", Value::Array(ValueType::Array, vec![inner0, inner1])).unwrap();
    w.add_tensor("t.f32", &[4], GgmlType::F32, tensor_f32_data()).unwrap();
    w.add_tensor("t.q8", &[32, 2], GgmlType::Q8_0, tensor_q8_data()).unwrap();
    w.to_bytes()
}
