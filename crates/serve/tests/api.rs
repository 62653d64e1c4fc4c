//! The HTTP API against a real server on a loopback port (SmolLM2-135M):
//! response shapes, parameters, and every error path — bad JSON, wrong
//! types, out-of-range values, oversized bodies, context overflow, missing
//! and wrong keys, a full queue, a client that disconnects mid-stream —
//! plus `/metrics` parsed strictly and a graceful shutdown.

mod common;

use common::{stream_texts, Client, TestServer};
use minnow_engine::scheduler::SchedulerConfig;
use minnow_serve::ServeOptions;
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One server for the tests that do not need their own settings.
fn shared() -> Client {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(TestServer::small).client()
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"model": "smollm2", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn models_health_index_and_tokenizer_endpoints() {
    let c = shared();
    let m = c.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "smollm2");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(c.get("/v1/models/smollm2").json()["id"], "smollm2");
    c.get("/v1/models/gpt-5").assert_error(404, None);
    assert_eq!(c.get("/health").json()["status"], "ok");
    let page = c.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.text().contains("<title>minnow</title>"));

    let t = c.post("/tokenize", &json!({"content": "Hello world"})).json();
    assert_eq!(t, json!({"tokens": [19556, 905]}));
    // `prompt` is accepted as the field name too; special tokens parse by default.
    assert_eq!(c.post("/tokenize", &json!({"prompt": "<|im_start|>"})).json()["tokens"], json!([1]));
    assert!(
        c.post("/tokenize", &json!({"content": "<|im_start|>", "parse_special": false})).json()["tokens"]
            .as_array()
            .unwrap()
            .len()
            > 1
    );
    let p = c.post("/tokenize", &json!({"content": "Hello", "with_pieces": true})).json();
    assert_eq!(p["tokens"][0]["piece"], "Hello");
    assert_eq!(c.post("/detokenize", &json!({"tokens": [19556, 905]})).json(), json!({"content": "Hello world"}));

    c.post("/tokenize", &json!({"content": 5})).assert_error(400, Some("content"));
    c.post("/tokenize", &json!({})).assert_error(400, Some("content"));
    c.post("/tokenize", &json!({"content": "x", "add_special": "yes"})).assert_error(400, Some("add_special"));
    c.post("/detokenize", &json!({"tokens": "abc"})).assert_error(400, Some("tokens"));
    c.post("/detokenize", &json!({"tokens": [1, "a"]})).assert_error(400, Some("tokens[1]"));
    c.post("/detokenize", &json!({"tokens": [1, 999999]})).assert_error(400, Some("tokens[1]"));
    c.get("/no/such/route").assert_error(404, None);
    c.get("/v1/completions").assert_error(405, None);
    // GET /v1/chat/completions lists stored completions: none without --store.
    let e = c.get("/v1/chat/completions").assert_error(404, None);
    assert!(e["error"]["message"].as_str().unwrap().contains("--store DIR"), "{e}");
}

#[test]
fn chat_completion_shape_and_streaming_agree() {
    let c = shared();
    let body = chat("Name three colours.", json!({}));
    let r = c.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "smollm2");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    assert!(choice["logprobs"].is_null());
    let u = &v["usage"];
    let (p, k) = (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap());
    assert!(p > 5 && (1..=12).contains(&k), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + k);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // The same request streamed: same text, role first, usage last, [DONE].
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let s = c.stream("/v1/chat/completions", &sbody);
    assert_eq!(s.status, 200);
    assert!(s
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/event-stream")));
    let events = s.collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    for e in &events[..events.len() - 2] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v["usage"].is_null() && v.get("usage").is_some(), "chunks carry usage: null with include_usage: {e}");
    }
    let (texts, finish, usage) = stream_texts(&events, 1);
    assert_eq!(texts[0], text, "streamed text differs from the non-streamed one");
    assert_eq!(finish[0].as_deref(), choice["finish_reason"].as_str());
    let usage = usage.expect("no usage chunk");
    assert_eq!(usage["completion_tokens"], u["completion_tokens"]);
    assert_eq!(usage["prompt_tokens"], u["prompt_tokens"]);
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));

    // Without include_usage, no usage anywhere.
    sbody["stream_options"] = Value::Null;
    let events = c.stream("/v1/chat/completions", &sbody).collect();
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
}

