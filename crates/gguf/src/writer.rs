//! Writing GGUF v3 files.
//!
//! [`GgufWriter`] collects metadata and tensors, checking each as it is added
//! against the same rules the reader enforces, so that whatever it writes reads
//! back: a writer that could produce files our own reader rejects would only
//! move the error to a later, more confusing place.
//!
//! Layout written: header, metadata, tensor table, zero padding to the
//! alignment, then each tensor's data padded with zeros to the alignment, in the
//! order the tensors were added. Tensor data may be borrowed (e.g. from a mapped
//! [`GgufFile`]) so rewriting a multi-gigabyte model copies nothing into memory.
//!
//! Tensor data may also be *streamed* ([`GgufWriter::add_tensor_streamed`]):
//! a producer that writes a tensor's bytes only when the file is written, so
//! a tool that derives many large tensors (requantizing, stacking copies of
//! a matrix) holds one at a time rather than the whole file. The size is
//! declared up front (the tensor table precedes the data) and enforced.
//! Quantizing f32 values to a block format lives in the kernels crate
//! (`minnow_kernels::quantize`), which depends on this one, not the reverse.
//!
//! [`GgufWriter::write_split`] writes the same model as several files in
//! llama.cpp's `gguf-split` layout (see the reader's module docs): each part
//! laid out as above, the model's metadata in the first, the `split.*` keys
//! in every one.

use crate::reader::{
    invalid, split_file_name, DEFAULT_ALIGNMENT, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_LEN,
    MAX_SPLIT_PARTS, MAX_TENSOR_NAME_LEN, SPLIT_KEYS,
};
use crate::{GgmlType, GgufError, GgufFile, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The GGUF version this writer produces.
pub const WRITE_VERSION: u32 = 3;

/// Writes a streamed tensor's bytes; see [`GgufWriter::add_tensor_streamed`].
/// `Send + Sync` so a writer stays as shareable as its borrowed data.
type TensorProducer<'a> = Box<dyn Fn(&mut dyn Write) -> io::Result<()> + Send + Sync + 'a>;

/// Where a pending tensor's bytes come from.
enum TensorData<'a> {
    Bytes(Cow<'a, [u8]>),
    Streamed { len: u64, produce: TensorProducer<'a> },
}

impl TensorData<'_> {
    fn len(&self) -> u64 {
        match self {
            TensorData::Bytes(b) => b.len() as u64,
            TensorData::Streamed { len, .. } => *len,
        }
    }
}

/// One tensor waiting to be written.
struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: TensorData<'a>,
}

