//! OpenAI's stored chat completions (`store: true`), kept in one crash-safe
//! JSONL log under the store's directory.
//!
//! `DIR/completions.jsonl` holds one operation per line, each written whole
//! and `fsync`ed before the call returns (the [`RecordLog`] discipline):
//! `{"op":"put","record":{…}}` adds a [`StoredCompletion`],
//! `{"op":"metadata","id","metadata"}` replaces one's metadata,
//! `{"op":"delete","id"}` removes one. Opening replays the log (dropping a
//! torn last line), so after a crash the store holds exactly the operations
//! that returned. The server keeps only an index in memory (id, model,
//! metadata, where the record's line is) and reads records back from the
//! file. When deleted and superseded lines outweigh the live ones the log
//! is rewritten (a temporary file, `fsync`, rename): compaction.
//!
//! One server owns a store at a time (`DIR/lock`, an exclusive file lock);
//! readers such as `distill --data store:DIR` use [`Store::read_all`],
//! which never writes and ignores a line still being written.
//!
//! The size bound ([`Store::open`]'s `max_bytes`) counts the live records'
//! bytes. A record that would cross it is refused ([`StoreError::Full`]):
//! what was stored is never dropped to make room; deleting records does.
//!
//! [`RecordLog`]: crate::RecordLog

use crate::log::{append_line, open_recovering, whole_lines_len};
use crate::TeacherLogprobs;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The log's file name inside the store directory.
pub const LOG_FILE: &str = "completions.jsonl";

/// One stored chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCompletion {
    /// The response's id (`chatcmpl-…`).
    pub id: String,
    /// Unix seconds when the request arrived.
    pub created: u64,
    /// The model that answered: the server's model id, or the adapter's name.
    pub model: String,
    /// OpenAI's metadata: string keys and values.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The request body as the client sent it (messages, tools,
    /// response_format, sampling parameters), less `store`, `metadata`,
    /// `stream` and `stream_options`.
    pub request: Value,
    /// The `chat.completion` object answered (its non-streaming form, also
    /// for a streamed reply): choices with content or tool calls, usage.
    pub response: Value,
    /// Per choice, the reply's tokens and their top-k log-probabilities
    /// (`serve --store-logprobs K`); empty when not recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TeacherLogprobs>,
}

impl StoredCompletion {
    /// The object OpenAI's stored-completions API returns: the response
    /// with its metadata and the request's sampling settings.
    pub fn api_object(&self) -> Value {
        let mut v = self.response.clone();
        if let Value::Object(o) = &mut v {
            o.insert("metadata".into(), serde_json::to_value(&self.metadata).unwrap_or(Value::Null));
            for k in ["temperature", "top_p", "seed", "tool_choice", "response_format"] {
                if let Some(x) = self.request.get(k) {
                    o.insert(k.into(), x.clone());
                }
            }
        }
        v
    }

    /// The request's messages, as sent.
    pub fn messages(&self) -> &[Value] {
        self.request.get("messages").and_then(Value::as_array).map_or(&[], |a| a.as_slice())
    }

    /// Whether this record passes a listing's filters: its model is `model`
    /// (when given) and its metadata holds every pair.
    pub fn matches(&self, model: Option<&str>, metadata: &[(String, String)]) -> bool {
        matches_filter(&self.model, &self.metadata, model, metadata)
    }
}

fn matches_filter(
    model: &str,
    meta: &BTreeMap<String, String>,
    want_model: Option<&str>,
    want: &[(String, String)],
) -> bool {
    want_model.is_none_or(|m| m == model) && want.iter().all(|(k, v)| meta.get(k) == Some(v))
}

/// One line of the log.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Put { record: StoredCompletion },
    Metadata { id: String, metadata: BTreeMap<String, String> },
    Delete { id: String },
}

/// What the server keeps in memory of one record.
struct Entry {
    id: String,
    model: String,
    metadata: BTreeMap<String, String>,
    /// Where its put line is in the log, and that line's length.
    offset: u64,
    len: u64,
    /// Live bytes it accounts for: its put line and its latest metadata line.
    bytes: u64,
}