#[test]
fn completions_with_logprobs_stop_and_token_prompts() {
    let c = shared();
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 3});
    let v = c.post("/v1/completions", &body).json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let ch = &v["choices"][0];
    let text = ch["text"].as_str().unwrap();
    let lp = &ch["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len(), lp["token_logprobs"].as_array().unwrap().len());
    assert_eq!(tokens.len(), lp["top_logprobs"].as_array().unwrap().len());
    assert_eq!(tokens.len(), lp["text_offset"].as_array().unwrap().len());
    assert_eq!(tokens.concat(), text, "greedy text is the concatenation of its tokens");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0);
        // Greedy: the chosen token is the most likely one.
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!((best - chosen).abs() < 1e-5, "chosen {chosen}, best {best}");
    }

    // Token ids as the prompt give the same answer as the text.
    let ids = c.post("/tokenize", &json!({"content": "The capital of France is", "add_special": true})).json()
        ["tokens"]
        .clone();
    let v2 = c.post("/v1/completions", &json!({"prompt": ids, "max_tokens": 8, "temperature": 0})).json();
    assert_eq!(v2["choices"][0]["text"], text);

    // A stop string cuts the text before it, finish_reason "stop".
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() >= 3 {
        let stop = format!(" {}", words[2]);
        let cut = &text[..text.find(&stop).unwrap()];
        for stop_param in [json!(stop), json!(["zzzz", stop])] {
            let v3 = c.post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": stop_param})).json();
            assert_eq!(v3["choices"][0]["text"], cut);
            assert_eq!(v3["choices"][0]["finish_reason"], "stop");
        }
    }

    // Streamed completion with logprobs.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = c.stream("/v1/completions", &sb).collect();
    let (texts, finish, _) = stream_texts(&events, 1);
    assert_eq!(texts[0], text);
    assert_eq!(finish[0].as_deref(), ch["finish_reason"].as_str());
    let with_lp = events.iter().filter(|e| e.contains("\"token_logprobs\"")).count();
    assert!(with_lp >= tokens.len().min(1));
}