/// Builds a GGUF v3 file. `'a` is the lifetime of borrowed tensor data.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor<'a>>,
    tensor_index: HashMap<String, usize>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> GgufWriter<'a> {
        GgufWriter::default()
    }

    /// A writer holding all of `file`'s metadata and tensors (data borrowed, in
    /// file order): writing it reproduces the file, and it is the starting
    /// point for rewriting one with changes. A split model becomes one file
    /// (its metadata has no `split.*` keys; [`GgufWriter::write_split`]
    /// splits it again).
    pub fn from_file(file: &'a GgufFile) -> GgufWriter<'a> {
        let mut writer = GgufWriter::new();
        // The file was validated by the same rules, so nothing here can fail.
        for (key, value) in file.metadata() {
            writer.add_metadata(key.clone(), value.clone()).expect("validated metadata");
        }
        for t in file.tensors() {
            writer.add_tensor(t.name.clone(), &t.dims, t.ty, file.tensor_data(t)).expect("validated tensor");
        }
        writer
    }

    /// Adds a metadata entry. Fails on a duplicate key, a key or nesting the
    /// reader would refuse, an array whose elements do not match its declared
    /// element type, or an invalid `general.alignment`.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufError> {
        let key = key.into();
        if self.metadata_index.contains_key(&key) {
            return Err(invalid(format!("metadata '{key}': duplicate key")));
        }
        check_metadata(&key, &value)?;
        self.metadata_index.insert(key.clone(), self.metadata.len());
        self.metadata.push((key, value));
        Ok(())
    }

    /// Adds or replaces a metadata entry (a replaced entry keeps its position).
    pub fn set_metadata(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufError> {
        let key = key.into();
        match self.metadata_index.get(&key) {
            Some(&i) => {
                check_metadata(&key, &value)?;
                self.metadata[i].1 = value;
                Ok(())
            }
            None => self.add_metadata(key, value),
        }
    }

    /// Adds a tensor. `dims` are in ggml order (innermost first); `data` must be
    /// exactly the size that `ty` needs for that many elements.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        let data = data.into();
        let n_bytes = self.check_tensor(&name, dims, ty)?;
        if data.len() as u64 != n_bytes {
            return Err(invalid(format!(
                "tensor '{name}': {dims:?} {ty} needs {n_bytes} bytes of data, got {}",
                data.len()
            )));
        }
        self.push_tensor(name, dims, ty, TensorData::Bytes(data));
        Ok(())
    }

    /// Adds a tensor whose bytes `produce` writes when the file is written
    /// (each time it is written: it must write the same bytes every call).
    /// The writer knows the size from `dims` and `ty`; a producer that
    /// writes fewer or more bytes fails the write with an error naming the
    /// tensor (and [`GgufWriter::write_file`] then leaves no file behind).
    /// Returns the number of bytes the producer must write.
    pub fn add_tensor_streamed(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        produce: impl Fn(&mut dyn Write) -> io::Result<()> + Send + Sync + 'a,
    ) -> Result<u64, GgufError> {
        let name = name.into();
        let len = self.check_tensor(&name, dims, ty)?;
        self.push_tensor(name, dims, ty, TensorData::Streamed { len, produce: Box::new(produce) });
        Ok(len)
    }

    /// The tensors added so far: name, ggml dims and type, in file order.
    pub fn tensor_infos(&self) -> impl Iterator<Item = (&str, &[u64], GgmlType)> {
        self.tensors.iter().map(|t| (t.name.as_str(), t.dims.as_slice(), t.ty))
    }

    /// Checks a tensor's name, dims and type against the reader's rules and
    /// returns the size of its data in bytes.
    fn check_tensor(&self, name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
        if self.tensor_index.contains_key(name) {
            return Err(invalid(format!("tensor '{name}': duplicate tensor name")));
        }
        if name.len() as u64 > MAX_TENSOR_NAME_LEN {
            return Err(invalid(format!("tensor '{name}': name longer than {MAX_TENSOR_NAME_LEN} bytes")));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(invalid(format!("tensor '{name}': {} dimensions is not in 1..={MAX_DIMS}", dims.len())));
        }
        if let Some(d) = dims.iter().position(|&d| d == 0) {
            return Err(invalid(format!("tensor '{name}': dimension {d} is 0")));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| invalid(format!("tensor '{name}': element count of {dims:?} overflows")))?;
        let block_size = ty.block_size() as u64;
        if !dims[0].is_multiple_of(block_size) {
            return Err(invalid(format!(
                "tensor '{name}': innermost dimension {} is not a multiple of the {ty} block size {block_size}",
                dims[0]
            )));
        }
        ty.bytes_for(n_elements)
            .ok_or_else(|| invalid(format!("tensor '{name}': size of {n_elements} {ty} elements overflows")))
    }

    fn push_tensor(&mut self, name: String, dims: &[u64], ty: GgmlType, data: TensorData<'a>) {
        self.tensor_index.insert(name.clone(), self.tensors.len());
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ty, data });
    }

    /// The alignment the file will be written with (`general.alignment` if
    /// set, else 32).
    pub fn alignment(&self) -> u64 {
        self.metadata_index
            .get("general.alignment")
            .and_then(|&i| self.metadata[i].1.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Writes the file to `out`.
    pub fn write_to(&self, out: impl Write) -> io::Result<()> {
        let metadata: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        write_gguf(out, &metadata, &self.tensors, self.alignment())
    }

    /// The whole file in memory (tests, small files).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.write_to(&mut bytes).expect("writing to a Vec cannot fail");
        bytes
    }

    /// Writes the file to `path` atomically: to a temporary file in the same
    /// directory, synced, then renamed over `path`. A crash or error leaves
    /// either the old file or the new one, never a torn one, and readers that
    /// have the old file mapped keep seeing the old contents.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let io_error = |source| GgufError::Io { path: path.display().to_string(), source };
        let temp = write_temp(path, |out| self.write_to(out)).map_err(io_error)?;
        rename_into_place(&temp, path).map_err(io_error)
    }

    /// Writes the model as a split model in llama.cpp's `gguf-split` layout:
    /// files `PREFIX-00001-of-0000N.gguf` … `PREFIX-0000N-of-0000N.gguf`
    /// (`prefix` is a path; the suffix is appended to its file name), each
    /// holding up to `max_tensors_per_part` tensors in order, and returns
    /// their paths in part order. Every part gets `split.no`, `split.count`
    /// and `split.tensors.count`; the first also all of the model's other
    /// metadata (any `split.*` keys in this writer are replaced), later
    /// parts only `general.alignment` if it is set, so their data is
    /// aligned the same way. A model without tensors is one part.
    ///
    /// Every part is written to a temporary file first and only then are
    /// they renamed into place, so an error leaves the old files, if any,
    /// as they were; each part is replaced atomically, but not the set.
    pub fn write_split(
        &self,
        prefix: impl AsRef<Path>,
        max_tensors_per_part: usize,
    ) -> Result<Vec<PathBuf>, GgufError> {
        let prefix = prefix.as_ref();
        if max_tensors_per_part == 0 {
            return Err(invalid("write_split: max_tensors_per_part must be at least 1".to_string()));
        }
        let n_tensors = self.tensors.len();
        let count = n_tensors.div_ceil(max_tensors_per_part).max(1);
        if count as u64 > MAX_SPLIT_PARTS {
            return Err(invalid(format!(
                "write_split: {n_tensors} tensors at {max_tensors_per_part} per part make {count} parts, more \
                 than the {MAX_SPLIT_PARTS} a split model can have; allow more tensors per part"
            )));
        }
        let total = i32::try_from(n_tensors)
            .map_err(|_| invalid(format!("write_split: {n_tensors} tensors do not fit split.tensors.count (i32)")))?;
        let paths: Vec<PathBuf> = (0..count)
            .map(|k| {
                let mut name = prefix.as_os_str().to_os_string();
                // The name helper formats "{prefix}-NNNNN-of-MMMMM.gguf"; an
                // empty prefix gives just the suffix.
                name.push(split_file_name("", k, count));
                PathBuf::from(name)
            })
            .collect();
        let model_metadata: Vec<(&str, &Value)> = self
            .metadata
            .iter()
            .filter(|(key, _)| !SPLIT_KEYS.contains(&key.as_str()))
            .map(|(key, value)| (key.as_str(), value))
            .collect();
        let alignment = self.alignment();
        let alignment_entry = self.metadata_index.get("general.alignment").map(|&i| &self.metadata[i].1);

        let mut temps: Vec<PathBuf> = Vec::with_capacity(count);
        let remove_temps = |temps: &[PathBuf]| {
            for temp in temps {
                let _ = std::fs::remove_file(temp);
            }
        };
        for (k, path) in paths.iter().enumerate() {
            // count <= MAX_SPLIT_PARTS, so k and count fit in u16.
            // In the order llama.cpp's gguf-split writes them, so that our
            // parts of a model can be byte-identical to its parts.
            let split_values = [Value::U16(k as u16), Value::I32(total), Value::U16(count as u16)];
            let split_entries = ["split.no", "split.tensors.count", "split.count"].into_iter().zip(&split_values);
            let metadata: Vec<(&str, &Value)> = if k == 0 {
                model_metadata.iter().copied().chain(split_entries).collect()
            } else {
                split_entries.chain(alignment_entry.map(|a| ("general.alignment", a))).collect()
            };
            let start = (k * max_tensors_per_part).min(n_tensors);
            let tensors = &self.tensors[start..(start + max_tensors_per_part).min(n_tensors)];
            match write_temp(path, |out| write_gguf(out, &metadata, tensors, alignment)) {
                Ok(temp) => temps.push(temp),
                Err(source) => {
                    remove_temps(&temps);
                    return Err(GgufError::Io { path: path.display().to_string(), source });
                }
            }
        }
        for (i, (temp, path)) in temps.iter().zip(&paths).enumerate() {
            if let Err(source) = rename_into_place(temp, path) {
                remove_temps(&temps[i + 1..]);
                return Err(GgufError::Io { path: path.display().to_string(), source });
            }
        }
        Ok(paths)
    }
}

