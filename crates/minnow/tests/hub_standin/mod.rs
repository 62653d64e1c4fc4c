//! A small Hugging Face Hub on loopback, for the tests (no internet here or
//! in CI). It speaks the two endpoints minnow (and `huggingface_hub`) use,
//! with the Hub's headers:
//!
//! - `GET /api/models/USER/REPO/revision/REV[?blobs=true]`: `{"id", "sha",
//!   "siblings": [{"rfilename", "blobId", "size", "lfs": {"sha256",
//!   "size", "pointerSize"}}]}` (sizes and `lfs` with `blobs=true`);
//! - `GET|HEAD /USER/REPO/resolve/REV/FILE`: for an LFS file a `302` to a
//!   second listener (the "CDN", another origin) with `X-Repo-Commit`,
//!   `X-Linked-Etag: "SHA256"`, `X-Linked-Size` and `ETag`; a small file is
//!   answered inline with its git blob id as `ETag`.
//!
//! The CDN serves `Range` requests (`206` + `Content-Range`) and refuses a
//! request that carries an `Authorization` header, as a signed storage URL
//! does. Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
//! `GatedRepo`, `EntryNotFound`) as the Hub's do: an unknown or private
//! repository is a 401 without a token and a 404 with one; a gated one
//! lists its files but refuses them without the right token.
//!
//! Faults on demand ([`Faults`]): drop the connection at a byte offset
//! (once or every time), or corrupt a byte. Every request is logged.

#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A file in a stand-in repository.
#[derive(Clone)]
pub struct HubFile {
    pub name: String,
    /// Where its bytes are (served from disk: models are large).
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// Stored in LFS (served through the CDN) or inline.
    pub lfs: bool,
}

impl HubFile {
    /// `name` in the repository, with the bytes of `path`.
    pub fn lfs(name: &str, path: &Path) -> HubFile {
        let bytes = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut hasher = Sha256::new();
        let mut reader = BufReader::with_capacity(1 << 20, bytes);
        std::io::copy(&mut reader, &mut HashWriter(&mut hasher)).unwrap();
        HubFile {
            name: name.into(),
            path: path.into(),
            size: std::fs::metadata(path).unwrap().len(),
            sha256: hex(&hasher.finalize()),
            lfs: true,
        }
    }

    /// A small file kept in git (README.md, config.json).
    pub fn inline(name: &str, dir: &Path, text: &str) -> HubFile {
        let path = dir.join(name.replace('/', "_"));
        std::fs::write(&path, text).unwrap();
        HubFile { lfs: false, ..HubFile::lfs(name, &path) }
    }

    /// The git blob id of the file (what the Hub's `blobId` is).
    fn blob_id(&self) -> String {
        // Not git's sha1 (the tests need no sha1 crate), but stable and hex.
        self.sha256[..40].to_string()
    }
}

struct HashWriter<'a>(&'a mut Sha256);
impl Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stand-in repository.
#[derive(Clone)]
pub struct HubRepo {
    pub id: String,
    /// Revision name (branch or tag) -> commit.
    pub refs: BTreeMap<String, String>,
    pub files: Vec<HubFile>,
    /// Visible only with this token (a private repository).
    pub private_token: Option<String>,
    /// Listed to all, files only with this token (a gated repository).
    pub gated_token: Option<String>,
}

impl HubRepo {
    pub fn new(id: &str, commit: &str, files: Vec<HubFile>) -> HubRepo {
        HubRepo {
            id: id.into(),
            refs: BTreeMap::from([("main".to_string(), commit.to_string())]),
            files,
            private_token: None,
            gated_token: None,
        }
    }

    fn commit_of(&self, rev: &str) -> Option<String> {
        if let Some(c) = self.refs.get(rev) {
            return Some(c.clone());
        }
        self.refs.values().find(|c| c.as_str() == rev).cloned()
    }
}

/// Faults to inject.
#[derive(Clone, Default)]
pub struct Faults {
    /// Close the connection once this byte of a CDN file was sent.
    pub drop_at: Option<u64>,
    /// ...only once (then serve normally), or every time.
    pub drop_once: bool,
    /// Flip the byte at this offset of every CDN file.
    pub corrupt_at: Option<u64>,
    /// Send this many bytes a second at most on the CDN (0: no limit).
    pub throttle_bytes_per_s: u64,
}

/// One request the stand-in saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// `hub` or `cdn`.
    pub server: &'static str,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    /// Body bytes sent in answer.
    pub sent: u64,
}

struct State {
    repos: Vec<HubRepo>,
    faults: Faults,
    dropped: bool,
    log: Vec<Seen>,
}

/// The running stand-in: a Hub listener and a CDN listener on loopback.
pub struct HubStandin {
    /// The Hub's endpoint, for `HF_ENDPOINT`.
    pub endpoint: String,
    pub cdn: String,
    state: Arc<Mutex<State>>,
}

