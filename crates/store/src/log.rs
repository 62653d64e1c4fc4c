//! [`RecordLog`]: an append-only JSONL file of records, safe against being
//! killed at any moment, and [`open_recovering`], the recovery both it and
//! the completions store use.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// A record that a [`RecordLog`] can hold: it knows its own id.
pub trait Keyed {
    fn key(&self) -> &str;
}

/// Opens (creating it and its directory if needed) the JSONL file at `path`
/// for appending, drops a torn last line (everything after the last
/// newline: a write cut short by a crash) and returns the file, positioned
/// at its end, with the complete lines' text and the number of bytes
/// dropped.
pub fn open_recovering(path: &Path) -> Result<(File, String, u64)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open {} for appending", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    let keep = whole_lines_len(&bytes);
    let torn_bytes = (bytes.len() - keep) as u64;
    if torn_bytes > 0 {
        file.set_len(keep as u64)
            .with_context(|| format!("cannot truncate the torn last line of {}", path.display()))?;
        file.sync_all()?;
    }
    file.seek(SeekFrom::End(0))?;
    bytes.truncate(keep);
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow!("{}: not UTF-8 text ({e}); is this a JSONL file?", path.display()))?;
    Ok((file, text, torn_bytes))
}

/// How many leading bytes of a JSONL file's contents are whole lines:
/// everything after the last newline is a line whose write was cut short
/// (or is still under way).
pub fn whole_lines_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// Appends `line` (which must end with its newline) in one write and makes
/// it durable before returning: a crash leaves it whole or torn at the end
/// of the file, never interleaved with another.
pub fn append_line(file: &mut File, path: &Path, line: &str) -> Result<()> {
    debug_assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
    file.write_all(line.as_bytes()).with_context(|| format!("cannot write to {}", path.display()))?;
    file.sync_data().with_context(|| format!("cannot sync {}", path.display()))
}

/// An append-only JSONL file of records, safe against being killed at any
/// moment.
///
/// Each record is written as one whole line (`write_all` of the line and
/// its newline, then `fsync`), so after a crash the file holds complete
/// lines plus at most one torn last line without its newline. Opening
/// drops that torn tail (truncating the file to the last newline), reads
/// every complete line and remembers their ids: a rerun skips those and
/// appends the rest, so nothing is lost or written twice.
pub struct RecordLog<T> {
    file: File,
    path: PathBuf,
    done: HashSet<String>,
    _records: PhantomData<T>,
}

/// What [`RecordLog::open`] found in an existing file.
pub struct Recovered<T> {
    pub records: Vec<T>,
    /// Bytes of a torn last line that were dropped.
    pub torn_bytes: u64,
}

impl<T: Serialize + DeserializeOwned + Keyed> RecordLog<T> {
    /// Opens (creating it and its directory if needed) the log at `path` and
    /// recovers what it holds. A complete line that does not parse is an
    /// error naming the line: it was not written by a record log, and
    /// appending to it would mix two things.
    pub fn open(path: &Path) -> Result<(RecordLog<T>, Recovered<T>)> {
        let (file, text, torn_bytes) = open_recovering(path)?;
        let mut records = Vec::new();
        let mut done = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: T = serde_json::from_str(line).map_err(|e| {
                anyhow!("{}:{}: not a record this command writes ({e}); use another output file", path.display(), i + 1)
            })?;
            if !done.insert(rec.key().to_string()) {
                bail!(
                    "{}:{}: id {:?} appears twice; the file was not written by minnow",
                    path.display(),
                    i + 1,
                    rec.key()
                );
            }
            records.push(rec);
        }
        let log = RecordLog { file, path: path.to_path_buf(), done, _records: PhantomData };
        Ok((log, Recovered { records, torn_bytes }))
    }

    /// Whether a record with this id is already in the log.
    pub fn contains(&self, id: &str) -> bool {
        self.done.contains(id)
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Appends one record as one line and makes it durable before returning.
    /// A record whose id is already there is refused (it would duplicate).
    pub fn append(&mut self, rec: &T) -> Result<()> {
        if self.done.contains(rec.key()) {
            bail!("{}: id {:?} is already recorded", self.path.display(), rec.key());
        }
        let mut line = serde_json::to_string(rec)?;
        line.push('\n');
        append_line(&mut self.file, &self.path, &line)?;
        self.done.insert(rec.key().to_string());
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