/// Writes one GGUF file holding `metadata` and `tensors` to `out`.
fn write_gguf(
    out: impl Write,
    metadata: &[(&str, &Value)],
    tensors: &[PendingTensor],
    alignment: u64,
) -> io::Result<()> {
    let mut out = CountingWriter { inner: out, written: 0 };
    // Everything before the data section is small (a vocabulary at most),
    // so it is built in memory; tensor data streams straight from its source.
    out.write_all(&head(metadata, tensors, alignment))?;
    for t in tensors {
        match &t.data {
            TensorData::Bytes(bytes) => out.write_all(bytes)?,
            TensorData::Streamed { len, produce } => {
                let start = out.written;
                let mut limited = LimitedWriter { out: &mut out, left: *len };
                let result = produce(&mut limited);
                let written = out.written - start;
                result.map_err(|e| io::Error::new(e.kind(), format!("tensor '{}': {e}", t.name)))?;
                if written != *len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("tensor '{}': the producer wrote {written} bytes, {len} were declared", t.name),
                    ));
                }
            }
        }
        out.pad_to(alignment)?;
    }
    out.inner.flush()
}

/// Header, metadata, tensor table and the padding up to the data section.
fn head(metadata: &[(&str, &Value)], tensors: &[PendingTensor], alignment: u64) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&WRITE_VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend_from_slice(&value.value_type().id().to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len()).next_multiple_of(alignment);
    }
    head.resize((head.len() as u64).next_multiple_of(alignment) as usize, 0);
    head
}

