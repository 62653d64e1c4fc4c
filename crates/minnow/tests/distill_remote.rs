//! `minnow distill label --teacher-url` against a real `minnow serve` on
//! loopback, through a small fault-injecting HTTP proxy written here: it
//! answers some requests itself with 429 (with and without Retry-After),
//! 500, or a dropped connection, and forwards the rest to the server. The
//! labeler must retry each, honour Retry-After and the requests-per-minute
//! limit, and end with the same dataset as a run without faults.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

/// `minnow serve` on a free port; returns the child and its port.
fn start_server() -> (Child, u16) {
    let model = common::smollm2();
    let mut child = common::minnow_cmd()
        .arg("serve")
        .arg(&model)
        .args(["--port", "0", "--threads", "2", "--parallel", "2", "--ctx", "1024"])
        .env_remove("MINNOW_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("serve printed nothing").unwrap();
    // "minnow serve: NAME on http://127.0.0.1:PORT/ (...)"
    let port = first
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    TooMany { retry_after: Option<u32> },
    ServerError,
    Drop,
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    body: String,
    fault: Option<Fault>,
}

/// Reads one HTTP request: (head, body).
fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// The proxy: request number `n` (counted over all connections) gets
/// `plan[n]` if there is one, else is forwarded. One request per
/// connection (`Connection: close` both ways) keeps the counting exact.
fn start_proxy(server_port: u16, plan: HashMap<usize, Fault>) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut client) = conn else { continue };
            let (log, plan) = (log.clone(), plan.clone());
            std::thread::spawn(move || {
                let Some((head, body)) = read_request(&mut client) else { return };
                let fault = {
                    let mut l = log.lock().unwrap();
                    let fault = plan.get(&l.len()).copied();
                    l.push(Seen { at: Instant::now(), body: String::from_utf8_lossy(&body).into_owned(), fault });
                    fault
                };
                let reply = |c: &mut TcpStream, status: &str, extra: &str| {
                    let msg = "{\"error\": {\"message\": \"injected by the test proxy\"}}";
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{msg}",
                        msg.len()
                    );
                };
                match fault {
                    Some(Fault::TooMany { retry_after }) => {
                        let ra = retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
                        reply(&mut client, "429 Too Many Requests", &ra);
                    }
                    Some(Fault::ServerError) => reply(&mut client, "500 Internal Server Error", ""),
                    Some(Fault::Drop) => {} // closed without a word
                    None => {
                        let mut up = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
                        let head: String = head
                            .split("\r\n")
                            .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
                            .map(|l| format!("{l}\r\n"))
                            .collect();
                        up.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes()).unwrap();
                        up.write_all(&body).unwrap();
                        let mut resp = Vec::new();
                        up.read_to_end(&mut resp).unwrap();
                        let _ = client.write_all(&resp);
                    }
                }
            });
        }
    });
    (port, seen)
}

