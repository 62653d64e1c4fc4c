//! The built-in chat page in headless Chromium: loading `/?q=...` sends the
//! message at once; the reply streams into the page, and the page must end
//! up showing exactly the text the API gives for the same greedy request.
//!
//! The page is read through the DevTools protocol (a minimal WebSocket
//! client below): `--dump-dom` snapshots the page before a streamed reply
//! has arrived, since virtual time does not wait for a response body that
//! is still streaming.
//!
//! Skipped, loudly, when no Chromium is installed — except under CI
//! (`CI` set), where `.ci/run` installs Debian's chromium and a missing
//! browser is a failure (unless `.ci/run` found no apt-get and said so by
//! setting `MINNOW_SKIP_BROWSER`).

mod common;

use common::TestServer;
use minnow_engine::scheduler::SchedulerConfig;
use minnow_serve::ServeOptions;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn find_chromium() -> Option<String> {
    for c in
        ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome", "/usr/bin/google-chrome-stable"]
    {
        if std::path::Path::new(c).exists() {
            return Some(c.to_string());
        }
    }
    None
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Kills the browser and removes its profile however the test ends.
struct Browser {
    child: Child,
    profile: std::path::PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A WebSocket connection to one DevTools target, enough for
/// request/response commands: masked text frames out, (possibly
/// fragmented) text frames in.
struct DevTools {
    r: BufReader<TcpStream>,
    w: TcpStream,
    next_id: u64,
}

impl DevTools {
    fn connect(port: u16, path: &str) -> DevTools {
        let w = TcpStream::connect(("127.0.0.1", port)).expect("connect to DevTools");
        w.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = BufReader::new(w.try_clone().unwrap());
        let mut w2 = w.try_clone().unwrap();
        write!(
            w2,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: bWlubm93LXRlc3Qta2V5IQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(" 101 "), "WebSocket upgrade refused: {line}");
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        DevTools { r, w, next_id: 1 }
    }

    fn send_text(&mut self, text: &str) {
        let p = text.as_bytes();
        let mut f = vec![0x81u8];
        match p.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.w.write_all(&f).unwrap();
    }

    fn read_message(&mut self) -> String {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.r.read_exact(&mut h).unwrap();
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let mut len = (h[1] & 0x7f) as u64;
            if len == 126 {
                let mut b = [0u8; 2];
                self.r.read_exact(&mut b).unwrap();
                len = u16::from_be_bytes(b) as u64;
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.r.read_exact(&mut b).unwrap();
                len = u64::from_be_bytes(b);
            }
            let mut payload = vec![0u8; len as usize];
            self.r.read_exact(&mut payload).unwrap();
            match opcode {
                0x0 | 0x1 => msg.extend_from_slice(&payload),
                0x8 => panic!("DevTools closed the connection"),
                _ => continue, // ping/pong: nothing to answer for a short test
            }
            if fin {
                return String::from_utf8(msg).unwrap();
            }
        }
    }

    /// Evaluates `expr` in the page; its value, returned by value.
    fn eval(&mut self, expr: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let cmd =
            json!({"id": id, "method": "Runtime.evaluate", "params": {"expression": expr, "returnByValue": true}});
        self.send_text(&cmd.to_string());
        loop {
            let v: Value = serde_json::from_str(&self.read_message()).unwrap();
            if v["id"] == id {
                return v["result"]["result"]["value"].clone();
            }
        }
    }
}

/// A plain HTTP GET to the DevTools port (JSON endpoints).
fn devtools_get(port: u16, path: &str) -> Value {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    write!(&s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    // Read by Content-Length: the DevTools server may keep the connection open.
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("bad DevTools JSON ({e}): {}", String::from_utf8_lossy(&body)))
}

#[test]
fn chat_page_streams_a_reply_in_headless_chromium() {
    let Some(chromium) = find_chromium() else {
        // .ci/run sets MINNOW_SKIP_BROWSER only where it cannot install Chromium.
        if std::env::var_os("CI").is_some() && std::env::var_os("MINNOW_SKIP_BROWSER").is_none() {
            panic!("Chromium is not installed, but CI must run the browser test: .ci/run installs Debian's chromium");
        }
        eprintln!("\n*** SKIPPED: the browser test needs Chromium (apt-get install chromium); not found ***\n");
        return;
    };
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 2, ctx: 1024, ..Default::default() },
        ServeOptions { model_id: "smollm2".into(), log_requests: false, ..Default::default() },
    );
    let question = "What is 2 + 2? Answer <briefly> & clearly.";
    let url = format!("http://{}/?q={}&temperature=0&max_tokens=24", s.addr, query_escape(question));
    let profile = std::env::temp_dir().join(format!("minnow-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
            "--no-proxy-server",
            // Port 0: Chromium picks one and writes it to DevToolsActivePort.
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start chromium");
    let browser = Browser { child, profile: profile.clone() };
    let start = Instant::now();
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(profile.join("DevToolsActivePort"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse().ok())
        {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "Chromium did not open its DevTools port");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ws_path = loop {
        let targets = devtools_get(port, "/json/list");
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.1")));
        if let Some(p) = page {
            let ws = p["webSocketDebuggerUrl"].as_str().unwrap();
            break ws[ws.find("/devtools/").unwrap()..].to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no page target: {targets}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut dt = DevTools::connect(port, &ws_path);
    // Poll the page (bounded) until it says the reply is complete.
    let state = loop {
        let v = dt.eval(
            "JSON.stringify({state: document.body.dataset.state, reply: (document.getElementById('reply-1') || {}).textContent, \
             done: (document.getElementById('reply-1') || {dataset: {}}).dataset.done, \
             user: (document.querySelector('.msg.user') || {}).innerHTML, \
             stats: (document.querySelector('.stats') || {}).textContent, \
             error: (document.querySelector('.msg.error') || {}).textContent})",
        );
        let v: Value = serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap();
        if v["state"] == "done" || v["state"] == "error" {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "the page did not finish its reply in 240 s: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(browser);
    assert_eq!(state["state"], "done", "the page reported an error: {state}");
    assert_eq!(state["done"], "true");
    // The question is shown as text, not interpreted as HTML.
    assert_eq!(state["user"], "What is 2 + 2? Answer &lt;briefly&gt; &amp; clearly.");
    assert!(state["stats"].as_str().unwrap_or("").contains("prompt tokens"), "no usage line: {state}");

    // Exactly what the API gives for the same greedy request.
    let api = s.client().post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24}),
    );
    let expected = api.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!expected.is_empty());
    assert_eq!(state["reply"], expected.as_str(), "the page shows a different reply than the API gives");
}
