//! Parsing and validating a GGUF file.
//!
//! The whole file is checked once, in [`GgufFile::open`] / [`GgufFile::from_bytes`]:
//! header, every metadata value, every tensor-table entry, and the bounds of
//! every tensor's data. After that the accessors cannot fail, and
//! [`GgufFile::tensor_data`] hands out slices already known to lie inside the
//! file.
//!
//! Nothing read from the file is trusted. In particular no allocation is sized
//! by a count from the file until that count has been checked against the bytes
//! that remain (every element takes at least one byte, so a count larger than
//! the rest of the file is a lie), and all offset arithmetic is checked.

use crate::{GgmlType, Value, ValueType};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;

/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Largest `general.alignment` accepted. ggml writes 32; page-aligning writers
/// use 4 KiB or 64 KiB. Anything past 1 MiB is not a layout choice but a
/// corrupted value.
pub const MAX_ALIGNMENT: u64 = 1 << 20;

/// Deepest nesting of arrays inside arrays. Real files nest at most once; the
/// bound keeps a hostile file from recursing the parser off its stack.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Longest metadata key, in bytes (the GGUF spec's limit, 2^16 - 1).
pub const MAX_KEY_LEN: u64 = 65_535;

/// Longest tensor name, in bytes. ggml itself uses 64; we are more lenient but
/// still refuse names that can only be corruption.
pub const MAX_TENSOR_NAME_LEN: u64 = 65_535;

/// Most metadata values (array elements included) one file may hold.
///
/// Each decoded [`Value`] takes 32 bytes of memory but may take as little as
/// one byte in the file, so without a cap a large hostile file of `u8` arrays
/// would make us allocate 32x its size. The largest real vocabularies (256K
/// tokens, plus scores, token types and merges) stay near 1M values, so 16M
/// leaves ample room while bounding the memory to 512 MiB.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;

/// What is wrong with a file. Every message names the offending item.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid GGUF file: {0}")]
    Invalid(String),
    /// A well-formed header with a version this crate does not read.
    #[error("unsupported GGUF version {version}: {hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one,
    /// so a weight matrix of `rows × cols` has `dims == [cols, rows]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section (validated).
    pub offset: u64,
    /// Size of the data in bytes (validated to lie inside the file).
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Where the file's bytes live. Mapping keeps a multi-gigabyte model out of
/// the heap; the owned form serves tests and fuzzing.
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(vec) => vec,
        }
    }
}