#[derive(Debug)]
pub enum StoreError {
    /// The record would take the live records past `--store-max-bytes`.
    Full {
        max_bytes: u64,
        live_bytes: u64,
        record_bytes: u64,
    },
    /// A record with this id is already stored.
    Duplicate(String),
    NotFound(String),
    Io(anyhow::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full { max_bytes, live_bytes, record_bytes } => write!(
                f,
                "the store is full: {live_bytes} bytes stored, this record {record_bytes}, limit {max_bytes} \
                 (--store-max-bytes); delete stored completions to make room"
            ),
            StoreError::Duplicate(id) => write!(f, "a completion with id {id:?} is already stored"),
            StoreError::NotFound(id) => write!(f, "no stored completion has id {id:?}"),
            StoreError::Io(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<anyhow::Error> for StoreError {
    fn from(e: anyhow::Error) -> Self {
        StoreError::Io(e)
    }
}

/// Sort order of a listing: insertion order (the order the answers were
/// stored) or its reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Asc,
    Desc,
}

/// A listing's filters and page.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub model: Option<String>,
    /// Every pair must be in the record's metadata.
    pub metadata: Vec<(String, String)>,
    /// Start after the record with this id (the previous page's last).
    pub after: Option<String>,
    pub limit: usize,
    pub order: Order,
}

/// One page of a listing.
pub struct Page {
    pub records: Vec<StoredCompletion>,
    /// Whether more records match past this page.
    pub has_more: bool,
}

/// The stored completions of one directory, opened by the one server that
/// writes them.
pub struct Store {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Held for the store's lifetime: one writer at a time.
    _lock: File,
    file_len: u64,
    /// Live records by insertion sequence number.
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<String, u64>,
    next_seq: u64,
    live_bytes: u64,
    max_bytes: Option<u64>,
    /// Dead bytes below which the log is never rewritten.
    compact_min: u64,
    /// Bytes of a torn last line dropped when the store was opened.
    pub torn_bytes: u64,
}

/// Dead bytes below which a log is not worth rewriting.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;

fn line_of(op: &Op) -> Result<String> {
    let mut s = serde_json::to_string(op)?;
    s.push('\n');
    Ok(s)
}

impl Store {
    /// Opens (creating it if needed) the store in `dir` for writing, after
    /// taking its lock and replaying its log.
    pub fn open(dir: &Path, max_bytes: Option<u64>) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the store directory {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
        lock.try_lock().map_err(|_| {
            anyhow!("the store {} is in use by another process (a second `minnow serve --store` on it?)", dir.display())
        })?;
        let path = dir.join(LOG_FILE);
        let (file, text, torn_bytes) = open_recovering(&path)?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            path,
            file,
            _lock: lock,
            file_len: text.len() as u64,
            entries: BTreeMap::new(),
            by_id: HashMap::new(),
            next_seq: 0,
            live_bytes: 0,
            max_bytes,
            compact_min: COMPACT_MIN_BYTES,
            torn_bytes,
        };
        store.replay(&text)?;
        store.maybe_compact()?;
        Ok(store)
    }

