//! `minnow serve` as a user runs it: the real binary on a free loopback
//! port, the key from MINNOW_API_KEY, one request, and a graceful stop on
//! SIGTERM with a log line per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;

/// One HTTP/1.1 request with `Connection: close`; (status, body).
fn http(port: u16, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn serve_binds_loopback_requires_the_env_key_and_stops_on_sigterm() {
    let model = common::smollm2();
    let mut child = common::minnow_cmd()
        .args(["serve"])
        .arg(&model)
        .args(["--port", "0", "--threads", "2", "--parallel", "2", "--ctx", "512", "--price-per-hour", "1.5"])
        .env("MINNOW_API_KEY", "env-key")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start minnow serve");
    // Read stderr on a thread: the first line says where it listens.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    let first = rx.recv_timeout(Duration::from_secs(60)).expect("no startup line");
    let addr = first
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    assert!(addr.starts_with("127.0.0.1:"), "must bind loopback by default: {first}");
    assert!(first.contains("API key required"), "{first}");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();

    assert_eq!(http(port, "GET", "/health", None, "").0, 200);
    assert_eq!(http(port, "GET", "/v1/models", None, "").0, 401);
    let (status, body) = http(
        port,
        "POST",
        "/v1/chat/completions",
        Some("env-key"),
        r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], "smollm2-135m-instruct-q4_1");
    let (_, metrics) = http(port, "GET", "/metrics", Some("env-key"), "");
    assert!(metrics.contains("minnow_price_per_hour_usd 1.5"), "{metrics}");

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut waited = 0;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        waited += 1;
        if waited > 300 {
            let _ = child.kill();
            panic!("minnow serve did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    let log = reader.join().unwrap().join("\n");
    assert!(log.contains("POST /v1/chat/completions 200"), "no request line in the log:\n{log}");
    assert!(log.contains("in=") && log.contains("out=4"), "the request line lacks token counts:\n{log}");
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
}
