//! `--store` on the HTTP side: which requests are recorded (`store: true`,
//! or every chat request with `--store-all`; never a request without it),
//! what is refused (`store` without a store, on /v1/completions, bad
//! `metadata`), the key in front of the store API, and a full store (the
//! answer stands, the record is not written, `/metrics` counts it).
//! SIGKILL during a burst is `crates/minnow/tests/serve_store.rs`; the
//! official client over the API is `openai_python.rs`.

mod common;

use common::TestServer;
use minnow_engine::scheduler::SchedulerConfig;
use minnow_serve::{ServeOptions, StoreConfig};
use minnow_store::Store;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

fn store_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("minnow-serve-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn server(dir: &std::path::Path, all: bool, key: Option<&str>, max_bytes: Option<u64>) -> TestServer {
    let store = Store::open(dir, max_bytes).unwrap();
    TestServer::start(
        SchedulerConfig { max_parallel: 2, ctx: 1024, ..Default::default() },
        ServeOptions {
            model_id: "smollm2".into(),
            log_requests: false,
            api_key: key.map(String::from),
            store: Some(StoreConfig { store: Arc::new(Mutex::new(store)), all, logprobs: 0 }),
            ..Default::default()
        },
    )
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn listed(s: &TestServer) -> Vec<Value> {
    let r = s.client().get("/v1/chat/completions?limit=100");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["data"].as_array().unwrap().clone()
}

#[test]
fn only_requests_that_ask_are_stored_unless_store_all() {
    let _turn = common::heavy();
    let dir = store_dir("ask");
    {
        let s = server(&dir, false, None, None);
        let c = s.client();
        assert_eq!(c.post("/v1/chat/completions", &chat("not kept", json!({}))).status, 200);
        assert_eq!(c.post("/v1/chat/completions", &chat("not kept", json!({"store": false}))).status, 200);
        assert!(listed(&s).is_empty());
        let r = c.post("/v1/chat/completions", &chat("kept", json!({"store": true, "metadata": {"task": "t"}})));
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let all = listed(&s);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0]["id"], id.as_str());
        assert_eq!(all[0]["metadata"], json!({"task": "t"}));
        assert_eq!(all[0]["choices"], r.json()["choices"]);
        // The request is kept as sent, less the storing parameters.
        let rec = &Store::read_all(&dir).unwrap()[0];
        assert_eq!(rec.request, chat("kept", json!({})));
        // The legacy completions endpoint has no stored completions.
        let e = c.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2, "store": true}));
        e.assert_error(400, Some("store"));
        let m = c.get(&format!("/v1/chat/completions/{id}/messages"));
        assert_eq!(m.status, 200, "{}", m.text());
        assert_eq!(m.json()["data"][0]["content"], "kept");
        assert_eq!(m.json()["data"][0]["id"], format!("{id}-0"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let s = server(&dir, true, None, None);
    assert_eq!(s.client().post("/v1/chat/completions", &chat("every one", json!({}))).status, 200);
    let all = listed(&s);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["metadata"], json!({}));
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn store_without_a_store_and_bad_metadata_are_refused() {
    let _turn = common::heavy();
    let s = TestServer::small();
    let c = s.client();
    let e = c.post("/v1/chat/completions", &chat("x", json!({"store": true})));
    let v = e.assert_error(400, Some("store"));
    assert!(v["error"]["message"].as_str().unwrap().contains("--store DIR"), "{v}");
    let e = c.get("/v1/chat/completions");
    assert_eq!(e.status, 404);
    assert!(e.text().contains("--store DIR"), "{}", e.text());
    c.post("/v1/chat/completions", &chat("x", json!({"store": "yes"}))).assert_error(400, Some("store"));
    drop(s);

    let dir = store_dir("meta");
    let s = server(&dir, false, None, None);
    let c = s.client();
    let many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    c.post("/v1/chat/completions", &chat("x", json!({"store": true, "metadata": many})))
        .assert_error(400, Some("metadata"));
    c.post("/v1/chat/completions", &chat("x", json!({"store": true, "metadata": {"n": 3}})))
        .assert_error(400, Some("metadata.n"));
    let long = "k".repeat(65);
    c.post("/v1/chat/completions", &chat("x", json!({"store": true, "metadata": {long.clone(): "v"}})))
        .assert_error(400, Some(format!("metadata.{long}").as_str()));
    c.post("/v1/chat/completions", &chat("x", json!({"store": true, "metadata": {"k": "v".repeat(513)}})))
        .assert_error(400, Some("metadata.k"));
    assert!(listed(&s).is_empty(), "a refused request was stored");
    let r = c.post("/v1/chat/completions/nope", &json!({"metadata": {"a": "b"}}));
    assert_eq!(r.status, 404);
    c.get("/v1/chat/completions?limit=0").assert_error(400, Some("limit"));
    c.get("/v1/chat/completions?after=nope").assert_error(404, Some("after"));
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_store_api_needs_the_key() {
    let _turn = common::heavy();
    let dir = store_dir("key");
    let s = server(&dir, false, Some("k1"), None);
    let anon = s.client().with_key(None);
    assert_eq!(anon.get("/v1/chat/completions").status, 401);
    assert_eq!(anon.get("/v1/chat/completions/x").status, 401);
    assert_eq!(anon.request("DELETE", "/v1/chat/completions/x", None).status, 401);
    assert_eq!(s.client().with_key(Some("wrong")).get("/v1/chat/completions").status, 401);
    assert_eq!(s.client().get("/v1/chat/completions").status, 200);
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_store_still_answers_and_counts_what_it_did_not_keep() {
    let _turn = common::heavy();
    let dir = store_dir("full");
    // One record stored, then a bound of one and a half of it.
    let (a, one) = {
        let s = server(&dir, false, None, None);
        let a = s.client().post("/v1/chat/completions", &chat("first", json!({"store": true})));
        assert_eq!(a.status, 200, "{}", a.text());
        let one = s.state.options().store.as_ref().unwrap().store.lock().unwrap().live_bytes();
        (a, one)
    };
    let s = server(&dir, false, None, Some(one * 3 / 2));
    let c = s.client();
    let b = c.post("/v1/chat/completions", &chat("second", json!({"store": true})));
    assert_eq!(b.status, 200, "{}", b.text());
    let b2 = c.stream("/v1/chat/completions", &chat("third", json!({"store": true, "stream": true}))).collect();
    assert_eq!(b2.last().map(String::as_str), Some("[DONE]"));
    let all = listed(&s);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["id"], a.json()["id"]);
    let metrics = c.get("/metrics").text();
    assert!(metrics.contains("minnow_store_failed_total 2"), "{metrics}");
    assert!(metrics.contains("minnow_store_written_total 0"), "{metrics}");
    // Deleting makes room again.
    assert_eq!(
        c.request("DELETE", &format!("/v1/chat/completions/{}", all[0]["id"].as_str().unwrap()), None).status,
        200
    );
    assert_eq!(c.post("/v1/chat/completions", &chat("fourth", json!({"store": true}))).status, 200);
    assert_eq!(listed(&s).len(), 1);
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}
