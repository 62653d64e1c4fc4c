//! One file from the Hub into the cache: resumable, verified, atomic, once.
//!
//! The bytes go to `blobs/ETAG.incomplete`. A download that stops (the
//! connection drops, the process is killed) leaves that file; the next try
//! asks only for the rest (`Range: bytes=N-`) and starts over only if the
//! server ignores the range. Within one pull, a dropped connection is
//! retried from where it stopped, with a short backoff, as long as each try
//! makes progress (five tries in a row without a byte give up, saying that
//! running the command again resumes). The finished file is checked
//! against the sha256 the Hub published for it (a mismatch removes it: its
//! bytes cannot be trusted, not even as a prefix), synced, then renamed
//! to `blobs/ETAG`, so `blobs/ETAG` only ever holds a verified file.
//!
//! Two processes asking for one file: the second blocks on
//! `.locks/…/ETAG.lock` (saying so), then finds the blob the first one
//! finished. Progress: a bar on a terminal, else a line a minute.

use super::Hub;
use crate::to_hex;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// What the Hub says a file is.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Repository path, for messages.
    pub file: String,
    pub size: u64,
    /// Lowercase hex; `None` for a file kept outside LFS (checked by size only).
    pub sha256: Option<String>,
}

/// How long one request may take to deliver its body before it is ended and
/// the download goes on with a new request from where it got to.
const REQUEST_BODY_DEADLINE: Duration = Duration::from_secs(300);
/// Tries in a row that bring no byte before a download gives up.
const MAX_FRUITLESS_TRIES: u32 = 5;

/// Downloads `url` into `blob` (see the module doc). The caller has
/// checked that `blob` does not exist yet; `lock` is the lock file to hold.
pub fn fetch(hub: &Hub, url: &str, want: &Expected, blob: &Path, lock: &Path) -> Result<()> {
    let parent = lock.parent().expect("a lock file has a parent");
    fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
    let (_lock, _) = crate::lock_or_wait(lock, &format!("downloading {}", want.file))?;
    if blob.is_file() {
        return Ok(());
    }
    let dir = blob.parent().expect("a blob has a parent");
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let partial = blob.with_file_name(format!("{}.incomplete", blob.file_name().unwrap_or_default().to_string_lossy()));
    let mut out = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .with_context(|| format!("could not create {}", partial.display()))?;
    let mut have = out.metadata().map(|m| m.len()).unwrap_or(0);
    if have > want.size {
        have = 0;
    }
    // Hash what an earlier try left, so the check covers the whole file.
    let mut hasher = Sha256::new();
    if have > 0 {
        hash_prefix(&mut out, have, &mut hasher).with_context(|| format!("could not read {}", partial.display()))?;
        eprintln!("minnow: resuming {} at {} of {} MB", want.file, have / 1_000_000, want.size / 1_000_000);
    }
    out.set_len(have)?;
    out.seek(SeekFrom::Start(have))?;

    let progress = Progress::new(&want.file, want.size, have);
    let mut fruitless = 0;
    while have < want.size {
        let before = have;
        match transfer(hub, url, want, &mut out, &mut have, &mut hasher, &progress) {
            Ok(()) => {}
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why)) => {
                if have == before {
                    fruitless += 1;
                    if fruitless >= MAX_FRUITLESS_TRIES {
                        progress.finish();
                        bail!(
                            "downloading {} from {} failed {fruitless} times in a row ({why}); {} of {} MB are kept \
                             in {}: run the command again to resume",
                            want.file,
                            hub.endpoint,
                            have / 1_000_000,
                            want.size / 1_000_000,
                            partial.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(250 << (fruitless - 1)));
                } else {
                    fruitless = 0;
                }
                progress.note(&format!("{why}; resuming at {} MB", have / 1_000_000));
            }
        }
    }
    progress.finish();
    out.flush()?;
    let actual = to_hex(&hasher.finalize());
    if let Some(expected) = &want.sha256 {
        if &actual != expected {
            drop(out);
            let _ = fs::remove_file(&partial);
            bail!(
                "{} from {} is corrupt: its sha256 is {actual}, the Hub says {expected}; the bad file was removed, \
                 run the command again to download it anew",
                want.file,
                hub.endpoint
            );
        }
    }
    out.sync_all().with_context(|| format!("could not sync {}", partial.display()))?;
    drop(out);
    fs::rename(&partial, blob)
        .with_context(|| format!("could not rename {} to {}", partial.display(), blob.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all(); // the rename, durable
    }
    Ok(())
}