#[test]
fn chat_logprobs_and_n_choices() {
    let c = shared();
    let v = c
        .post(
            "/v1/chat/completions",
            &chat("Say hello.", json!({"logprobs": true, "top_logprobs": 2, "max_tokens": 6})),
        )
        .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for e in content {
        assert!(e["token"].is_string() && e["logprob"].as_f64().unwrap() <= 0.0);
        let bytes: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), e["token"].as_str().unwrap());
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], e["token"], "greedy picks the most likely token");
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }

    // n = 2, sampled with a seed: two choices, reproducible.
    let body = chat("Tell me a word.", json!({"n": 2, "temperature": 1.0, "seed": 42, "max_tokens": 8}));
    let a = c.post("/v1/chat/completions", &body).json();
    let b = c.post("/v1/chat/completions", &body).json();
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"][1]["index"], 1);
    assert_eq!(a["choices"], b["choices"], "same seed, same choices");
    let per_choice: u64 = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(per_choice >= 2);

    // n = 2 streamed: both indices end with a finish reason.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = c.stream("/v1/chat/completions", &sb).collect();
    let (texts, finish, _) = stream_texts(&events, 2);
    assert!(finish.iter().all(Option::is_some));
    assert_eq!(texts[0], a["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(texts[1], a["choices"][1]["message"]["content"].as_str().unwrap());
}

#[test]
fn bad_requests_are_400s_naming_the_parameter() {
    let c = shared();
    // Malformed JSON and non-object bodies.
    let r = c.post_raw("/v1/chat/completions", b"{\"messages\": [");
    assert_eq!(r.assert_error(400, None)["error"]["code"], "invalid_json");
    c.post_raw("/v1/chat/completions", b"[1, 2]").assert_error(400, None);
    c.post_raw("/v1/completions", b"").assert_error(400, None);
    c.post_raw("/v1/completions", &[0xff, 0xfe]).assert_error(400, None);

    // Wrong types and out-of-range values.
    for (k, v) in [
        ("temperature", json!("warm")),
        ("temperature", json!(-1)),
        ("max_tokens", json!("10")),
        ("max_tokens", json!(0)),
        ("n", json!(1.5)),
        ("n", json!(99)),
        ("top_p", json!(2)),
        ("seed", json!([1])),
        ("stop", json!({"a": 1})),
        ("stream", json!(1)),
        ("presence_penalty", json!(5)),
        ("top_k", json!("many")),
        ("logprobs", json!("yes")),
        ("top_logprobs", json!(50)),
        ("stream_options", json!(true)),
    ] {
        let mut body = chat("hi", json!({}));
        body[k] = v.clone();
        if k == "top_logprobs" {
            body["logprobs"] = json!(true);
        }
        let e = c.post("/v1/chat/completions", &body).assert_error(400, Some(k));
        assert!(e["error"]["message"].as_str().unwrap().contains(k), "{e}");
    }
    // top_logprobs needs logprobs.
    c.post("/v1/chat/completions", &chat("hi", json!({"top_logprobs": 2}))).assert_error(400, Some("top_logprobs"));
    // n beyond the server's slots (4 here).
    c.post("/v1/chat/completions", &chat("hi", json!({"n": 5}))).assert_error(400, Some("n"));
    // Messages.
    c.post("/v1/chat/completions", &json!({"model": "x"})).assert_error(400, Some("messages"));
    c.post("/v1/chat/completions", &json!({"messages": []})).assert_error(400, Some("messages"));
    c.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": 7}]}))
        .assert_error(400, Some("messages[0].content"));
    c.post("/v1/chat/completions", &json!({"messages": [{"content": "x"}]}))
        .assert_error(400, Some("messages[0].role"));
    // Completion prompts.
    c.post("/v1/completions", &json!({"max_tokens": 3})).assert_error(400, Some("prompt"));
    c.post("/v1/completions", &json!({"prompt": {"text": "x"}})).assert_error(400, Some("prompt"));
    c.post("/v1/completions", &json!({"prompt": [1, 2, 99999999]})).assert_error(400, Some("prompt[2]"));
    c.post("/v1/completions", &json!({"prompt": "x", "echo": true})).assert_error(400, Some("echo"));
    c.post("/v1/completions", &json!({"prompt": "x", "logprobs": 99})).assert_error(400, Some("logprobs"));

    // Unknown parameters are ignored.
    let r = c.post(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 2, "user": "u1", "frobnicate": {"x": [1]}, "metadata": null})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Splits the responses in `raw` (what a connection received) into
/// (status, body) pairs; bodies are length-delimited here.
fn responses(raw: &str) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some((head, after)) = rest.split_once("\r\n\r\n") {
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(after.len());
        out.push((status, after[..len.min(after.len())].to_string()));
        rest = &after[len.min(after.len())..];
    }
    out
}