fn write_inputs(dir: &Path) -> PathBuf {
    let p = dir.join("inputs.jsonl");
    let msgs = [
        "Anna Haddad: five paper shredders at $35.00 to Kazan.",
        "Jonas Schmidt: 4 wireless mouses at $310 each to Prague.",
        "Hana Schmidt: 10 headsets, 149.5 USD each, to Beirut.",
        "Liam Okafor: 12 whiteboards at 79 USD for Osaka.",
    ];
    let text: String = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({"id": format!("order-{i}"), "prompt": format!("Extract the order as JSON.\n\n{m}")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn label(inputs: &Path, out: &Path, port: u16, extra: &[&str]) -> (bool, String) {
    let o = common::minnow_cmd()
        .args(["distill", "label"])
        .arg(inputs)
        .arg("-o")
        .arg(out)
        .args(["--teacher-url", &format!("http://127.0.0.1:{port}"), "--max-tokens", "24", "--concurrency", "2"])
        .args(extra)
        .env_remove("OPENAI_API_KEY")
        .env_remove("MINNOW_API_KEY")
        .output()
        .unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn dataset(out: &Path) -> HashMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(out).unwrap();
    assert!(text.ends_with('\n'));
    let mut m = HashMap::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(m.insert(v["id"].as_str().unwrap().to_string(), v["messages"].clone()).is_none(), "duplicate id");
        assert_eq!(v["provenance"]["finish_reason"].as_str().map(|f| f == "stop" || f == "length"), Some(true));
    }
    m
}

#[test]
fn remote_teacher_retries_injected_faults_and_ends_with_the_same_dataset() {
    let (mut server, server_port) = start_server();
    let dir = common::scratch_dir("distill-remote", "faults");
    let inputs = write_inputs(&dir);

    // Straight to the server: the dataset without faults.
    let clean = dir.join("clean.jsonl");
    let (ok, err) = label(&inputs, &clean, server_port, &[]);
    assert!(ok, "{err}");
    let want = dataset(&clean);
    assert_eq!(want.len(), 4);

    let plan = HashMap::from([
        (0, Fault::TooMany { retry_after: Some(1) }),
        (2, Fault::ServerError),
        (3, Fault::Drop),
        (5, Fault::TooMany { retry_after: None }),
    ]);
    let (proxy_port, seen) = start_proxy(server_port, plan.clone());
    let out = dir.join("through-proxy.jsonl");
    // 600 requests per minute: starts at least 100 ms apart. Faults follow
    // arrival order, and with two requests in flight which input meets
    // which fault depends on timing: one input may meet all four, so the
    // retry budget must cover four (1 + 4 attempts).
    let (ok, err) = label(&inputs, &out, proxy_port, &["--retries", "4", "--backoff", "0.05", "--rpm", "600"]);
    assert!(ok, "{err}");
    assert_eq!(dataset(&out), want, "the dataset through faults differs from the clean one");

    let seen = seen.lock().unwrap().clone();
    // Every fault was met and retried: 4 answers + 4 faults, nothing more.
    assert_eq!(seen.len(), 4 + plan.len(), "{seen:#?}");
    for (n, s) in seen.iter().enumerate() {
        if s.fault.is_some() {
            let retry =
                seen[n + 1..].iter().find(|r| r.body == s.body).unwrap_or_else(|| panic!("request {n} never retried"));
            let waited = retry.at - s.at;
            if s.fault == Some(Fault::TooMany { retry_after: Some(1) }) {
                assert!(waited >= Duration::from_millis(950), "Retry-After: 1 not honoured: retried after {waited:?}");
            }
        }
    }
    let mut starts: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    starts.sort();
    let min_gap = starts.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    // Starts are 100 ms apart at the client; arrival at the proxy can jitter
    // on a loaded machine, but without the limit the two workers' first
    // requests would arrive together.
    assert!(min_gap >= Duration::from_millis(50), "--rpm 600 not honoured: two requests {min_gap:?} apart");

    // A fault that never clears: the input fails with a one-line error
    // naming the status, and the others are still labeled.
    let always: HashMap<usize, Fault> = (0..100).map(|n| (n, Fault::ServerError)).collect();
    let (bad_port, _) = start_proxy(server_port, always);
    let out = dir.join("never.jsonl");
    let (ok, err) = label(&inputs, &out, bad_port, &["--retries", "1", "--backoff", "0.01", "--limit", "1"]);
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(last.contains("could not be labeled") && last.contains("500"), "{err}");
    assert!(std::fs::read_to_string(&out).unwrap().is_empty());

    let _ = server.kill();
    let _ = server.wait();
}

/// A fleet of two endpoints, one behind a proxy that fails every other
/// request (500s and dropped connections), the other the server itself:
/// the dataset equals the one-endpoint dataset, the failing endpoint was
/// benched and came back, and an endpoint that never answers leaves the
/// other to do all the work.
#[test]
fn a_teacher_fleet_with_a_failing_endpoint_ends_with_the_same_dataset() {
    let (mut server, server_port) = start_server();
    let dir = common::scratch_dir("distill-remote", "fleet");
    let inputs = write_inputs(&dir);
    let one = dir.join("one-endpoint.jsonl");
    let (ok, err) = label(&inputs, &one, server_port, &[]);
    assert!(ok, "{err}");
    let want = dataset(&one);

    let half: HashMap<usize, Fault> = (0..200)
        .filter(|n| n % 2 == 0)
        .map(|n| (n, if n % 4 == 0 { Fault::ServerError } else { Fault::Drop }))
        .collect();
    let (flaky_port, seen) = start_proxy(server_port, half);
    let out = dir.join("fleet.jsonl");
    let second = format!("http://127.0.0.1:{server_port}");
    let (ok, err) =
        label(&inputs, &out, flaky_port, &["--teacher-url", &second, "--backoff", "0.05", "--retries", "3"]);
    assert!(ok, "{err}");
    assert_eq!(dataset(&out), want, "the fleet's dataset differs from one endpoint's");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|s| s.fault.is_some()), "the flaky endpoint was never asked");
    assert!(err.contains("teacher fleet:"), "{err}");

    // Through a file, with one endpoint that fails every request.
    let always: HashMap<usize, Fault> = (0..500).map(|n| (n, Fault::ServerError)).collect();
    let (dead_port, dead_seen) = start_proxy(server_port, always);
    let urls = dir.join("teachers.txt");
    std::fs::write(&urls, format!("# the fleet\nhttp://127.0.0.1:{dead_port} 2\nhttp://127.0.0.1:{server_port}  1\n"))
        .unwrap();
    let out = dir.join("fleet-file.jsonl");
    let o = common::minnow_cmd()
        .args(["distill", "label"])
        .arg(&inputs)
        .arg("-o")
        .arg(&out)
        .arg("--teacher-urls")
        .arg(&urls)
        .args(["--max-tokens", "24", "--backoff", "0.05", "--retries", "6"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("MINNOW_API_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(dataset(&out), want);
    assert!(!dead_seen.lock().unwrap().is_empty(), "the failing endpoint was never tried");
    let _ = server.kill();
    let _ = server.wait();
}