enum Failure {
    /// Worth another try from where the file got to.
    Retry(String),
    /// Another try would fail the same way.
    Fatal(anyhow::Error),
}

/// One request: from byte `have` on, appended to `out`.
fn transfer(
    hub: &Hub,
    url: &str,
    want: &Expected,
    out: &mut File,
    have: &mut u64,
    hasher: &mut Sha256,
    progress: &Progress,
) -> Result<(), Failure> {
    let response = match hub.get(url, Some(*have), Some(REQUEST_BODY_DEADLINE)) {
        Ok(r) => r,
        Err(e) => return Err(Failure::Retry(format!("{e:#}"))),
    };
    let status = response.status().as_u16();
    match status {
        206 => {
            let range = header(&response, "content-range").unwrap_or_default();
            let start =
                range.strip_prefix("bytes ").and_then(|r| r.split('-').next()).and_then(|s| s.parse::<u64>().ok());
            if start != Some(*have) {
                return Err(Failure::Fatal(anyhow!(
                    "{} answered range `{range}` when asked for bytes {}-",
                    hub.endpoint,
                    *have
                )));
            }
        }
        200 => {
            if *have > 0 {
                // The server ignored the range: start over.
                progress.note("the server does not resume downloads; starting over");
                *have = 0;
                *hasher = Sha256::new();
                out.set_len(0).and_then(|_| out.seek(SeekFrom::Start(0))).map_err(|e| Failure::Fatal(e.into()))?;
                progress.set(0);
            }
        }
        416 if *have == want.size => return Ok(()),
        429 | 500..=599 => return Err(Failure::Retry(format!("{} answered {status}", hub.endpoint))),
        _ => return Err(Failure::Fatal(hub.status_error(&response, &want.file))),
    }
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Retry(format!("the connection broke ({e})"))),
        };
        let n = n.min((want.size - *have) as usize);
        out.write_all(&buf[..n]).map_err(|e| Failure::Fatal(anyhow!("could not write the download: {e}")))?;
        hasher.update(&buf[..n]);
        *have += n as u64;
        progress.set(*have);
        if *have == want.size {
            return Ok(());
        }
    }
    if *have < want.size {
        return Err(Failure::Retry("the connection closed early".into()));
    }
    Ok(())
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn hash_prefix(file: &mut File, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = file.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buf)? {
            0 => return Ok(()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// A bar on a terminal; without one, a line when a download starts, a line
/// a minute, and a line when it ends.
struct Progress {
    bar: Option<ProgressBar>,
    file: String,
    size: u64,
    started: Instant,
    last_line: std::cell::Cell<Instant>,
    done: std::cell::Cell<u64>,
}

impl Progress {
    fn new(file: &str, size: u64, have: u64) -> Progress {
        let bar = io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(size);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(file.to_string());
            bar.set_position(have);
            bar
        });
        if bar.is_none() {
            eprintln!("minnow: downloading {file} ({} MB)", size / 1_000_000);
        }
        let now = Instant::now();
        Progress {
            bar,
            file: file.to_string(),
            size,
            started: now,
            last_line: std::cell::Cell::new(now),
            done: std::cell::Cell::new(have),
        }
    }

    fn set(&self, at: u64) {
        self.done.set(at);
        match &self.bar {
            Some(bar) => bar.set_position(at),
            None if self.last_line.get().elapsed() >= Duration::from_secs(60) => {
                self.last_line.set(Instant::now());
                eprintln!(
                    "minnow: {}: {} of {} MB ({:.0}%)",
                    self.file,
                    at / 1_000_000,
                    self.size / 1_000_000,
                    100.0 * at as f64 / self.size.max(1) as f64
                );
            }
            None => {}
        }
    }

    fn note(&self, what: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("minnow: {}: {what}", self.file)),
            None => eprintln!("minnow: {}: {what}", self.file),
        }
    }

    fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!(
                "minnow: {}: {} MB in {:.1} s",
                self.file,
                self.done.get() / 1_000_000,
                self.started.elapsed().as_secs_f64()
            ),
        }
    }
}
