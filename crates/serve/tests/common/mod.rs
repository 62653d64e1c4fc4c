//! Shared by the server's integration tests: the test model, an in-process
//! server on a loopback port, and a small HTTP/1.1 client.
//!
//! The client is written here over `std::net::TcpStream` rather than taken
//! from a crate (reqwest, hyper's client): the error-path tests need to send
//! what a well-behaved client library will not (a lying Content-Length,
//! malformed JSON, a connection dropped mid-stream) and to read streams
//! event by event, and it costs no dependency to build on a 2-core CI.

#![allow(dead_code)]

use minnow_engine::loader::LoadedModel;
use minnow_engine::scheduler::{Scheduler, SchedulerConfig};
use minnow_kernels::pool::ThreadPool;
use minnow_serve::{AppState, ServeOptions, Stop};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn smollm2_path() -> PathBuf {
    // Fetched and verified on first use.
    minnow_models::test_model("smollm2-135m-instruct-q4_1.gguf")
}

/// Loaded once per test binary: servers in one binary share the weights.
pub fn smollm2() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(LoadedModel::load(&smollm2_path()).expect("loading SmolLM2"))).clone()
}

/// Compute-heavy tests of one binary take turns: two servers' thread pools
/// on a 2-core machine would only slow each other down.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server running on its own runtime thread; shut down on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: tokio::sync::watch::Sender<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub key: Option<String>,
}

impl TestServer {
    pub fn start(cfg: SchedulerConfig, opts: ServeOptions) -> TestServer {
        TestServer::start_model(smollm2(), cfg, opts)
    }

    /// A server of another model (e.g. speculative decoding's target).
    pub fn start_model(model: Arc<LoadedModel>, cfg: SchedulerConfig, opts: ServeOptions) -> TestServer {
        let key = opts.api_key.clone();
        let scheduler = Scheduler::start(model, ThreadPool::new(2), cfg);
        let state = AppState::new(scheduler, opts);
        // Port 0: the OS picks a free port; tests in parallel never collide.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(Stop::Run);
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                minnow_serve::serve(listener, st, rx).await.unwrap();
            });
        });
        TestServer { addr, state, stop: tx, thread: Some(thread), key }
    }

    /// Default test settings: 4 slots, a 1024-token context.
    pub fn small() -> TestServer {
        TestServer::start(
            SchedulerConfig { max_parallel: 4, ctx: 1024, ..Default::default() },
            ServeOptions { model_id: "smollm2".into(), log_requests: false, ..Default::default() },
        )
    }

    pub fn client(&self) -> Client {
        Client { addr: self.addr, key: self.key.clone() }
    }

    /// Begins a graceful shutdown and waits for `serve` to return.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// A second signal's worth: cut what is left short now.
    pub fn stop_now(&self) {
        let _ = self.stop.send(Stop::Now);
    }

    fn shutdown(&mut self) {
        if *self.stop.borrow() == Stop::Run {
            let _ = self.stop.send(Stop::Graceful);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts an OpenAI-style error body with this status and `param`.
    pub fn assert_error(&self, status: u16, param: Option<&str>) -> Value {
        assert_eq!(self.status, status, "expected {status}, got {}: {}", self.status, self.text());
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "no error.message: {v}");
        assert!(e["type"].is_string(), "no error.type: {v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "error lacks param/code: {v}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "wrong param: {v}");
        }
        v
    }
}

#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub key: Option<String>,
}