    /// Every stored completion in `dir`, in insertion order, without
    /// taking the lock or writing anything: a line being written (no
    /// newline yet) is ignored. What `distill --data store:DIR` reads.
    pub fn read_all(dir: &Path) -> Result<Vec<StoredCompletion>> {
        let path = dir.join(LOG_FILE);
        if !dir.is_dir() {
            return Err(anyhow!("{} is not a store directory (it does not exist)", dir.display()));
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
        };
        let keep = whole_lines_len(&bytes);
        let text = std::str::from_utf8(&bytes[..keep]).map_err(|e| anyhow!("{}: not UTF-8 ({e})", path.display()))?;
        let mut order: Vec<String> = Vec::new();
        let mut recs: HashMap<String, StoredCompletion> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            match parse_op(&path, i, line)? {
                Op::Put { record } => {
                    order.push(record.id.clone());
                    recs.insert(record.id.clone(), record);
                }
                Op::Metadata { id, metadata } => {
                    if let Some(r) = recs.get_mut(&id) {
                        r.metadata = metadata;
                    }
                }
                Op::Delete { id } => {
                    recs.remove(&id);
                }
            }
        }
        Ok(order.into_iter().filter_map(|id| recs.remove(&id)).collect())
    }

    fn replay(&mut self, text: &str) -> Result<()> {
        let mut offset = 0u64;
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let len = line.len() as u64;
            match parse_op(&self.path, i, line.trim_end_matches('\n'))? {
                Op::Put { record } => {
                    if self.by_id.contains_key(&record.id) {
                        return Err(anyhow!("{}:{}: id {:?} is stored twice", self.path.display(), i + 1, record.id));
                    }
                    self.insert(&record, offset, len);
                }
                Op::Metadata { id, metadata } => {
                    if let Some(e) = self.by_id.get(&id).and_then(|s| self.entries.get_mut(s)) {
                        self.live_bytes -= e.bytes - e.len;
                        e.bytes = e.len + len;
                        self.live_bytes += len;
                        e.metadata = metadata;
                    }
                }
                Op::Delete { id } => {
                    self.remove(&id);
                }
            }
            offset += len;
        }
        Ok(())
    }

    fn insert(&mut self, r: &StoredCompletion, offset: u64, len: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            seq,
            Entry { id: r.id.clone(), model: r.model.clone(), metadata: r.metadata.clone(), offset, len, bytes: len },
        );
        self.by_id.insert(r.id.clone(), seq);
        self.live_bytes += len;
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(seq) = self.by_id.remove(id) else { return false };
        if let Some(e) = self.entries.remove(&seq) {
            self.live_bytes -= e.bytes;
        }
        true
    }

    fn append(&mut self, line: &str) -> Result<u64> {
        let at = self.file_len;
        append_line(&mut self.file, &self.path, line)?;
        self.file_len += line.len() as u64;
        Ok(at)
    }

    /// Stores `rec`, durably, or says why not.
    pub fn put(&mut self, rec: &StoredCompletion) -> Result<(), StoreError> {
        if self.by_id.contains_key(&rec.id) {
            return Err(StoreError::Duplicate(rec.id.clone()));
        }
        let line = line_of(&Op::Put { record: rec.clone() })?;
        let need = line.len() as u64;
        if let Some(max) = self.max_bytes {
            if self.live_bytes + need > max {
                return Err(StoreError::Full { max_bytes: max, live_bytes: self.live_bytes, record_bytes: need });
            }
        }
        let at = self.append(&line)?;
        self.insert(rec, at, need);
        Ok(())
    }

    /// The record with this id, with its latest metadata.
    pub fn get(&self, id: &str) -> Result<Option<StoredCompletion>> {
        match self.by_id.get(id).and_then(|s| self.entries.get(s)) {
            None => Ok(None),
            Some(e) => self.load(e).map(Some),
        }
    }

    fn load(&self, e: &Entry) -> Result<StoredCompletion> {
        let mut buf = vec![0u8; e.len as usize];
        self.file.read_exact_at(&mut buf, e.offset).with_context(|| format!("cannot read {}", self.path.display()))?;
        let line = std::str::from_utf8(&buf).map_err(|e| anyhow!("{}: not UTF-8 ({e})", self.path.display()))?;
        match serde_json::from_str::<Op>(line.trim_end()) {
            Ok(Op::Put { mut record }) => {
                record.metadata = e.metadata.clone();
                Ok(record)
            }
            _ => Err(anyhow!("{}: the record of {:?} is not where the index says", self.path.display(), e.id)),
        }
    }

    /// Replaces a record's metadata; returns the updated record.
    pub fn update_metadata(
        &mut self,
        id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<StoredCompletion, StoreError> {
        let Some(&seq) = self.by_id.get(id) else { return Err(StoreError::NotFound(id.to_string())) };
        let line = line_of(&Op::Metadata { id: id.to_string(), metadata: metadata.clone() })?;
        self.append(&line)?;
        let e = self.entries.get_mut(&seq).expect("indexed");
        self.live_bytes -= e.bytes - e.len;
        e.bytes = e.len + line.len() as u64;
        self.live_bytes += line.len() as u64;
        e.metadata = metadata;
        let rec = self.load(self.entries.get(&seq).expect("indexed"))?;
        self.maybe_compact()?;
        Ok(rec)
    }

    /// Deletes a record; `false` when there was none with this id.
    pub fn delete(&mut self, id: &str) -> Result<bool, StoreError> {
        if !self.by_id.contains_key(id) {
            return Ok(false);
        }
        self.append(&line_of(&Op::Delete { id: id.to_string() })?)?;
        self.remove(id);
        self.maybe_compact()?;
        Ok(true)
    }

    /// One page of the records matching `q`.
    pub fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        let start = match &q.after {
            None => None,
            Some(id) => Some(*self.by_id.get(id).ok_or_else(|| StoreError::NotFound(id.clone()))?),
        };
        let wanted = |e: &&Entry| matches_filter(&e.model, &e.metadata, q.model.as_deref(), &q.metadata);
        // The entries after `after` in the listing's order.
        let after: Box<dyn Iterator<Item = (&u64, &Entry)>> = match (q.order, start) {
            (Order::Asc, None) => Box::new(self.entries.iter()),
            (Order::Asc, Some(s)) => Box::new(self.entries.range(s + 1..)),
            (Order::Desc, None) => Box::new(self.entries.iter().rev()),
            (Order::Desc, Some(s)) => Box::new(self.entries.range(..s).rev()),
        };
        let hits: Vec<&Entry> = after.map(|(_, e)| e).filter(wanted).take(q.limit + 1).collect();
        let has_more = hits.len() > q.limit;
        let records = hits.into_iter().take(q.limit).map(|e| self.load(e)).collect::<Result<Vec<_>>>()?;
        debug_assert!(records.iter().all(|r| r.matches(q.model.as_deref(), &q.metadata)));
        Ok(Page { records, has_more })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the live records (what `max_bytes` bounds).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Bytes of the log file (live plus not yet compacted away).
    pub fn file_bytes(&self) -> u64 {
        self.file_len
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Dead bytes below which the log is not rewritten (default
    /// [`COMPACT_MIN_BYTES`]).
    pub fn set_compact_min(&mut self, bytes: u64) {
        self.compact_min = bytes;
    }

    fn maybe_compact(&mut self) -> Result<()> {
        let dead = self.file_len - self.live_bytes;
        if dead >= self.compact_min && dead > self.live_bytes {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log with only the live records (their latest metadata
    /// folded in): a temporary file, `fsync`, rename over the log, `fsync`
    /// of the directory. A crash at any point leaves the old log or the new
    /// one, never a mix.
    pub fn compact(&mut self) -> Result<()> {
        let tmp = self.dir.join(format!("{LOG_FILE}.compacting"));
        let mut out =
            std::io::BufWriter::new(File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
        let mut placed = Vec::with_capacity(self.entries.len());
        let mut at = 0u64;
        for (&seq, e) in &self.entries {
            let line = line_of(&Op::Put { record: self.load(e)? })?;
            out.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
            placed.push((seq, at, line.len() as u64));
            at += line.len() as u64;
        }
        let f = out.into_inner().map_err(|e| anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).with_context(|| format!("cannot replace {}", self.path.display()))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", self.dir.display()))?;
        self.file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot reopen {}", self.path.display()))?;
        for (seq, offset, len) in placed {
            let e = self.entries.get_mut(&seq).expect("placed from entries");
            (e.offset, e.len, e.bytes) = (offset, len, len);
        }
        self.file_len = at;
        self.live_bytes = at;
        Ok(())
    }
}

fn parse_op(path: &Path, i: usize, line: &str) -> Result<Op> {
    serde_json::from_str(line).map_err(|e| {
        anyhow!(
            "{}:{}: not a stored-completions record ({e}); is this directory a minnow store?",
            path.display(),
            i + 1
        )
    })
}
