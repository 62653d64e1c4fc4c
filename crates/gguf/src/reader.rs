//! Parsing and validating a GGUF file, or a model split into several.
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
//!
//! # Split models
//!
//! llama.cpp's `gguf-split` cuts a model into parts named
//! `PREFIX-00001-of-00003.gguf`, `PREFIX-00002-of-00003.gguf`, … (numbers
//! 1-based, five digits). Each part is a complete GGUF file holding some of
//! the tensors, with offsets relative to its own data section. Every part
//! has the keys `split.no` (0-based), `split.count` and `split.tensors.count`
//! (the total over all parts); the first part also holds all of the model's
//! other metadata, later parts only the `split.*` keys (and, from
//! [`GgufWriter::write_split`](crate::GgufWriter::write_split),
//! `general.alignment`).
//!
//! [`GgufFile::open`] on any part of such a model opens all of them: it
//! finds the others by name in the same directory, validates each exactly as
//! a single file is validated, checks that they belong together (their
//! `split.*` keys agree with their names and with each other, no tensor is in
//! two parts, the parts hold `split.tensors.count` tensors in all), and maps
//! each one separately. The result is one [`GgufFile`] that reads like a
//! single file: the first part's metadata, all tensors in part order, tensor
//! data from whichever part holds it. [`GgufFile::part_paths`] lists the
//! files behind it.

use crate::{GgmlType, Value, ValueType};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

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

/// Most parts a split model may have: `split.count` is a u16.
pub const MAX_SPLIT_PARTS: u64 = u16::MAX as u64;

/// The metadata keys that describe how a split model is cut into parts.
pub const SPLIT_KEYS: [&str; 3] = ["split.no", "split.count", "split.tensors.count"];

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
    /// The parts of a split model do not make up one model (a part missing,
    /// misnamed or from another model), or a later part is itself invalid.
    /// The message names the files concerned.
    #[error("split model: {0}")]
    Split(String),
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one,
    /// so a weight matrix of `rows × cols` has `dims == [cols, rows]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section (validated) of
    /// the file holding the tensor: in a split model, of its own part.
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

/// One file's bytes: the whole model, or one part of a split one.
struct Part {
    storage: Storage,
    /// Absolute offset of this file's data section (already aligned).
    data_offset: u64,
}