#[test]
fn malformed_http_gets_a_400_with_an_openai_style_body() {
    let c = shared();
    let cases: [(&str, &[u8], u16); 8] = [
        ("garbage", b"GARBAGE\r\n\r\n", 400),
        ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n", 400),
        ("unknown version", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (
            "conflicting Content-Length",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
            400,
        ),
        ("negative Content-Length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -4\r\n\r\n{}", 400),
        (
            "non-numeric Content-Length",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}",
            400,
        ),
        ("header without a colon", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", 400),
        ("space in the path", b"GET /v1 /models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ];
    for (what, req, status) in cases {
        let raw = c.raw(req);
        let r = responses(&raw);
        assert_eq!(r.len(), 1, "{what}: {raw:?}");
        assert_eq!(r[0].0, status, "{what}: {raw:?}");
        let v: Value = serde_json::from_str(&r[0].1).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {raw:?}"));
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
        assert_eq!(v["error"]["code"], "malformed_request", "{what}: {v}");
        assert!(raw.to_ascii_lowercase().contains("content-type: application/json"), "{what}: {raw:?}");
    }
    // Headers past hyper's limit: 431, also in JSON.
    let mut big = b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..4000 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(100)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let raw = c.raw(&big);
    let r = responses(&raw);
    assert_eq!(r.first().map(|x| x.0), Some(431), "{}", &raw[..raw.len().min(300)]);
    let v: Value = serde_json::from_str(&r[0].1).unwrap();
    assert_eq!(v["error"]["code"], "headers_too_large");
    // A malformed request after a good one on a keep-alive connection.
    let raw = c.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/9.9\r\n\r\n");
    let r = responses(&raw);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![200, 400], "{raw:?}");
    assert_eq!(serde_json::from_str::<Value>(&r[1].1).unwrap()["error"]["code"], "malformed_request");
    // The routes' own 400s are untouched: bad JSON still names its problem.
    let e = c.post_raw("/v1/completions", b"{\"prompt\": ").assert_error(400, None);
    assert_ne!(e["error"]["code"], "malformed_request", "{e}");
}

#[test]
fn model_must_be_the_id_or_an_alias() {
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 2, ctx: 512, ..Default::default() },
        ServeOptions {
            model_id: "smollm2".into(),
            aliases: vec!["orders-v1".into(), "support".into()],
            log_requests: false,
            ..Default::default()
        },
    );
    let c = s.client();
    let ask = |model: Option<Value>| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0});
        if let Some(m) = model {
            body["model"] = m;
        }
        c.post("/v1/chat/completions", &body)
    };
    for name in ["smollm2", "orders-v1", "support"] {
        let r = ask(Some(json!(name)));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        // Responses name the model itself, whichever name asked for it.
        assert_eq!(r.json()["model"], "smollm2");
        assert_eq!(c.get(&format!("/v1/models/{name}")).json()["id"], "smollm2");
    }
    for r in [ask(None), ask(Some(Value::Null))] {
        assert_eq!(r.status, 200, "no model means the default: {}", r.text());
    }
    for name in ["gpt-4o", "../../etc/passwd", "SMOLLM2", "smollm2 ", ""] {
        let e = ask(Some(json!(name))).assert_error(404, Some("model"));
        assert_eq!(e["error"]["code"], "model_not_found", "{name}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(&format!("`{name}`")), "{e}");
        let e = c
            .post("/v1/completions", &json!({"model": name, "prompt": "Hi", "max_tokens": 2}))
            .assert_error(404, Some("model"));
        assert_eq!(e["error"]["code"], "model_not_found");
    }
    ask(Some(json!(5))).assert_error(400, Some("model"));
    let listed = c.get("/v1/models").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed["data"][0]["meta"]["aliases"], json!(["orders-v1", "support"]));
}

#[test]
fn context_overflow_is_a_400_with_both_numbers() {
    let c = shared();
    // The test server's context is 1024 tokens.
    let r = c.post("/v1/chat/completions", &chat("Hello there", json!({"max_tokens": 5000})));
    let e = r.assert_error(400, Some("messages"));
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let msg = e["error"]["message"].as_str().unwrap();
    let prompt_tokens = c.post("/v1/chat/completions", &chat("Hello there", json!({"max_tokens": 1}))).json()["usage"]
        ["prompt_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        msg.contains("1024") && msg.contains("5000") && msg.contains(&format!("{prompt_tokens} in the messages")),
        "{msg}"
    );

    // A prompt longer than the context, without max_tokens.
    let long = "word ".repeat(1500);
    let e = c.post("/v1/completions", &json!({"prompt": long})).assert_error(400, Some("prompt"));
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    // Without max_tokens the rest of the context is allowed: no overflow.
    let ok = c.post("/v1/completions", &json!({"prompt": "word ".repeat(900), "temperature": 0, "stop": ["\n"]}));
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn oversized_bodies_are_413() {
    let c = shared();
    let limit = minnow_serve::DEFAULT_MAX_BODY_BYTES;
    // Declared too large: refused before the body is read.
    let big = vec![b' '; limit + 10];
    let r = c.post_raw("/v1/chat/completions", &big);
    assert_eq!(r.assert_error(413, None)["error"]["code"], "request_too_large");
    // Chunked with no length: refused once the limit is passed.
    let mut chunked = Vec::new();
    let piece = vec![b' '; 1 << 20];
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(&piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, _, mut body) =
        c.send_raw("POST", "/v1/completions", &[("Transfer-Encoding", "chunked".into())], &chunked);
    assert_eq!(status, 413);
    let v: Value = serde_json::from_slice(&body.read_all().unwrap_or_default()).unwrap_or(Value::Null);
    assert_eq!(v["error"]["code"], "request_too_large");
    // The server is fine afterwards.
    assert_eq!(c.get("/health").status, 200);
}

#[test]
fn api_key_is_required_when_set() {
    let _g = common::heavy();
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 2, ctx: 512, ..Default::default() },
        ServeOptions {
            model_id: "smollm2".into(),
            api_key: Some("sekrit-key".into()),
            log_requests: false,
            ..Default::default()
        },
    );
    let c = s.client();
    let anon = c.with_key(None);
    let e = anon.post("/v1/chat/completions", &chat("hi", json!({"max_tokens": 2}))).assert_error(401, None);
    assert_eq!(e["error"]["type"], "authentication_error");
    c.with_key(Some("wrong-key"))
        .post("/v1/chat/completions", &chat("hi", json!({"max_tokens": 2})))
        .assert_error(401, None);
    c.with_key(Some("sekrit-ke")).get("/v1/models").assert_error(401, None);
    anon.get("/metrics").assert_error(401, None);
    anon.post("/tokenize", &json!({"content": "x"})).assert_error(401, None);
    // Health checks and the page need no key.
    assert_eq!(anon.get("/health").status, 200);
    assert_eq!(anon.get("/").status, 200);
    let ok = c.post("/v1/chat/completions", &chat("hi", json!({"max_tokens": 2})));
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(c.get("/v1/models").status, 200);
}