/// Reads one HTTP/1.1 response head; returns (status, headers).
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| std::io::Error::other(format!("bad header {l:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok((status, headers))
}

/// A response body being read: chunked or length-delimited.
pub struct BodyReader {
    r: BufReader<TcpStream>,
    chunked: bool,
    remaining: Option<usize>,
    done: bool,
}

impl BodyReader {
    /// The next piece of body, `None` at the end.
    pub fn next_piece(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if self.chunked {
            let mut line = String::new();
            self.r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                self.done = true;
                return Ok(None);
            }
            let mut buf = vec![0; size + 2];
            self.r.read_exact(&mut buf)?;
            buf.truncate(size);
            return Ok(Some(buf));
        }
        let want = self.remaining.unwrap_or(64 << 10).min(64 << 10);
        if want == 0 {
            self.done = true;
            return Ok(None);
        }
        let mut buf = vec![0; want];
        let n = self.r.read(&mut buf)?;
        if n == 0 {
            self.done = true;
            return Ok(None);
        }
        buf.truncate(n);
        if let Some(rem) = &mut self.remaining {
            *rem -= n;
        }
        Ok(Some(buf))
    }

    pub fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(p) = self.next_piece()? {
            out.extend_from_slice(&p);
        }
        Ok(out)
    }

    /// The socket, to drop it (a client hanging up).
    pub fn into_stream(self) -> TcpStream {
        self.r.into_inner()
    }
}

/// Server-sent events read one at a time.
pub struct SseReader {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: BodyReader,
    buf: Vec<u8>,
}

impl SseReader {
    /// The next event's `data:` payload; `None` when the stream ended.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..at + 2).collect();
                let event = String::from_utf8(event).expect("SSE event is not UTF-8");
                let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(data.join("\n"));
            }
            match self.body.next_piece() {
                Ok(Some(p)) => self.buf.extend_from_slice(&p),
                _ => return None,
            }
        }
    }

    /// Every remaining event, up to and including `[DONE]`.
    pub fn collect(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }

    pub fn into_stream(self) -> TcpStream {
        self.body.into_stream()
    }
}

impl Client {
    pub fn with_key(&self, key: Option<&str>) -> Client {
        Client { addr: self.addr, key: key.map(str::to_string) }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        s
    }

    fn head_bytes(&self, method: &str, path: &str, extra: &[(&str, String)]) -> Vec<u8> {
        let mut h = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(k) = &self.key {
            h += &format!("Authorization: Bearer {k}\r\n");
        }
        for (k, v) in extra {
            h += &format!("{k}: {v}\r\n");
        }
        h += "\r\n";
        h.into_bytes()
    }