/// Writes `write`'s output to a new temporary file beside `path`, synced,
/// and returns the temporary file's path (removed again on error).
fn write_temp(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<PathBuf> {
    let file_name =
        path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    // Unique per process and per call, so concurrent writers of the same
    // path never share a temporary file.
    static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    temp_name.push(format!(".{}.{unique}.tmp", std::process::id()));
    let temp_path = path.with_file_name(temp_name);

    let result = (|| {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&temp_path)?;
        let mut buffered = BufWriter::with_capacity(1 << 20, file);
        write(&mut buffered)?;
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(temp_path),
        Err(e) => {
            let _ = std::fs::remove_file(&temp_path);
            Err(e)
        }
    }
}

/// Renames the temporary file `temp` over `path` (removing `temp` if that
/// fails) and makes the rename durable.
fn rename_into_place(temp: &Path, path: &Path) -> io::Result<()> {
    if let Err(e) = std::fs::rename(temp, path) {
        let _ = std::fs::remove_file(temp);
        return Err(e);
    }
    // Make the rename itself durable. Best effort: not every platform can
    // open and sync a directory, and the data is already safe.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Checks one metadata entry against the reader's rules.
fn check_metadata(key: &str, value: &Value) -> Result<(), GgufError> {
    if key.len() as u64 > MAX_KEY_LEN {
        return Err(invalid(format!("metadata '{key}': key longer than {MAX_KEY_LEN} bytes")));
    }
    check_value(key, value, 0)?;
    if key == "general.alignment" {
        let alignment = match value {
            Value::Bool(_) => None,
            v => v.as_u64(),
        };
        if !alignment.is_some_and(|a| a.is_power_of_two() && a <= MAX_ALIGNMENT) {
            return Err(invalid(format!(
                "metadata 'general.alignment': a {} value {} is not a power of two in 1..={MAX_ALIGNMENT}",
                value.value_type(),
                alignment.map_or_else(|| "(not an integer)".to_string(), |a| a.to_string())
            )));
        }
    }
    Ok(())
}

/// Arrays must be homogeneous (the format stores one element type) and nest
/// no deeper than the reader accepts.
fn check_value(key: &str, value: &Value, depth: usize) -> Result<(), GgufError> {
    if let Value::Array(elem_type, elems) = value {
        if depth + 1 > MAX_ARRAY_DEPTH {
            return Err(invalid(format!("metadata '{key}': arrays nested more than {MAX_ARRAY_DEPTH} deep")));
        }
        for (i, elem) in elems.iter().enumerate() {
            if elem.value_type() != *elem_type {
                return Err(invalid(format!(
                    "metadata '{key}': element {i} is a {} in an array of {elem_type}",
                    elem.value_type()
                )));
            }
            check_value(key, elem, depth + 1)?;
        }
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The encoding of a value without its type tag.
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(*v as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(elem_type, elems) => {
            out.extend_from_slice(&elem_type.id().to_le_bytes());
            out.extend_from_slice(&(elems.len() as u64).to_le_bytes());
            for elem in elems {
                put_value(out, elem);
            }
        }
    }
}

/// Tracks the position in the output so data can be padded to the alignment
/// without requiring `Seek`.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, alignment: u64) -> io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut padding = self.written.next_multiple_of(alignment) - self.written;
        while padding > 0 {
            let n = padding.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..n])?;
            padding -= n as u64;
        }
        Ok(())
    }
}