/// The active-slot gauge, from a strict parse of /metrics.
fn active(c: &Client) -> f64 {
    c.metrics().get("minnow_active_requests", &[]).unwrap()
}

#[test]
fn full_queue_is_429_and_a_client_that_leaves_frees_its_slot() {
    let _g = common::heavy();
    // One slot, one queue place.
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 1, max_queue: 1, ctx: 2048, ..Default::default() },
        ServeOptions { model_id: "smollm2".into(), log_requests: false, ..Default::default() },
    );
    let c = s.client();
    let long =
        json!({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "temperature": 0, "stream": true});
    // A: running (its first token has arrived).
    let mut a = c.stream("/v1/completions", &long);
    assert_eq!(a.status, 200);
    assert!(a.next_data().is_some());
    // B: waits in the queue.
    let mut b = c.stream(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true}),
    );
    assert_eq!(b.status, 200);
    let role = b.next_data().unwrap();
    assert!(role.contains("\"role\":\"assistant\""));
    assert!(c.wait_metrics(Duration::from_secs(10), |m| m.get("minnow_queue_depth", &[]) == Some(1.0)));
    // C: no room.
    let r = c.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    let e = r.assert_error(429, None);
    assert_eq!(e["error"]["code"], "queue_full");
    let retry: u64 = r.header("retry-after").expect("no Retry-After").parse().unwrap();
    assert!(retry >= 1);

    // B hangs up while queued: its place frees.
    drop(b.into_stream());
    assert!(
        c.wait_metrics(Duration::from_secs(10), |m| m.get("minnow_queue_depth", &[]) == Some(0.0)),
        "queued request not dropped"
    );
    // A hangs up mid-stream: its slot frees long before 1500 tokens.
    assert_eq!(active(&c), 1.0);
    let t = Instant::now();
    drop(a.into_stream());
    assert!(
        c.wait_metrics(Duration::from_secs(10), |m| m.get("minnow_active_requests", &[]) == Some(0.0)),
        "slot not freed"
    );
    eprintln!("slot freed {:.0} ms after the disconnect", t.elapsed().as_secs_f64() * 1e3);
    // The freed slot serves the next request at once.
    let r = c.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.text());
    // A non-streaming client that leaves while waiting is cancelled too
    // (a raw socket: the response head would come only at the very end).
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "temperature": 0}).to_string();
    let mut sock = std::net::TcpStream::connect(c.addr).unwrap();
    use std::io::Write;
    write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    assert!(c.wait_metrics(Duration::from_secs(10), |m| m.get("minnow_active_requests", &[]) == Some(1.0)));
    drop(sock);
    assert!(
        c.wait_metrics(Duration::from_secs(10), |m| m.get("minnow_active_requests", &[]) == Some(0.0)),
        "waiting client not cancelled"
    );
    let m = c.metrics();
    assert!(m
        .get("minnow_requests_total", &[("endpoint", "/v1/completions"), ("status", "499")])
        .is_some_and(|n| n >= 1.0));
}