    /// Sends a request whose head and body are given; returns the open body.
    pub fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, BodyReader) {
        let s = self.connect();
        let mut req = self.head_bytes(method, path, headers);
        req.extend_from_slice(body);
        // Written from another thread: a server that answers before reading
        // a large body (413) must not deadlock us on a full socket buffer,
        // and its closing the connection early is not our error.
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&req);
            let _ = w.flush();
        });
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (status, headers) = read_head(&mut r).expect("reading the response head");
        let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        let remaining =
            headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok());
        if status >= 400 {
            // The server may close without reading the rest: stop writing.
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let _ = writer.join();
        (status, headers, BodyReader { r, chunked, remaining, done: false })
    }

    /// Writes `bytes` as they are (no head added) and returns everything the
    /// server sends until it closes the connection.
    pub fn raw(&self, bytes: &[u8]) -> String {
        let mut s = self.connect();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let mut headers = Vec::new();
        if let Some(b) = body {
            headers.push(("Content-Type", "application/json".to_string()));
            headers.push(("Content-Length", b.len().to_string()));
        }
        let (status, headers, mut br) = self.send_raw(method, path, &headers, body.unwrap_or(&[]));
        let body = br.read_all().expect("reading the response body");
        Response { status, headers, body }
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Response {
        self.request("POST", path, Some(body))
    }

    /// Starts a streaming request; events are read as they come.
    pub fn stream(&self, path: &str, body: &Value) -> SseReader {
        let b = body.to_string();
        let headers = [("Content-Type", "application/json".to_string()), ("Content-Length", b.len().to_string())];
        let (status, headers, body) = self.send_raw("POST", path, &headers, b.as_bytes());
        SseReader { status, headers, body, buf: Vec::new() }
    }

    /// `/metrics`, parsed strictly.
    pub fn metrics(&self) -> prom::Metrics {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        prom::parse(&r.text()).unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{}", r.text()))
    }

    /// Polls `/metrics` until `f` holds or `timeout` passes; returns whether it held.
    pub fn wait_metrics(&self, timeout: Duration, f: impl Fn(&prom::Metrics) -> bool) -> bool {
        let start = Instant::now();
        loop {
            if f(&self.metrics()) {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Text of every choice of a finished stream, by index.
pub fn stream_texts(events: &[String], n: usize) -> (Vec<String>, Vec<Option<String>>, Option<Value>) {
    let mut texts = vec![String::new(); n];
    let mut finish = vec![None; n];
    let mut usage = None;
    for e in events {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("bad event {e}: {err}"));
        assert!(v.get("error").is_none(), "stream error: {v}");
        if !v["usage"].is_null() && v.get("usage").is_some() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            let piece = c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or("");
            texts[i].push_str(piece);
            if let Some(f) = c["finish_reason"].as_str() {
                finish[i] = Some(f.to_string());
            }
        }
    }
    (texts, finish, usage)
}

/// A strict parser of the Prometheus text exposition format (0.0.4), to
/// check `/metrics` the way a scraper would and read values back.
pub mod prom {
    use std::collections::{BTreeMap, BTreeSet};

    pub struct Metrics {
        /// `name{sorted labels}` → value.
        pub samples: BTreeMap<String, f64>,
        pub types: BTreeMap<String, String>,
    }

    impl Metrics {
        /// The value of a series with these labels (all of them, in any order).
        pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            self.samples
                .get(&series_key(name, labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
                .copied()
        }

        /// Sum over every series of `name`, whatever their labels.
        pub fn sum(&self, name: &str) -> f64 {
            self.samples
                .iter()
                .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
                .map(|(_, v)| v)
                .sum()
        }
    }

    fn series_key(name: &str, mut labels: Vec<(String, String)>) -> String {
        labels.sort();
        if labels.is_empty() {
            return name.to_string();
        }
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{name}{{{}}}", l.join(","))
    }

    fn valid_name(s: &str, allow_colon: bool) -> bool {
        let mut chars = s.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (allow_colon && c == ':');
        chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
    }

    fn parse_value(s: &str) -> Result<f64, String> {
        match s {
            "NaN" => Ok(f64::NAN),
            "+Inf" | "Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            _ => s.parse::<f64>().map_err(|_| format!("bad value {s:?}")),
        }
    }

    /// `{a="x",b="y"}` → pairs, checking escapes; returns the rest of the line.
    type Labels = Vec<(String, String)>;

    fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
        let mut labels = Vec::new();
        let mut rest = s.strip_prefix('{').ok_or("expected {")?;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                return Ok((labels, r));
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let name = rest[..eq].trim();
            if !valid_name(name, false) {
                return Err(format!("bad label name {name:?}"));
            }
            rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.iter().any(|(k, _): &(String, String)| k == name) {
                return Err(format!("duplicate label {name}"));
            }
            labels.push((name.to_string(), value));
            rest = &rest[end + 1..];
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
    }

    /// The family a sample belongs to (histogram samples carry suffixes).
    fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
        if types.contains_key(name) {
            return Some(name);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if types.get(base).is_some_and(|t| t == "histogram" || t == "summary") {
                    return Some(base);
                }
            }
        }
        None
    }

    pub fn parse(text: &str) -> Result<Metrics, String> {
        let mut samples = BTreeMap::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps = BTreeSet::new();
        let mut seen_families = BTreeSet::new();
        // histogram family + labels without le → (le, cumulative count) list
        let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        if !text.ends_with('\n') {
            return Err("the text must end with a newline".into());
        }
        for (no, line) in text.lines().enumerate() {
            let err = |m: String| format!("line {}: {m}: {line:?}", no + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(c) = line.strip_prefix('#') {
                let parts: Vec<&str> = c.trim_start().splitn(3, ' ').collect();
                match parts.first().copied() {
                    Some("HELP") => {
                        let name = parts.get(1).ok_or_else(|| err("HELP without a name".into()))?;
                        if !valid_name(name, true) || !helps.insert(name.to_string()) {
                            return Err(err("bad or repeated HELP".into()));
                        }
                    }
                    Some("TYPE") => {
                        let name = parts.get(1).ok_or_else(|| err("TYPE without a name".into()))?;
                        let ty = parts.get(2).ok_or_else(|| err("TYPE without a type".into()))?;
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(ty) {
                            return Err(err(format!("unknown type {ty}")));
                        }
                        if !valid_name(name, true) || types.insert(name.to_string(), ty.to_string()).is_some() {
                            return Err(err("bad or repeated TYPE".into()));
                        }
                        if seen_families.contains(*name) {
                            return Err(err("TYPE after the family's samples".into()));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value".into()))?;
            let name = &line[..name_end];
            if !valid_name(name, true) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(&err)?
            } else {
                (Vec::new(), &line[name_end..])
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.is_empty() || fields.len() > 2 {
                return Err(err("expected a value and an optional timestamp".into()));
            }
            let value = parse_value(fields[0]).map_err(&err)?;
            if let Some(ts) = fields.get(1) {
                ts.parse::<i64>().map_err(|_| err("bad timestamp".into()))?;
            }
            let fam = family(name, &types).ok_or_else(|| err(format!("{name} has no TYPE before it")))?;
            seen_families.insert(fam.to_string());
            let ty = types[fam].as_str();
            if ty == "counter" && (value.is_nan() || value < 0.0) {
                return Err(err("a counter must be >= 0".into()));
            }
            if ty == "histogram" && name.ends_with("_bucket") {
                let le = labels.iter().find(|(k, _)| k == "le").ok_or_else(|| err("bucket without le".into()))?;
                let le = parse_value(&le.1).map_err(&err)?;
                let rest_labels: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                buckets.entry(series_key(fam, rest_labels)).or_default().push((le, value));
            }
            let key = series_key(name, labels);
            if samples.insert(key.clone(), value).is_some() {
                return Err(err(format!("duplicate series {key}")));
            }
        }
        for (series, b) in &buckets {
            for w in b.windows(2) {
                if w[1].0.partial_cmp(&w[0].0) != Some(std::cmp::Ordering::Greater) || w[1].1 < w[0].1 {
                    return Err(format!("{series}: buckets must have increasing le and non-decreasing counts"));
                }
            }
            let last = b.last().unwrap();
            if last.0 != f64::INFINITY {
                return Err(format!("{series}: no +Inf bucket"));
            }
            let (base, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
            let count_key = format!("{base}_count{labels}");
            let count = samples.get(&count_key).ok_or_else(|| format!("{series}: no _count"))?;
            if *count != last.1 {
                return Err(format!("{series}: +Inf bucket {} != _count {count}", last.1));
            }
        }
        Ok(Metrics { samples, types })
    }

    #[test]
    fn the_parser_rejects_what_prometheus_would() {
        assert!(parse("# TYPE a counter\na 1\n").is_ok());
        assert!(parse("a 1\n").is_err(), "no TYPE");
        assert!(parse("# TYPE a counter\na 1").is_err(), "no final newline");
        assert!(parse("# TYPE a counter\na{x=\"1} 1\n").is_err(), "unterminated label");
        assert!(parse("# TYPE a counter\na 1\na 2\n").is_err(), "duplicate");
        assert!(parse("# TYPE a gauge\na one\n").is_err(), "bad value");
        assert!(
            parse("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n").is_err()
        );
        assert!(
            parse("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n").is_ok()
        );
    }
}