/// A validated GGUF model, memory-mapped (or held in memory): one file, or
/// all the parts of a split model presented as one.
///
/// A split model is llama.cpp's `gguf-split` layout: parts named
/// `PREFIX-00001-of-00003.gguf`, `PREFIX-00002-of-00003.gguf`, … (1-based,
/// five digits), each a complete GGUF file with some of the tensors (their
/// offsets relative to its own data section) and the keys `split.no`
/// (0-based), `split.count` and `split.tensors.count` (the total); the first
/// part also holds the model's other metadata. [`GgufFile::open`] on any
/// part opens them all and checks that they make up one model.
///
/// For a split model the accessors describe the model, not one file:
/// [`metadata`](Self::metadata) is the first part's (less the `split.*`
/// keys), [`tensors`](Self::tensors) lists every part's tensors in part
/// order, the tensor-data accessors read from whichever part holds a
/// tensor, and [`file_size`](Self::file_size) is the total of all parts.
/// [`part_paths`](Self::part_paths), [`tensor_part`](Self::tensor_part) and
/// [`part_data_offset`](Self::part_data_offset) say which file holds what.
pub struct GgufFile {
    /// At least one; the parts of a split model in part order.
    parts: Vec<Part>,
    /// The paths of `parts` (empty for [`GgufFile::from_bytes`]).
    paths: Vec<PathBuf>,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    /// The index in `parts` of the part holding each tensor of `tensors`.
    tensor_parts: Vec<u16>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes and the full metadata (vocabularies) are too big to print.
        let mut s = f.debug_struct("GgufFile");
        s.field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("alignment", &self.alignment)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len());
        if self.parts.len() > 1 {
            s.field("n_parts", &self.parts.len());
        }
        s.finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates `path`: a single GGUF file, or any part of
    /// a split model, which opens the whole model (all parts must sit in the
    /// same directory, named `PREFIX-00001-of-0000N.gguf` … as llama.cpp's
    /// `gguf-split` names them). Each part is validated as a single file is;
    /// then the parts must agree: their `split.no` and `split.count` with
    /// their names and with each other, no tensor in two parts, and
    /// `split.tensors.count` tensors in all. Errors name the files and say
    /// what to do. Only parts that exist are opened, one at a time, so a
    /// `split.count` of up to 65535 costs nothing before the first missing
    /// part is reported.
    ///
    /// The mapping assumes nobody truncates or rewrites the file while it is
    /// open, as every memory-mapping model loader does; files are replaced by
    /// writing a new one and renaming it (see `GgufWriter::write_file`), which
    /// leaves existing mappings intact.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let storage = map_file(path)?;
        let parsed = Parser::new(storage.bytes()).parse()?;
        let split = split_keys(&parsed).map_err(|e| split_error(format!("{}: {e}", path.display())))?;
        match split {
            Some(keys) if keys.count > 1 => open_split(path, storage, parsed, keys),
            _ => Ok(GgufFile::single(storage, parsed, vec![path.to_path_buf()])),
        }
    }

    /// Validates a file held in memory (tests, fuzzing). A part of a split
    /// model is refused: its other parts can only be found from its path.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let storage = Storage::Owned(bytes);
        let parsed = Parser::new(storage.bytes()).parse()?;
        match split_keys(&parsed).map_err(invalid)? {
            Some(keys) if keys.count > 1 => Err(invalid(format!(
                "this is part {} of a model split into {} files; open it with GgufFile::open from its \
                 path, which finds and reads the other parts",
                keys.no + 1,
                keys.count
            ))),
            _ => Ok(GgufFile::single(storage, parsed, Vec::new())),
        }
    }

    /// A model that is one file.
    fn single(storage: Storage, parsed: Parsed, paths: Vec<PathBuf>) -> GgufFile {
        GgufFile {
            parts: vec![Part { storage, data_offset: parsed.data_offset }],
            paths,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            metadata_index: parsed.metadata_index,
            tensor_parts: vec![0; parsed.tensors.len()],
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        }
    }

    /// The GGUF version (of the first part, for a split model).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32): every
    /// tensor's data starts at a multiple of it. For a split model, the
    /// smallest over the parts (each part declares its own, and llama.cpp
    /// writes `general.alignment` only into the first).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the data section (the tensors' bytes)
    /// starts. For a split model, that of the first part; each part has its
    /// own ([`part_data_offset`](Self::part_data_offset)).
    pub fn data_offset(&self) -> u64 {
        self.parts[0].data_offset
    }

    /// Metadata in file order. For a split model, the first part's without
    /// the `split.*` keys ([`SPLIT_KEYS`]): they describe how the files are
    /// cut, which [`part_paths`](Self::part_paths) says, and a tool copying
    /// the metadata into one new file must not carry them over.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of metadata key `key` (as in [`metadata`](Self::metadata)).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensors in file order; for a split model, part by part.
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
        match self.tensor_index.get(&t.name) {
            Some(&i) if self.tensors[i].offset == t.offset && self.tensors[i].n_bytes == t.n_bytes => self.slice_of(i),
            _ => panic!(
                "tensor_data: tensor '{}' [offset {}, {} bytes] is not a tensor of this GGUF file",
                t.name, t.offset, t.n_bytes
            ),
        }
    }

    /// The bytes of the tensor called `name`, or `None` if there is none.
    pub fn tensor_data_by_name(&self, name: &str) -> Option<&[u8]> {
        self.tensor_index.get(name).map(|&i| self.slice_of(i))
    }

    /// Tells the OS this process no longer needs the pages holding `bytes`
    /// (a slice of this file's data, e.g. a tensor a loader has copied
    /// elsewhere; for a split model, of any part): they leave the process's
    /// resident memory, and reading them later still works (the pages come
    /// back from the file). Does nothing for a file held in memory or a
    /// slice from elsewhere. Advice only: errors are ignored.
    pub fn release_pages(&self, bytes: &[u8]) {
        for part in &self.parts {
            if let Storage::Mapped(map) = &part.storage {
                let (start, end) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
                let at = bytes.as_ptr() as usize;
                if bytes.is_empty() || at < start || at + bytes.len() > end {
                    continue;
                }
                // SAFETY: the map is a read-only mapping of a file that stays
                // unchanged while mapped (the contract of `open`), so dropping
                // its pages only means later reads fault them back in with the
                // same contents; no reference sees different bytes.
                let _ =
                    unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at - start, bytes.len()) };
                return;
            }
        }
    }

    /// Size of the whole file in bytes; for a split model, of all its parts
    /// together.
    pub fn file_size(&self) -> u64 {
        self.parts.iter().map(|p| p.storage.bytes().len() as u64).sum()
    }

    /// The files this model was read from: one path for a single file (as
    /// given to [`open`](Self::open)), every part in order for a split model
    /// (whichever part was opened), none for [`from_bytes`](Self::from_bytes).
    /// What a tool copying, moving or removing the model must handle.
    pub fn part_paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Which file holds the tensor called `name`: an index into
    /// [`part_paths`](Self::part_paths) (always 0 for a single file).
    pub fn tensor_part(&self, name: &str) -> Option<usize> {
        self.tensor_index.get(name).map(|&i| self.tensor_parts[i] as usize)
    }

    /// Absolute offset of part `part`'s data section in its file (part 0's is
    /// [`data_offset`](Self::data_offset)): a tensor's bytes lie at this plus
    /// its [`TensorInfo::offset`] in the file of its [`tensor_part`](Self::tensor_part).
    pub fn part_data_offset(&self, part: usize) -> Option<u64> {
        self.parts.get(part).map(|p| p.data_offset)
    }

    /// The data of our own (validated) entry `i`.
    fn slice_of(&self, i: usize) -> &[u8] {
        let t = &self.tensors[i];
        let part = &self.parts[self.tensor_parts[i] as usize];
        // Validated at parse time: data_offset + offset + n_bytes <= the
        // part's size, with no overflow, so these casts and the range are exact.
        let start = (part.data_offset + t.offset) as usize;
        &part.storage.bytes()[start..start + t.n_bytes as usize]
    }
}

