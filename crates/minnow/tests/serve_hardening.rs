//! `minnow serve` against hostile and careless clients, as the real binary
//! (the process's own signal dispositions matter: a write to a reset socket
//! once killed it with SIGPIPE) on a loopback port:
//!
//! - chaos: resets mid-body and mid-stream, hundreds of abandoned
//!   connections, a slowloris client and a slow reader; afterwards the same
//!   greedy request gives the same text and memory has not grown;
//! - shutdown: SIGTERM with long streams in flight ends each with an error
//!   the official `openai` client raises, and the process exits within the
//!   grace period plus two seconds; a second signal ends it at once;
//! - header, body and idle timeouts and the connection limit.
//!
//! Every loop is bounded in count and time; all traffic goes to 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::server::Server;

/// Closes with a TCP reset (SO_LINGER 0) instead of a FIN.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a pointer to a linger struct of the given size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    drop(s);
}

fn request(path: &str, key: Option<&str>, body: &str, keep_alive: bool) -> String {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let conn = if keep_alive { "" } else { "Connection: close\r\n" };
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{conn}{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One request with `Connection: close`: (status, body).
fn call(server: &Server, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut s = server.connect();
    s.write_all(request(path, key, body, false).as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, body)
}

/// The text of a greedy completion.
fn greedy_text(server: &Server, key: Option<&str>) -> String {
    let body = r#"{"prompt":"The three primary colors are","max_tokens":24,"temperature":0}"#;
    let (status, out) = call(server, "/v1/completions", key, body);
    assert_eq!(status, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// True when the server has closed `s`: a read returns end-of-file or a
/// reset (after anything it sent first) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

const KEY: &str = "chaos-key";

/// The tests here measure timeouts and exit times in seconds: they take
/// turns, so one test's server does not slow another's on a 2-core machine.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn chaos_costs_the_server_nothing_but_the_requests_involved() {
    let _turn = one_at_a_time();
    let mut server = Server::start(&["--api-key", KEY, "--header-timeout", "2", "--idle-timeout", "20"]);
    let before = greedy_text(&server, Some(KEY));
    // Warm-up: a few streams so the allocator and the prefix cache settle.
    for _ in 0..3 {
        greedy_text(&server, Some(KEY));
    }
    let rss_warm = server.rss();
    let mut tried = 0;

    // 1. The request that used to kill the process (exit 141, SIGPIPE):
    // a body shorter than its Content-Length, then a reset; with the key
    // (the body is read) and without (401 before the body).
    for i in 0..20 {
        let mut s = server.connect();
        let key = if i % 4 == 3 { None } else { Some(KEY) };
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n{{\"p");
        s.write_all(head.as_bytes()).unwrap();
        if i % 2 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        reset(s);
        tried += 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    server.assert_alive("after resets mid-body");

    // 2. Resets mid-stream, after the first events arrived.
    for i in 0..20 {
        let mut s = server.connect();
        let body = format!(
            r#"{{"prompt":"Count to one hundred: {i},","max_tokens":200,"temperature":0,"stream":true,"ignore_eos":true}}"#
        );
        s.write_all(request("/v1/completions", Some(KEY), &body, true).as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("\"text\"") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended before its first token");
            got.extend_from_slice(&buf[..n]);
        }
        reset(s);
        tried += 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    server.assert_alive("after resets mid-stream");

    // 3. 200 connections opened and abandoned: half closed with FIN, half
    // with RST, some after part of a request head.
    for i in 0..200 {
        let mut s = server.connect();
        match i % 4 {
            0 => {}
            1 => s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHo").unwrap(),
            2 => s.write_all(b"GET /health HTTP/1.1\r\n").unwrap(),
            _ => s
                .write_all(request("/v1/completions", Some(KEY), r#"{"prompt":"Hi","max_tokens":2}"#, true).as_bytes())
                .unwrap(),
        }
        if i % 2 == 0 {
            drop(s);
        } else {
            reset(s);
        }
        tried += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    server.assert_alive("after abandoned connections");

    // 4. A slowloris client (a header byte every 300 ms) is cut off by the
    // header timeout while a normal client is served meanwhile.
    let addr = server.addr;
    let slowloris = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        for b in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if s.write_all(&[*b]).is_err() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(300));
            if t.elapsed() > Duration::from_secs(15) {
                break;
            }
        }
        closed_by_server(&mut s, Duration::from_secs(5)).then(|| t.elapsed())
    });
    assert_eq!(greedy_text(&server, Some(KEY)), before, "a normal request while the slowloris dawdles");
    let cut = slowloris.join().unwrap().expect("the slowloris connection was never closed");
    assert!(cut < Duration::from_secs(6), "the slowloris held its connection for {cut:?} (header timeout 2 s)");
    tried += 1;

    // 5. A client that reads its stream slower than it is produced still
    // gets all of it.
    let mut s = server.connect();
    s.write_all(
        request(
            "/v1/completions",
            Some(KEY),
            r#"{"prompt":"Once upon a time","max_tokens":150,"temperature":0,"stream":true,"ignore_eos":true}"#,
            false,
        )
        .as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let t = Instant::now();
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.elapsed() < Duration::from_secs(120), "the slow reader's stream never ended");
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("data: [DONE]"),
        "the slow reader's stream was cut: {}",
        &text[text.len().saturating_sub(300)..]
    );
    tried += 1;

    // Afterwards: the same answer, no growth beyond 50 MB.
    server.assert_alive("after the chaos");
    assert_eq!(greedy_text(&server, Some(KEY)), before, "the greedy answer changed after the chaos");
    let rss_after = server.rss();
    eprintln!(
        "chaos: {tried} hostile clients, server alive; RSS {:.1} MB after warm-up, {:.1} MB after",
        rss_warm as f64 / 1e6,
        rss_after as f64 / 1e6
    );
    assert!(rss_after < rss_warm + 50_000_000, "resident memory grew from {rss_warm} to {rss_after} bytes");
    // The process ends cleanly.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(15)).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn sigterm_cuts_long_streams_with_an_error_the_openai_client_raises() {
    let _turn = one_at_a_time();
    let probe = Command::new("python3").args(["-c", "import openai"]).output();
    assert!(
        probe.map(|o| o.status.success()).unwrap_or(false),
        "the `openai` Python package is missing: run .ci/run, which installs it"
    );
    let grace = 2.0;
    let mut server = Server::start(&["--shutdown-grace", "2", "--alias", "shutdown-test"]);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/shutdown_streams.py");
    let mut py = Command::new("python3")
        .arg(&script)
        .env("MINNOW_BASE_URL", format!("http://{}/v1", server.addr))
        .env("MINNOW_MODEL_ID", "shutdown-test")
        .env("STREAMS", "4")
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("OPENAI_BASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot run python3");
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY", "the streams did not start");
    server.signal(libc::SIGTERM);
    let t = Instant::now();
    // New connections are refused at once.
    std::thread::sleep(Duration::from_millis(300));
    assert!(TcpStream::connect(server.addr).is_err(), "still accepting after SIGTERM");
    let status = server.wait_exit(Duration::from_secs_f64(grace + 10.0)).expect("minnow serve did not exit");
    let took = t.elapsed();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let py_status = py.wait().unwrap();
    eprintln!("{rest}");
    assert!(status.success(), "exit status {status}");
    assert!(took.as_secs_f64() <= grace + 2.0, "exited {took:?} after SIGTERM, grace {grace} s");
    assert!(took.as_secs_f64() >= grace - 0.5, "exited {took:?} after SIGTERM: before the grace period was over");
    assert!(py_status.success(), "the openai client did not raise for every cut stream:\n{rest}");
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("grace period over")), "{log:?}");
}

#[test]
fn a_second_signal_ends_the_server_at_once() {
    let _turn = one_at_a_time();
    let mut server = Server::start(&["--shutdown-grace", "60"]);
    let mut s = server.connect();
    s.write_all(
        request(
            "/v1/completions",
            None,
            r#"{"prompt":"Once upon a time","max_tokens":1500,"temperature":0,"stream":true,"ignore_eos":true}"#,
            false,
        )
        .as_bytes(),
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    server.assert_alive("after one SIGTERM with a stream in flight and a 60 s grace");
    let t = Instant::now();
    server.signal(libc::SIGINT);
    let status = server.wait_exit(Duration::from_secs(10)).expect("no exit after the second signal");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?} after the second signal", t.elapsed());
    assert!(status.success(), "{status}");
    // The stream ended with an error event, not [DONE].
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(!rest.contains("[DONE]"), "a cut stream ended with [DONE]");
    assert!(rest.contains("\"shutting_down\""), "no error event at the end of the cut stream: {rest:?}");
}

#[test]
fn timeouts_and_the_connection_limit() {
    let _turn = one_at_a_time();
    let mut server = Server::start(&["--header-timeout", "1", "--idle-timeout", "3", "--max-connections", "6"]);
    let health = |s: &mut TcpStream| {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200")
    };

    // The limit: six open connections are served; a seventh is closed
    // at once without an answer; when one of the six goes, there is room.
    let mut six: Vec<TcpStream> = (0..6).map(|_| server.connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut seventh = server.connect();
    let _ = seventh.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(closed_by_server(&mut seventh, Duration::from_secs(2)), "a 7th connection was kept open");
    for s in &mut six {
        assert!(health(s), "an open connection was not served at the limit");
    }
    drop(six.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = server.connect();
    assert!(health(&mut again), "no room after a connection closed");
    drop(again);
    drop(six);
    std::thread::sleep(Duration::from_millis(200));

    // Idle: a connection that sends nothing, and one idle after a response,
    // are closed after the idle timeout (3 s), not before the header one.
    let t = Instant::now();
    let mut silent = server.connect();
    let mut kept = server.connect();
    assert!(health(&mut kept));
    assert!(!closed_by_server(&mut silent, Duration::from_millis(1500)), "closed before the idle timeout");
    assert!(closed_by_server(&mut silent, Duration::from_secs(4)), "an idle connection stayed open");
    assert!(closed_by_server(&mut kept, Duration::from_secs(4)), "an idle keep-alive connection stayed open");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    // Header: part of a head, then nothing: closed after ~1 s.
    let mut partial = server.connect();
    partial.write_all(b"POST /v1/completions HTTP/1.1\r\nHost").unwrap();
    let t = Instant::now();
    assert!(closed_by_server(&mut partial, Duration::from_secs(3)), "a half-sent head kept its connection");
    assert!(t.elapsed() < Duration::from_millis(2500), "{:?}", t.elapsed());

    // Body: a head promising 50 bytes, 3 sent, then a stall: 408 in JSON.
    let mut stalled = server.connect();
    stalled.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"p").unwrap();
    let mut out = Vec::new();
    let _ = stalled.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("\"request_timeout\""), "{out}");

    server.assert_alive("after the timeouts");
    let (status, body) = call(&server, "/v1/completions", None, r#"{"prompt":"Hi","max_tokens":2}"#);
    assert_eq!(status, 200, "{body}");
    let mut m = server.connect();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut metrics = String::new();
    m.read_to_string(&mut metrics).unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert!(value("minnow_http_connections_refused_total") >= 1.0);
    assert!(value("minnow_http_connections_timed_out_total") >= 3.0);
}