#[test]
fn metrics_parse_as_prometheus_text_and_count() {
    let _g = common::heavy();
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 2, ctx: 512, ..Default::default() },
        ServeOptions { model_id: "smollm2".into(), price_per_hour: 3.6, log_requests: false, ..Default::default() },
    );
    let c = s.client();
    let m0 = c.metrics();
    for name in ["minnow_queue_depth", "minnow_active_requests", "minnow_batch_size", "minnow_estimated_cost_usd_total"]
    {
        assert!(m0.get(name, &[]).is_some(), "{name} missing");
    }
    assert_eq!(m0.types["minnow_time_to_first_token_seconds"], "histogram");
    assert_eq!(m0.types["minnow_time_per_output_token_seconds"], "histogram");
    let r = c.post("/v1/chat/completions", &chat("Count to five.", json!({"max_tokens": 10})));
    assert_eq!(r.status, 200);
    let k = r.json()["usage"]["completion_tokens"].as_u64().unwrap() as f64;
    c.post("/v1/chat/completions", &json!({"messages": 1})).assert_error(400, Some("messages"));
    let m = c.metrics();
    assert_eq!(m.get("minnow_requests_total", &[("endpoint", "/v1/chat/completions"), ("status", "200")]), Some(1.0));
    assert_eq!(m.get("minnow_requests_total", &[("endpoint", "/v1/chat/completions"), ("status", "400")]), Some(1.0));
    assert_eq!(m.get("minnow_completion_tokens_total", &[]), Some(k));
    assert!(m.get("minnow_prompt_tokens_total", &[]).unwrap() > 5.0);
    assert_eq!(m.get("minnow_time_to_first_token_seconds_count", &[]), Some(1.0));
    if k >= 2.0 {
        assert_eq!(m.get("minnow_time_per_output_token_seconds_count", &[]), Some(k - 1.0));
    }
    assert!(m.get("minnow_steps_total", &[]).unwrap() >= k);
    let busy = m.get("minnow_busy_seconds_total", &[]).unwrap();
    assert!(busy > 0.0);
    let cost = m.get("minnow_estimated_cost_usd_total", &[]).unwrap();
    assert!((cost - 3.6 * busy / 3600.0).abs() < 1e-9, "cost {cost} busy {busy}");
    let per_m = m.get("minnow_cost_per_million_tokens_usd", &[("tokens", "completion")]).unwrap();
    assert!((per_m - cost / k * 1e6).abs() < 1e-6 * per_m.max(1.0));
}

#[test]
fn graceful_shutdown_finishes_then_cancels_in_flight_streams() {
    let _g = common::heavy();
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 2, ctx: 2048, ..Default::default() },
        ServeOptions {
            model_id: "smollm2".into(),
            log_requests: false,
            shutdown_grace: Duration::from_millis(1500),
            ..Default::default()
        },
    );
    let c = s.client();
    let mut long = c.stream("/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "temperature": 0, "stream": true}));
    assert!(long.next_data().is_some());
    let t = Instant::now();
    let stopper = std::thread::spawn(move || s.stop());
    // The stream runs on through the grace period, then is cut short with
    // an error event and no `[DONE]`: the client can tell.
    let mut events = Vec::new();
    while let Some(d) = long.next_data() {
        events.push(d);
    }
    let waited = t.elapsed();
    assert!(events.len() > 5, "the stream went on during the grace period: {events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "a cut stream must not end with [DONE]: {events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "shutting_down", "{last}");
    let (_, finish, _) = stream_texts(&events[..events.len() - 1], 1);
    assert_eq!(finish[0], None, "a cut stream has no finish_reason");
    assert!(waited >= Duration::from_millis(1000) && waited < Duration::from_secs(20), "{waited:?}");
    stopper.join().unwrap();
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(c.addr).is_err());
}