/// Maps the file at `path` (an empty file is held as an empty buffer, so
/// parsing gives the better error).
fn map_file(path: &Path) -> Result<Storage, GgufError> {
    let io_error = |source| GgufError::Io { path: path.display().to_string(), source };
    let file = File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    if len == 0 {
        // Mapping an empty file fails on some platforms; parsing an empty
        // buffer gives the better error ("too short for the header").
        return Ok(Storage::Owned(Vec::new()));
    }
    // SAFETY: the map is read-only and we hand out only shared slices of it.
    // Soundness further needs the file to stay unchanged while mapped, which
    // is the documented contract of `GgufFile::open`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_error)?;
    Ok(Storage::Mapped(map))
}

/// A file's `split.*` keys, validated alone.
#[derive(Debug, Clone, Copy)]
struct SplitKeys {
    /// This file's part, 0-based (`split.no`; 0 when absent from a file
    /// that is its model's only part).
    no: u16,
    /// `split.count`, at least 1.
    count: u16,
    /// `split.tensors.count`, when present.
    tensors: Option<u64>,
}

/// The `split.*` keys of a parsed file: `None` for a file without
/// `split.count` (not part of a split model). Errors are messages for the
/// caller to place.
fn split_keys(parsed: &Parsed) -> Result<Option<SplitKeys>, String> {
    let get = |key: &str| parsed.metadata_index.get(key).map(|&i| &parsed.metadata[i].1);
    // The keys are u16, u16 and i32 in llama.cpp's files; any non-negative
    // integer in range is accepted, but not a bool (which `as_u64` would
    // turn into 0 or 1).
    let integer = |key: &str, max: u64| -> Result<Option<u64>, String> {
        let Some(value) = get(key) else { return Ok(None) };
        match value {
            Value::Bool(_) => None,
            v => v.as_u64(),
        }
        .filter(|&n| n <= max)
        .map(Some)
        .ok_or_else(|| {
            // A number is shown; anything else (an array could be huge) by its type.
            let number = match value {
                Value::Bool(_) => None,
                Value::F32(_) | Value::F64(_) => value.as_f64().map(|n| n.to_string()),
                v => v.as_i64().map(|n| n.to_string()).or_else(|| v.as_u64().map(|n| n.to_string())),
            };
            let found = number.unwrap_or_else(|| format!("a {} value", value.value_type()));
            format!("metadata '{key}': expected an integer in 0..={max}, found {found}")
        })
    };
    let Some(count) = integer("split.count", MAX_SPLIT_PARTS)? else {
        return Ok(None);
    };
    if count == 0 {
        return Err("split.count is 0, but a model has at least one part: the file is damaged; split the \
                    original model again"
            .to_string());
    }
    let no = match integer("split.no", MAX_SPLIT_PARTS)? {
        Some(no) => no,
        None if count == 1 => 0,
        None => return Err(format!("split.count is {count} but split.no (which part this is) is missing")),
    };
    if no >= count {
        return Err(format!("split.no is {no} (0-based) but split.count is {count}: no such part"));
    }
    let tensors = integer("split.tensors.count", i32::MAX as u64)?;
    // Both fit in u16: checked against MAX_SPLIT_PARTS above.
    Ok(Some(SplitKeys { no: no as u16, count: count as u16, tensors }))
}