/// Passes at most `left` bytes on to a streamed tensor's output: a producer
/// that writes too much fails at once rather than shifting every later
/// tensor off its declared offset.
struct LimitedWriter<'w, W> {
    out: &'w mut CountingWriter<W>,
    left: u64,
}

impl<W: Write> Write for LimitedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the producer wrote more bytes than were declared"));
        }
        self.out.write_all(buf)?;
        self.left -= buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ValueType;

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn round_trip_small_file() {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String("test".into())).unwrap();
        w.add_metadata("test.count", Value::U32(7)).unwrap();
        w.add_metadata(
            "test.nested",
            Value::Array(ValueType::Array, vec![Value::Array(ValueType::I8, vec![Value::I8(-1), Value::I8(2)])]),
        )
        .unwrap();
        w.add_tensor("a", &[3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0])).unwrap();
        w.add_tensor("b", &[2, 2], GgmlType::F32, f32_bytes(&[4.0, 5.0, 6.0, 7.0])).unwrap();
        let bytes = w.to_bytes();
        assert_eq!(bytes.len() % 32, 0);

        let file = GgufFile::from_bytes(bytes.clone()).unwrap();
        assert_eq!(file.version(), 3);
        assert_eq!(file.metadata().len(), 3);
        assert_eq!(file.get("test.count"), Some(&Value::U32(7)));
        let a = file.tensor("a").unwrap();
        assert_eq!((a.offset, a.n_bytes), (0, 12));
        // The second tensor starts at the next aligned offset.
        assert_eq!(file.tensor("b").unwrap().offset, 32);
        assert_eq!(file.tensor_data_by_name("b").unwrap(), &f32_bytes(&[4.0, 5.0, 6.0, 7.0])[..]);
        // Writing what we read gives the same bytes back.
        assert_eq!(GgufWriter::from_file(&file).to_bytes(), bytes);
    }

    #[test]
    fn honours_alignment() {
        let mut w = GgufWriter::new();
        w.add_metadata("general.alignment", Value::U32(256)).unwrap();
        w.add_tensor("a", &[1], GgmlType::F32, f32_bytes(&[1.0])).unwrap();
        w.add_tensor("b", &[1], GgmlType::F32, f32_bytes(&[2.0])).unwrap();
        let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
        assert_eq!(file.alignment(), 256);
        assert_eq!(file.data_offset() % 256, 0);
        assert_eq!(file.tensor("b").unwrap().offset, 256);
        assert_eq!(file.file_size() % 256, 0);
    }

    #[test]
    fn refuses_what_the_reader_would_refuse() {
        let mut w = GgufWriter::new();
        w.add_metadata("k", Value::U8(1)).unwrap();
        assert!(w.add_metadata("k", Value::U8(2)).unwrap_err().to_string().contains("duplicate key"));
        w.set_metadata("k", Value::U8(3)).unwrap();
        assert_eq!(w.metadata[0].1, Value::U8(3));
        let mixed = Value::Array(ValueType::U8, vec![Value::U8(1), Value::I8(1)]);
        assert!(w.add_metadata("m", mixed).unwrap_err().to_string().contains("element 1 is a i8"));
        for bad in [Value::U32(0), Value::U32(24), Value::U64(1 << 40), Value::Bool(true), Value::String("32".into())] {
            let err = w.add_metadata("general.alignment", bad).unwrap_err().to_string();
            assert!(err.contains("general.alignment"), "{err}");
        }
        let mut deep = Value::Array(ValueType::U8, vec![]);
        for _ in 0..MAX_ARRAY_DEPTH {
            deep = Value::Array(ValueType::Array, vec![deep]);
        }
        assert!(w.add_metadata("deep", deep).unwrap_err().to_string().contains("nested"));

        w.add_tensor("t", &[32], GgmlType::Q8_0, vec![0u8; 34]).unwrap();
        let err = |r: Result<(), GgufError>| r.unwrap_err().to_string();
        assert!(err(w.add_tensor("t", &[32], GgmlType::Q8_0, vec![0u8; 34])).contains("duplicate tensor name"));
        assert!(err(w.add_tensor("u", &[], GgmlType::F32, vec![])).contains("dimensions"));
        assert!(err(w.add_tensor("u", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])).contains("dimensions"));
        assert!(err(w.add_tensor("u", &[0], GgmlType::F32, vec![])).contains("dimension 0 is 0"));
        assert!(err(w.add_tensor("u", &[u64::MAX, 2], GgmlType::F32, vec![])).contains("overflows"));
        assert!(err(w.add_tensor("u", &[16, 2], GgmlType::Q8_0, vec![0; 34])).contains("block size 32"));
        assert!(err(w.add_tensor("u", &[2], GgmlType::F32, vec![0; 4])).contains("needs 8 bytes"));
    }

    #[test]
    fn write_file_is_atomic_and_readable() {
        let dir = std::env::temp_dir().join(format!("minnow-gguf-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("small.gguf");
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String("test".into())).unwrap();
        w.add_tensor("a", &[2], GgmlType::F16, vec![1, 2, 3, 4]).unwrap();
        w.write_file(&path).unwrap();
        // Overwriting replaces the file and leaves no temporary behind.
        w.write_file(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("small.gguf")]);
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.tensor_data_by_name("a"), Some(&[1u8, 2, 3, 4][..]));
        std::fs::remove_dir_all(&dir).unwrap();

        let err = w.write_file(dir.join("missing-dir/x.gguf")).unwrap_err().to_string();
        assert!(err.contains("missing-dir/x.gguf"), "{err}");
    }
}