impl HubStandin {
    pub fn start(repos: Vec<HubRepo>) -> HubStandin {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { repos, faults: Faults::default(), dropped: false, log: Vec::new() }));
        for (listener, server) in [(hub, "hub"), (cdn, "cdn")] {
            let state = state.clone();
            let cdn_url = cdn_url.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = state.clone();
                    let cdn_url = cdn_url.clone();
                    std::thread::spawn(move || {
                        let _ = handle(stream, server, &state, &cdn_url);
                    });
                }
            });
        }
        HubStandin { endpoint, cdn: cdn_url, state }
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut s = self.state.lock().unwrap();
        s.faults = faults;
        s.dropped = false;
    }

    pub fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Body bytes the CDN sent (file downloads), over the log.
    pub fn cdn_bytes(&self) -> u64 {
        self.log().iter().filter(|s| s.server == "cdn" && s.method == "GET").map(|s| s.sent).sum()
    }

    pub fn cdn_gets(&self) -> Vec<Seen> {
        self.log().into_iter().filter(|s| s.server == "cdn" && s.method == "GET").collect()
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let (path, query) = target.split_once('?').map_or((target.clone(), String::new()), |(p, q)| (p.into(), q.into()));
    Some(Request { method, path: decode(&path), query, headers })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a response with no body (or a small one) and `Connection: close`.
fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8], head_only: bool) {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = stream.write_all(out.as_bytes());
    if !head_only {
        let _ = stream.write_all(body);
    }
}

fn error(stream: &mut TcpStream, status: &str, code: &str, message: &str, head: bool) {
    let body = format!("{{\"error\":\"{message}\"}}");
    respond(
        stream,
        status,
        &[
            ("X-Error-Code", code.into()),
            ("X-Error-Message", message.into()),
            ("Content-Type", "application/json".into()),
        ],
        body.as_bytes(),
        head,
    );
}

fn handle(mut stream: TcpStream, server: &'static str, state: &Mutex<State>, cdn: &str) -> std::io::Result<()> {
    let Some(req) = read_request(&stream) else { return Ok(()) };
    let head = req.method == "HEAD";
    let seen = Seen {
        method: req.method.clone(),
        server,
        path: req.path.clone(),
        range: req.header("range"),
        authorization: req.header("authorization"),
        sent: 0,
    };
    let index = {
        let mut s = state.lock().unwrap();
        s.log.push(seen);
        s.log.len() - 1
    };
    let sent = if server == "cdn" {
        serve_cdn(&mut stream, &req, state, head)
    } else {
        serve_hub(&mut stream, &req, state, cdn, head)
    };
    state.lock().unwrap().log[index].sent = sent;
    Ok(())
}