/// Builds a `Split` error, escaping control characters as [`invalid`] does.
fn split_error(message: String) -> GgufError {
    GgufError::Split(one_line(message))
}

/// The end of a part's file name: `-NNNNN-of-MMMMM.gguf`.
const SPLIT_SUFFIX_LEN: usize = "-00001-of-00001.gguf".len();

/// The file name of part `no` (0-based) of `count` with name prefix `prefix`.
pub(crate) fn split_file_name(prefix: &str, no: usize, count: usize) -> String {
    format!("{prefix}-{:05}-of-{count:05}.gguf", no + 1)
}

/// Splits a part's file name `PREFIX-NNNNN-of-MMMMM.gguf` into its prefix,
/// part number (1-based, as in the name) and part count; `None` if the name
/// has another form.
fn parse_split_file_name(name: &str) -> Option<(&str, u64, u64)> {
    let at = name.len().checked_sub(SPLIT_SUFFIX_LEN)?;
    let suffix = name.as_bytes().get(at..)?;
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let bytes = &suffix[range];
        bytes.iter().all(u8::is_ascii_digit).then(|| bytes.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
    };
    let shape_ok = suffix[0] == b'-' && &suffix[6..10] == b"-of-" && &suffix[15..] == b".gguf";
    if !shape_ok {
        return None;
    }
    let (no, count) = (digits(1..6)?, digits(10..15)?);
    // The suffix is ASCII and starts at a '-', so `at` is a char boundary.
    Some((&name[..at], no, count))
}