/// A validated GGUF file, memory-mapped (or held in memory).
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: u64,
    /// Absolute file offset of the data section (already aligned).
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes and the full metadata (vocabularies) are too big to print.
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("alignment", &self.alignment)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates `path`.
    ///
    /// The mapping assumes nobody truncates or rewrites the file while it is
    /// open, as every memory-mapping model loader does; files are replaced by
    /// writing a new one and renaming it (see `GgufWriter::write_file`), which
    /// leaves existing mappings intact.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io_error = |source| GgufError::Io { path: path.display().to_string(), source };
        let file = File::open(path).map_err(io_error)?;
        let len = file.metadata().map_err(io_error)?.len();
        let storage = if len == 0 {
            // Mapping an empty file fails on some platforms; parsing an empty
            // buffer gives the better error ("too short for the header").
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and we hand out only shared slices
            // of it. Soundness further needs the file to stay unchanged while
            // mapped, which is the documented contract of `open`.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_error)?;
            Storage::Mapped(map)
        };
        GgufFile::parse(storage)
    }

    /// Validates a file held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(Storage::Owned(bytes))
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the data section (the tensors' bytes) starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor of this file (bounds were checked at open).
    ///
    /// # Panics
    /// If `t` is not a tensor of this file (its name, offset or size differ
    /// from this file's entry): a `TensorInfo` from another file would
    /// otherwise silently yield the wrong bytes. Use
    /// [`GgufFile::tensor_data_by_name`] for a non-panicking lookup.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        match self.tensor(&t.name) {
            Some(own) if own.offset == t.offset && own.n_bytes == t.n_bytes => self.slice_of(own),
            _ => panic!(
                "tensor_data: tensor '{}' [offset {}, {} bytes] is not a tensor of this GGUF file",
                t.name, t.offset, t.n_bytes
            ),
        }
    }

    /// The bytes of the tensor called `name`, or `None` if there is none.
    pub fn tensor_data_by_name(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.slice_of(t))
    }

    /// Tells the OS this process no longer needs the pages holding `bytes`
    /// (a slice of this file's data, e.g. a tensor a loader has copied
    /// elsewhere): they leave the process's resident memory, and reading
    /// them later still works (the pages come back from the file). Does
    /// nothing for a file held in memory or a slice from elsewhere. Advice
    /// only: errors are ignored.
    pub fn release_pages(&self, bytes: &[u8]) {
        if let Storage::Mapped(map) = &self.storage {
            let (start, end) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
            let at = bytes.as_ptr() as usize;
            if bytes.is_empty() || at < start || at + bytes.len() > end {
                return;
            }
            // SAFETY: the map is a read-only mapping of a file that stays
            // unchanged while mapped (the contract of `open`), so dropping
            // its pages only means later reads fault them back in with the
            // same contents; no reference sees different bytes.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at - start, bytes.len()) };
        }
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// The data of one of our own (validated) entries.
    fn slice_of(&self, t: &TensorInfo) -> &[u8] {
        // Validated at parse time: data_offset + offset + n_bytes <= file size,
        // with no overflow, so these casts and the range are exact.
        let start = (self.data_offset + t.offset) as usize;
        &self.storage.bytes()[start..start + t.n_bytes as usize]
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let parsed = Parser::new(storage.bytes()).parse()?;
        Ok(GgufFile {
            storage,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            metadata_index: parsed.metadata_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }
}

/// Metadata entries in file order.
type Metadata = Vec<(String, Value)>;

/// Everything [`Parser::parse`] extracts; the bytes stay with the caller.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// Builds an `Invalid` error. Messages quote names and keys read from the
/// untrusted file, so control characters are escaped: an error stays one line
/// and cannot rewrite the user's terminal.
pub(crate) fn invalid(message: String) -> GgufError {
    let one_line = if message.chars().any(char::is_control) {
        message.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
    } else {
        message
    };
    GgufError::Invalid(one_line)
}

/// Fewest bytes a metadata entry can take: key length (u64), value type (u32)
/// and a one-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;

/// Fewest bytes a tensor-table entry can take: name length (u64), n_dims (u32),
/// one dimension (u64), type (u32), offset (u64).
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 8 + 4 + 8;

/// A cursor over the untrusted bytes. Every read checks that the bytes are
/// there and says what was being read when they are not.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Metadata values still allowed (see [`MAX_METADATA_VALUES`]).
    values_left: u64,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8]) -> Parser<'a> {
        Parser { bytes, pos: 0, values_left: MAX_METADATA_VALUES }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Takes `n` bytes; `what` describes them for the error (built only on
    /// failure, as this runs for every token of a vocabulary).
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(invalid(format!(
                "{}: needs {} bytes at offset {} but the file ends at {} bytes",
                what(),
                n,
                self.pos,
                self.file_size()
            )));
        }
        // n <= remaining <= usize::MAX, so the cast is exact.
        let slice = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string of at most `max_len` bytes.
    fn string(&mut self, max_len: u64, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len_at = self.pos;
        let len = self.u64(&|| format!("{} (length)", what()))?;
        if len > max_len {
            return Err(invalid(format!(
                "{}: string length {} at offset {} exceeds the limit of {} bytes",
                what(),
                len,
                len_at,
                max_len
            )));
        }
        let start = self.pos;
        let raw = self.take(len, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(invalid(format!(
                "{}: string at offset {} is not valid UTF-8 (bad byte at offset {})",
                what(),
                start,
                start + e.valid_up_to()
            ))),
        }
    }

    /// Rejects a count of `count` items, each at least `min_size` bytes, that
    /// the rest of the file cannot hold. After this, `count` is a safe
    /// capacity: it is at most the number of remaining bytes.
    fn check_count(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<(), GgufError> {
        let fits = count.checked_mul(min_size).is_some_and(|needed| needed <= self.remaining());
        if fits {
            Ok(())
        } else {
            Err(invalid(format!(
                "{}: {} items of at least {} bytes each cannot fit in the {} bytes left after offset {}",
                what(),
                count,
                min_size,
                self.remaining(),
                self.pos
            )))
        }
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        let version = self.header()?;

        let tensor_count = self.u64(&|| "header: tensor_count".to_string())?;
        let kv_count = self.u64(&|| "header: kv_count".to_string())?;
        // Each count is checked alone against the whole rest of the file; the
        // per-entry reads below catch the combination.
        self.check_count(kv_count, MIN_KV_SIZE, &|| format!("header: kv_count {kv_count}"))?;
        self.check_count(tensor_count, MIN_TENSOR_INFO_SIZE, &|| format!("header: tensor_count {tensor_count}"))?;

        let (metadata, metadata_index) = self.metadata(kv_count)?;
        let alignment = alignment_of(&metadata, &metadata_index)?;
        let (tensors, tensor_index) = self.tensor_table(tensor_count, alignment)?;

        // The data section starts at the first aligned offset after the table.
        let table_end = self.pos as u64;
        let data_offset = table_end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| invalid(format!("data section: offset {table_end} cannot be aligned to {alignment}")))?;
        let file_size = self.file_size();
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|start| start.checked_add(t.n_bytes));
            if end.is_none_or(|end| end > file_size) {
                return Err(invalid(format!(
                    "tensor '{}': data [offset {}, {} bytes] runs past the end of the file ({} bytes; data section starts at {})",
                    t.name, t.offset, t.n_bytes, file_size, data_offset
                )));
            }
        }
        Ok(Parsed { version, alignment, data_offset, metadata, metadata_index, tensors, tensor_index })
    }

    /// Magic and version; returns the version.
    fn header(&mut self) -> Result<u32, GgufError> {
        if self.file_size() < 24 {
            // Checked up front so a stub of a file gets one clear message
            // instead of "needs 4 bytes for the magic".
            if self.bytes.len() < 4 || &self.bytes[..4] != b"GGUF" {
                return Err(invalid(format!(
                    "file is {} bytes, too short for the 24-byte GGUF header",
                    self.file_size()
                )));
            }
        }
        let magic = self.array::<4>(&|| "header: magic".to_string())?;
        if &magic != b"GGUF" {
            return Err(invalid(format!(
                "wrong magic {:02x?} ({:?}), expected \"GGUF\"",
                magic,
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = self.u32(&|| "header: version".to_string())?;
        match version {
            2 | 3 => Ok(version),
            1 => Err(GgufError::UnsupportedVersion {
                version,
                hint: "GGUF v1 (32-bit counts) is obsolete; re-convert the model to GGUF v3",
            }),
            v if matches!(v.swap_bytes(), 2 | 3) => Err(GgufError::UnsupportedVersion {
                version,
                hint: "this looks like a big-endian GGUF file; only little-endian files are supported",
            }),
            _ => Err(GgufError::UnsupportedVersion { version, hint: "only versions 2 and 3 are supported" }),
        }
    }

    fn metadata(&mut self, kv_count: u64) -> Result<(Metadata, HashMap<String, usize>), GgufError> {
        let mut metadata = Vec::with_capacity(initial_capacity(kv_count));
        let mut index = HashMap::with_capacity(initial_capacity(kv_count));
        for i in 0..kv_count {
            let key_at = self.pos;
            let key = self.string(MAX_KEY_LEN, &|| format!("metadata entry {i}: key"))?;
            let type_at = self.pos;
            let type_id = self.u32(&|| format!("metadata '{key}': value type"))?;
            let ty = self.value_type(type_id, &key, type_at)?;
            self.reserve_values(1, &key)?;
            let value = self.value(ty, &key, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(invalid(format!("metadata '{key}': duplicate key (second one at offset {key_at})")));
            }
            metadata.push((key, value));
        }
        Ok((metadata, index))
    }

    fn value_type(&self, type_id: u32, key: &str, at: usize) -> Result<ValueType, GgufError> {
        ValueType::from_id(type_id)
            .ok_or_else(|| invalid(format!("metadata '{key}': unknown value type {type_id} at offset {at}")))
    }

    /// Counts `n` more values against [`MAX_METADATA_VALUES`]. Arrays reserve
    /// their whole length before allocating, so even nested arrays that are
    /// all still being read cannot together exceed the cap.
    fn reserve_values(&mut self, n: u64, key: &str) -> Result<(), GgufError> {
        match self.values_left.checked_sub(n) {
            Some(left) => {
                self.values_left = left;
                Ok(())
            }
            None => Err(invalid(format!(
                "metadata '{key}': {n} more values exceed the limit of {MAX_METADATA_VALUES} metadata values per file"
            ))),
        }
    }

    /// One value of type `ty` for `key`, `depth` arrays deep (already counted
    /// by [`Parser::reserve_values`]).
    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let at = self.pos;
        let what = || format!("metadata '{key}': {ty} value");
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(&what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => {
                    return Err(invalid(format!("metadata '{key}': bool value {other} at offset {at} is not 0 or 1")))
                }
            },
            // Values are not length-limited beyond the file itself: a chat
            // template can legitimately run to tens of kilobytes.
            ValueType::String => Value::String(self.string(u64::MAX, &what)?),
            ValueType::Array => self.array_value(key, depth + 1)?,
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Value, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(invalid(format!(
                "metadata '{key}': arrays nested more than {MAX_ARRAY_DEPTH} deep at offset {}",
                self.pos
            )));
        }
        let elem_type_at = self.pos;
        let elem_type_id = self.u32(&|| format!("metadata '{key}': array element type"))?;
        let elem_type = self.value_type(elem_type_id, key, elem_type_at)?;
        let count = self.u64(&|| format!("metadata '{key}': array length"))?;
        self.check_count(count, elem_type.min_encoded_size() as u64, &|| {
            format!("metadata '{key}': array of {count} {elem_type} values")
        })?;
        self.reserve_values(count, key)?;
        let mut elems = Vec::with_capacity(initial_capacity(count));
        for _ in 0..count {
            elems.push(self.value(elem_type, key, depth)?);
        }
        Ok(Value::Array(elem_type, elems))
    }

    fn tensor_table(
        &mut self,
        tensor_count: u64,
        alignment: u64,
    ) -> Result<(Vec<TensorInfo>, HashMap<String, usize>), GgufError> {
        let mut tensors = Vec::with_capacity(initial_capacity(tensor_count));
        let mut index = HashMap::with_capacity(initial_capacity(tensor_count));
        for i in 0..tensor_count {
            let info_at = self.pos;
            let name = self.string(MAX_TENSOR_NAME_LEN, &|| format!("tensor {i}: name"))?;
            let info = self.tensor_info(name, alignment)?;
            if index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(invalid(format!(
                    "tensor '{}': duplicate tensor name (second one at offset {info_at})",
                    info.name
                )));
            }
            tensors.push(info);
        }
        Ok((tensors, index))
    }

    /// The rest of a tensor-table entry after its name.
    fn tensor_info(&mut self, name: String, alignment: u64) -> Result<TensorInfo, GgufError> {
        let n_dims = self.u32(&|| format!("tensor '{name}': n_dims"))?;
        if !(1..=MAX_DIMS as u32).contains(&n_dims) {
            return Err(invalid(format!("tensor '{name}': n_dims {n_dims} is not in 1..={MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for d in 0..n_dims {
            let dim = self.u64(&|| format!("tensor '{name}': dimension {d}"))?;
            if dim == 0 {
                return Err(invalid(format!("tensor '{name}': dimension {d} is 0")));
            }
            n_elements = n_elements.checked_mul(dim).ok_or_else(|| {
                invalid(format!("tensor '{name}': element count overflows (dimensions so far {dims:?} × {dim})"))
            })?;
            dims.push(dim);
        }
        // ggml stores element counts as i64.
        if n_elements > i64::MAX as u64 {
            return Err(invalid(format!("tensor '{name}': {n_elements} elements is more than ggml can address")));
        }
        let type_id = self.u32(&|| format!("tensor '{name}': type"))?;
        let ty = GgmlType::from_id(type_id)
            .ok_or_else(|| invalid(format!("tensor '{name}': unknown or unsupported ggml type id {type_id}")))?;
        // Kernels work row by row, so each row (dims[0] elements) must be a
        // whole number of blocks, not merely the tensor as a whole.
        let block_size = ty.block_size() as u64;
        if !dims[0].is_multiple_of(block_size) {
            return Err(invalid(format!(
                "tensor '{name}': innermost dimension {} is not a multiple of the {ty} block size {block_size}",
                dims[0]
            )));
        }
        let n_bytes = ty
            .bytes_for(n_elements)
            .ok_or_else(|| invalid(format!("tensor '{name}': size of {n_elements} {ty} elements overflows")))?;
        let offset = self.u64(&|| format!("tensor '{name}': data offset"))?;
        if !offset.is_multiple_of(alignment) {
            return Err(invalid(format!(
                "tensor '{name}': data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        Ok(TensorInfo { name, dims, ty, offset, n_bytes })
    }
}

/// Capacity to reserve for `count` entries announced by the file.
///
/// `count` has been checked against the remaining bytes, but an entry in
/// memory can be several times larger than its smallest encoding (a 32-byte
/// `Value` for a 1-byte `u8`, a 72-byte `TensorInfo` for a 32-byte table
/// entry). Reserving at most 64K up front keeps the memory proportional to
/// what has actually been parsed; longer arrays grow as they are read.
fn initial_capacity(count: u64) -> usize {
    count.min(1 << 16) as usize
}

/// The data alignment declared by `general.alignment`, validated.
fn alignment_of(metadata: &[(String, Value)], index: &HashMap<String, usize>) -> Result<u64, GgufError> {
    let Some(&i) = index.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let value = &metadata[i].1;
    // The spec says u32; accept any non-negative integer type but not a bool,
    // which `as_u64` would otherwise turn into 0 or 1.
    let alignment = match value {
        Value::Bool(_) => None,
        v => v.as_u64(),
    }
    .ok_or_else(|| {
        invalid(format!(
            "metadata 'general.alignment': expected an unsigned integer, found a {} value",
            value.value_type()
        ))
    })?;
    if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
        return Err(invalid(format!(
            "metadata 'general.alignment': {alignment} is not a power of two in 1..={MAX_ALIGNMENT}"
        )));
    }
    Ok(alignment)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine shares one mapped model between threads.
    #[test]
    fn gguf_file_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GgufFile>();
        assert_send_sync::<GgufError>();
    }

    #[test]
    fn minimal_file_without_tensors_or_metadata() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let file = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(file.alignment(), DEFAULT_ALIGNMENT);
        // The data section would start at the next aligned offset, past the
        // end of this file: harmless, as there is no tensor to read there.
        assert_eq!(file.data_offset(), 32);
        assert!(file.metadata().is_empty() && file.tensors().is_empty());
        assert!(file.get("general.architecture").is_none() && file.tensor("x").is_none());
        assert_eq!(
            format!("{file:?}"),
            "GgufFile { version: 3, file_size: 24, alignment: 32, n_metadata: 0, n_tensors: 0 }"
        );
    }
}
