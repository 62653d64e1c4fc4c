//! `minnow serve --store`, killed: SIGKILL during a burst of concurrent
//! stored requests (streaming and not), then a restart on the same store.
//! Every request whose answer the client received whole before the kill is
//! in the store exactly once, with the answer the client got; no line is
//! torn; the list API returns them, and its filters, pages, updates and
//! deletes work on what survived.
//!
//! The real binary on a loopback port (the kill must be a real process's).
//! Every wait is bounded.

mod common;

use common::server::Server;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One HTTP/1.1 request with `Connection: close`; the status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        chunked |= h.to_ascii_lowercase().starts_with("transfer-encoding: chunked");
    }
    let mut raw = Vec::new();
    r.read_to_end(&mut raw)?;
    let text = if chunked { dechunk(&raw) } else { String::from_utf8_lossy(&raw).into_owned() };
    Ok((code, text))
}

/// The payload of a chunked body (what arrived of it).
fn dechunk(mut raw: &[u8]) -> String {
    let mut out = Vec::new();
    while let Some(i) = raw.windows(2).position(|w| w == b"\r\n") {
        let Ok(n) = usize::from_str_radix(std::str::from_utf8(&raw[..i]).unwrap_or("").trim(), 16) else { break };
        if n == 0 || raw.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&raw[i + 2..i + 2 + n]);
        raw = &raw[(i + 4 + n).min(raw.len())..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A stored request's answer as its client received it whole: the id and
/// the content. `None` when the answer was cut short.
fn ask(addr: SocketAddr, i: usize, stream: bool) -> Option<(String, String)> {
    let body = json!({
        "messages": [{"role": "user", "content": format!("Write a short line about the number {i}.")}],
        "max_tokens": 24 + (i % 5) * 8, "temperature": 0, "stream": stream,
        "store": true, "metadata": {"client": i.to_string(), "kind": if stream { "stream" } else { "plain" }},
    });
    let (code, text) = http(addr, "POST", "/v1/chat/completions", Some(&body)).ok()?;
    if code != 200 {
        return None;
    }
    if !stream {
        let v: Value = serde_json::from_str(&text).ok()?;
        return Some((v["id"].as_str()?.to_string(), v["choices"][0]["message"]["content"].as_str()?.to_string()));
    }
    let mut id = None;
    let mut content = String::new();
    let mut done = false;
    for line in text.lines() {
        let Some(d) = line.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(d).ok()?;
        id = v["id"].as_str().map(String::from).or(id);
        content += v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    }
    done.then(|| (id.unwrap(), content))
}

#[test]
fn sigkill_during_a_burst_loses_no_answered_request_and_tears_no_record() {
    let dir = common::scratch_dir("serve_store", "store");
    let store = dir.join("store");
    let store_arg = store.display().to_string();
    let server = Server::start(&["--store", &store_arg, "--store-logprobs", "2"]);
    let addr = server.addr;
    let (tx, rx) = mpsc::channel();
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Staggered, so answers complete while others are still running.
                std::thread::sleep(Duration::from_millis(40 * i as u64));
                let _ = tx.send(ask(addr, i, i % 2 == 0));
            })
        })
        .collect();
    drop(tx);
    // Kill once a third have their answers: the rest are mid-flight.
    let mut answered = Vec::new();
    let t = Instant::now();
    while answered.len() < 6 && t.elapsed() < Duration::from_secs(300) {
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(Some(a)) => answered.push(a),
            Ok(None) => {}
            Err(_) => break,
        }
    }
    assert!(answered.len() >= 6, "only {} answers before the deadline", answered.len());
    server.signal(libc::SIGKILL);
    // Clients that raced the kill and still got their whole answer count too.
    for c in clients {
        c.join().unwrap();
    }
    answered.extend(rx.try_iter().flatten());
    drop(server);
    assert!(answered.len() < 16, "the kill came after every answer: nothing was in flight");

    // Every line on disk is whole and parses (opening would refuse otherwise).
    let on_disk = minnow_store::Store::read_all(&store).unwrap();
    let server = Server::start(&["--store", &store_arg]);
    let addr = server.addr;
    let (code, text) = http(addr, "GET", "/v1/chat/completions?limit=100", None).unwrap();
    assert_eq!(code, 200, "{text}");
    let list: Value = serde_json::from_str(&text).unwrap();
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), on_disk.len());
    assert!(data.len() >= answered.len());
    eprintln!("{} of 16 answered before the kill, {} stored", answered.len(), data.len());
    for (id, content) in &answered {
        let hits: Vec<&Value> = data.iter().filter(|r| r["id"] == id.as_str()).collect();
        assert_eq!(hits.len(), 1, "{id} stored {} times", hits.len());
        assert_eq!(hits[0]["choices"][0]["message"]["content"], content.as_str(), "{id}");
        let rec = on_disk.iter().find(|r| &r.id == id).unwrap();
        assert_eq!(rec.logprobs.len(), 1);
        assert!(!rec.logprobs[0].tokens.is_empty() && rec.logprobs[0].top.iter().all(|t| t.len() == 2), "{id}");
        assert_eq!(rec.logprobs[0].tokens.len(), rec.logprobs[0].top.len());
    }

    // The API over what survived: a filter, pages, an update, a delete.
    let (_, t) = http(addr, "GET", "/v1/chat/completions?metadata%5Bkind%5D=stream&limit=100", None).unwrap();
    let streams: Value = serde_json::from_str(&t).unwrap();
    let n_streams = data.iter().filter(|r| r["metadata"]["kind"] == "stream").count();
    assert_eq!(streams["data"].as_array().unwrap().len(), n_streams);
    let mut paged = Vec::new();
    let mut after = String::new();
    for _ in 0..20 {
        let (_, t) = http(addr, "GET", &format!("/v1/chat/completions?limit=2{after}"), None).unwrap();
        let page: Value = serde_json::from_str(&t).unwrap();
        paged.extend(page["data"].as_array().unwrap().iter().map(|r| r["id"].clone()));
        if page["has_more"] != true {
            break;
        }
        after = format!("&after={}", page["last_id"].as_str().unwrap());
    }
    assert_eq!(paged, data.iter().map(|r| r["id"].clone()).collect::<Vec<_>>());
    let first = data[0]["id"].as_str().unwrap();
    let (code, t) =
        http(addr, "POST", &format!("/v1/chat/completions/{first}"), Some(&json!({"metadata": {"reviewed": "yes"}})))
            .unwrap();
    assert_eq!(code, 200, "{t}");
    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["metadata"], json!({"reviewed": "yes"}));
    let (code, _) = http(addr, "DELETE", &format!("/v1/chat/completions/{first}"), None).unwrap();
    assert_eq!(code, 200);
    let (code, _) = http(addr, "GET", &format!("/v1/chat/completions/{first}"), None).unwrap();
    assert_eq!(code, 404);
    drop(server);
    let after_restart = minnow_store::Store::read_all(&store).unwrap();
    assert_eq!(after_restart.len(), on_disk.len() - 1);
}