/// Opens every part of the split model that `path` (a part described by
/// `keys`, already parsed) belongs to, and merges them.
fn open_split(path: &Path, storage: Storage, parsed: Parsed, keys: SplitKeys) -> Result<GgufFile, GgufError> {
    let count = usize::from(keys.count);
    let no = usize::from(keys.no);
    let shown = path.display();
    let expected_name = |prefix: &str| split_file_name(prefix, no, count);
    let name = path.file_name().and_then(|n| n.to_str());
    let Some((prefix, name_no, name_count)) = name.and_then(parse_split_file_name) else {
        return Err(split_error(format!(
            "{shown} is part {} of a model split into {count} files (its split.no is {no}, split.count \
             {count}), but its name is not of the form {}: the other parts are found by name, so the parts \
             must keep the names PREFIX-00001-of-{count:05}.gguf … PREFIX-{count:05}-of-{count:05}.gguf \
             that llama.cpp's gguf-split gives them",
            no + 1,
            expected_name("PREFIX")
        )));
    };
    if name_no != no as u64 + 1 || name_count != count as u64 {
        return Err(split_error(format!(
            "{shown}: the name says part {name_no} of {name_count} but the metadata says part {} of {count} \
             (split.no {no}, 0-based; split.count {count}): the file was renamed or damaged; it should be \
             named {}",
            no + 1,
            expected_name(prefix)
        )));
    }
    let part_path = |k: usize| path.with_file_name(split_file_name(prefix, k, count));

    let mut opened = Some((storage, parsed));
    let mut model: Option<GgufFile> = None;
    let mut expected_tensors = 0;
    for k in 0..count {
        let this_path = part_path(k);
        let shown_k = this_path.display();
        let (storage, parsed) = match opened.take_if(|_| k == no) {
            Some(already) => already,
            None => open_part(&this_path, k, count)?,
        };
        let keys_k = split_keys(&parsed).map_err(|e| split_error(format!("{shown_k}: {e}")))?;
        let keys_k = keys_k.ok_or_else(|| {
            split_error(format!(
                "{shown_k} has no split.count: it is a whole model, not part {} of the {count}-part model \
                 that {shown} belongs to",
                k + 1
            ))
        })?;
        if usize::from(keys_k.count) != count {
            return Err(split_error(format!(
                "{shown_k} says the model has {} parts (split.count) but {shown} says {count}: the files \
                 come from different splits; split the original model again",
                keys_k.count
            )));
        }
        if usize::from(keys_k.no) != k {
            return Err(split_error(format!(
                "{shown_k} is named part {} of {count} but its split.no says part {} (split.no {} is \
                 0-based): the file was renamed; rename it {}",
                k + 1,
                usize::from(keys_k.no) + 1,
                keys_k.no,
                split_file_name(prefix, usize::from(keys_k.no), count)
            )));
        }
        match &mut model {
            None => {
                // The first part: the model's metadata, less the split keys.
                expected_tensors = keys_k.tensors.ok_or_else(|| {
                    split_error(format!(
                        "{shown_k}: the first part of a split model has no split.tensors.count (the \
                         number of tensors over all parts)"
                    ))
                })?;
                let mut first = GgufFile::single(storage, parsed, vec![this_path.clone()]);
                first.metadata.retain(|(key, _)| !SPLIT_KEYS.contains(&key.as_str()));
                first.metadata_index =
                    first.metadata.iter().enumerate().map(|(i, (key, _))| (key.clone(), i)).collect();
                model = Some(first);
            }
            Some(model) => {
                if keys_k.tensors.is_some_and(|n| n != expected_tensors) {
                    return Err(split_error(format!(
                        "{shown_k} says the model has {} tensors (split.tensors.count) but the first part \
                         says {expected_tensors}: the files come from different splits",
                        keys_k.tensors.unwrap_or_default()
                    )));
                }
                model.add_part(storage, parsed, this_path)?;
            }
        }
    }
    // count >= 2, so the loop ran and set `model`.
    let model = model.ok_or_else(|| split_error(format!("{shown}: no parts")))?;
    if model.tensors.len() as u64 != expected_tensors {
        return Err(split_error(format!(
            "the {count} parts of {} hold {} tensors, but split.tensors.count says {expected_tensors}: a \
             part is from another split of the model or damaged; split the original model again",
            model.paths[0].display(),
            model.tensors.len()
        )));
    }
    Ok(model)
}

/// Maps and parses part `k` (0-based) of `count` at `path`, with errors that
/// say which part of what.
fn open_part(path: &Path, k: usize, count: usize) -> Result<(Storage, Parsed), GgufError> {
    let shown = path.display();
    let storage = match map_file(path) {
        Err(GgufError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(split_error(format!(
                "part {} of {count} is missing: expected {shown}; all {count} parts of a split model must \
                 sit in the same directory, under the names gguf-split gave them",
                k + 1
            )))
        }
        other => other?,
    };
    let parsed = Parser::new(storage.bytes()).parse().map_err(|e| split_error(format!("{shown}: {e}")))?;
    Ok((storage, parsed))
}

impl GgufFile {
    /// Appends a later part of a split model: its tensors, after checking
    /// that none is already in an earlier part.
    fn add_part(&mut self, storage: Storage, parsed: Parsed, path: PathBuf) -> Result<(), GgufError> {
        // At most MAX_SPLIT_PARTS parts are ever added, so the index fits.
        let part = self.parts.len() as u16;
        for t in parsed.tensors {
            if let Some(&i) = self.tensor_index.get(&t.name) {
                let other = &self.paths[self.tensor_parts[i] as usize];
                return Err(split_error(format!(
                    "tensor '{}' is in both {} and {}: the parts come from different splits or were \
                     damaged; split the original model again",
                    t.name,
                    other.display(),
                    path.display()
                )));
            }
            self.tensor_index.insert(t.name.clone(), self.tensors.len());
            self.tensors.push(t);
            self.tensor_parts.push(part);
        }
        self.alignment = self.alignment.min(parsed.alignment);
        self.parts.push(Part { storage, data_offset: parsed.data_offset });
        self.paths.push(path);
        Ok(())
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
    GgufError::Invalid(one_line(message))
}

/// `message` with control characters escaped.
fn one_line(message: String) -> String {
    if message.chars().any(char::is_control) {
        message.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
    } else {
        message
    }
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