fn serve_hub(stream: &mut TcpStream, req: &Request, state: &Mutex<State>, cdn: &str, head: bool) -> u64 {
    let token = req.header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_string));
    let repos = state.lock().unwrap().repos.clone();
    let (api, rest) = match req.path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest.to_string()),
        None => (false, req.path.trim_start_matches('/').to_string()),
    };
    let segs: Vec<&str> = rest.splitn(5, '/').collect();
    if segs.len() < 4 {
        error(stream, "404 Not Found", "EntryNotFound", "Not found", head);
        return 0;
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let repo = repos.iter().find(|r| r.id == id && r.private_token.as_ref().is_none_or(|t| token.as_ref() == Some(t)));
    let Some(repo) = repo else {
        // The Hub does not say whether a repository exists to those who may not see it.
        let status = if token.is_some() { "404 Not Found" } else { "401 Unauthorized" };
        error(stream, status, "RepoNotFound", "Repository not found", head);
        return 0;
    };
    let kind = segs[2];
    let rev = segs[3].to_string();
    let Some(commit) = repo.commit_of(&rev) else {
        error(stream, "404 Not Found", "RevisionNotFound", &format!("Invalid rev id: {rev}"), head);
        return 0;
    };
    if api {
        if kind != "revision" || segs.len() != 4 {
            error(stream, "404 Not Found", "EntryNotFound", "Not found", head);
            return 0;
        }
        let blobs = req.query.split('&').any(|kv| kv == "blobs=true" || kv == "blobs=True" || kv == "blobs=1");
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({"rfilename": f.name});
                if blobs {
                    v["blobId"] = f.blob_id().into();
                    v["size"] = f.size.into();
                    if f.lfs {
                        v["lfs"] = serde_json::json!({"sha256": f.sha256, "size": f.size, "pointerSize": 134});
                    }
                }
                v
            })
            .collect();
        let body = serde_json::json!({
            "_id": "0000", "id": repo.id, "modelId": repo.id, "sha": commit, "private": repo.private_token.is_some(),
            "gated": if repo.gated_token.is_some() { serde_json::json!("manual") } else { serde_json::json!(false) },
            "siblings": siblings, "tags": ["gguf"],
        });
        respond(
            stream,
            "200 OK",
            &[("Content-Type", "application/json; charset=utf-8".into())],
            body.to_string().as_bytes(),
            head,
        );
        return 0;
    }
    if kind != "resolve" || segs.len() != 5 {
        error(stream, "404 Not Found", "EntryNotFound", "Not found", head);
        return 0;
    }
    if let Some(gate) = &repo.gated_token {
        if token.as_ref() != Some(gate) {
            let status = if token.is_some() { "403 Forbidden" } else { "401 Unauthorized" };
            let message = format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in.");
            error(stream, status, "GatedRepo", &message, head);
            return 0;
        }
    }
    let Some(file) = repo.files.iter().find(|f| f.name == segs[4]) else {
        error(stream, "404 Not Found", "EntryNotFound", &format!("{} does not exist on \"{rev}\"", segs[4]), head);
        return 0;
    };
    let mut headers = vec![("X-Repo-Commit", commit.clone()), ("Accept-Ranges", "bytes".to_string())];
    if file.lfs {
        headers.push(("X-Linked-Etag", format!("\"{}\"", file.sha256)));
        headers.push(("X-Linked-Size", file.size.to_string()));
        headers.push(("ETag", format!("\"{}\"", file.blob_id())));
        headers.push((
            "Location",
            format!("{cdn}/repos/{}/{}?X-Amz-Signature=standin", &id.replace('/', "--"), file.sha256),
        ));
        respond(stream, "302 Found", &headers, b"", head);
        0
    } else {
        headers.push(("ETag", format!("\"{}\"", file.blob_id())));
        let body = std::fs::read(&file.path).unwrap();
        respond(stream, "200 OK", &headers, &body, head);
        if head {
            0
        } else {
            body.len() as u64
        }
    }
}

fn serve_cdn(stream: &mut TcpStream, req: &Request, state: &Mutex<State>, head: bool) -> u64 {
    if req.header("authorization").is_some() {
        // What a signed storage URL says to a second credential.
        respond(stream, "400 Bad Request", &[], b"Only one auth mechanism allowed", head);
        return 0;
    }
    let sha = req.path.rsplit('/').next().unwrap_or("").to_string();
    let (file, faults) = {
        let s = state.lock().unwrap();
        let file = s.repos.iter().flat_map(|r| r.files.iter()).find(|f| f.sha256 == sha).cloned();
        (file, s.faults.clone())
    };
    let Some(file) = file else {
        respond(stream, "404 Not Found", &[], b"NoSuchKey", head);
        return 0;
    };
    let start = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes=").and_then(|r| r.split('-').next()).and_then(|s| s.parse::<u64>().ok()));
    let (status, from) = match start {
        Some(from) if from >= file.size => {
            respond(
                stream,
                "416 Range Not Satisfiable",
                &[("Content-Range", format!("bytes */{}", file.size))],
                b"",
                head,
            );
            return 0;
        }
        Some(from) => ("206 Partial Content", from),
        None => ("200 OK", 0),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: binary/octet-stream\r\nAccept-Ranges: bytes\r\nETag: \"{}\"\r\n",
        file.size - from,
        file.sha256
    );
    if from > 0 {
        out.push_str(&format!("Content-Range: bytes {from}-{}/{}\r\n", file.size - 1, file.size));
    }
    out.push_str("\r\n");
    if stream.write_all(out.as_bytes()).is_err() || head {
        return 0;
    }
    let mut f = std::fs::File::open(&file.path).unwrap();
    f.seek(SeekFrom::Start(from)).unwrap();
    let mut at = from;
    let mut buf = vec![0u8; 256 << 10];
    let started = std::time::Instant::now();
    while at < file.size {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let mut n = n;
        if let Some(drop_at) = faults.drop_at {
            let already = state.lock().unwrap().dropped;
            if !(faults.drop_once && already) && at + n as u64 >= drop_at {
                n = drop_at.saturating_sub(at) as usize;
                let _ = stream.write_all(&buf[..n]);
                state.lock().unwrap().dropped = true;
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return at - from + n as u64;
            }
        }
        if let Some(c) = faults.corrupt_at {
            if (at..at + n as u64).contains(&c) {
                buf[(c - at) as usize] ^= 0xff;
            }
        }
        if stream.write_all(&buf[..n]).is_err() {
            return at - from;
        }
        at += n as u64;
        if faults.throttle_bytes_per_s > 0 {
            let due = std::time::Duration::from_secs_f64((at - from) as f64 / faults.throttle_bytes_per_s as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    at - from
}
