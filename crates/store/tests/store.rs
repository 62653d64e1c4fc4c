//! The stored-completions store on a real directory: operations survive
//! reopening, a torn last line is dropped, compaction keeps what is live,
//! the size bound refuses rather than drops, one writer at a time.

use minnow_store::{ListQuery, Order, Store, StoreError, StoredCompletion};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("minnow-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rec(i: usize, model: &str, task: &str) -> StoredCompletion {
    let mut metadata = BTreeMap::new();
    metadata.insert("task".to_string(), task.to_string());
    StoredCompletion {
        id: format!("chatcmpl-{i}"),
        created: 1_700_000_000 + i as u64,
        model: model.to_string(),
        metadata,
        request: json!({"messages": [{"role": "user", "content": format!("question {i}")}], "temperature": 0}),
        response: json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {i}")}, "finish_reason": "stop"}]}),
        logprobs: Vec::new(),
    }
}

fn ids(p: &minnow_store::completions::Page) -> Vec<String> {
    p.records.iter().map(|r| r.id.clone()).collect()
}

#[test]
fn filters_pages_updates_and_deletes_survive_reopening() {
    let dir = tmp("ops");
    {
        let mut s = Store::open(&dir, None).unwrap();
        for i in 0..10 {
            s.put(&rec(i, if i % 2 == 0 { "base" } else { "orders" }, if i < 5 { "a" } else { "b" })).unwrap();
        }
        assert!(matches!(s.put(&rec(3, "base", "a")), Err(StoreError::Duplicate(_))));
        let q = |model: Option<&str>, task: Option<&str>, after: Option<&str>, limit, order| ListQuery {
            model: model.map(String::from),
            metadata: task.map(|t| vec![("task".to_string(), t.to_string())]).unwrap_or_default(),
            after: after.map(String::from),
            limit,
            order,
        };
        let p = s.list(&q(None, None, None, 4, Order::Asc)).unwrap();
        assert_eq!(ids(&p), ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]);
        assert!(p.has_more);
        let p = s.list(&q(None, None, Some("chatcmpl-7"), 4, Order::Asc)).unwrap();
        assert_eq!(ids(&p), ["chatcmpl-8", "chatcmpl-9"]);
        assert!(!p.has_more);
        let p = s.list(&q(Some("orders"), Some("b"), None, 10, Order::Desc)).unwrap();
        assert_eq!(ids(&p), ["chatcmpl-9", "chatcmpl-7", "chatcmpl-5"]);
        let p = s.list(&q(None, Some("a"), Some("chatcmpl-3"), 10, Order::Desc)).unwrap();
        assert_eq!(ids(&p), ["chatcmpl-2", "chatcmpl-1", "chatcmpl-0"]);
        assert!(matches!(s.list(&q(None, None, Some("nope"), 1, Order::Asc)), Err(StoreError::NotFound(_))));

        let mut m = BTreeMap::new();
        m.insert("task".to_string(), "b".to_string());
        m.insert("reviewed".to_string(), "yes".to_string());
        let r = s.update_metadata("chatcmpl-1", m.clone()).unwrap();
        assert_eq!(r.metadata, m);
        assert_eq!(r.response["choices"][0]["message"]["content"], "answer 1");
        assert!(s.delete("chatcmpl-4").unwrap());
        assert!(!s.delete("chatcmpl-4").unwrap());
        assert!(matches!(s.update_metadata("chatcmpl-4", m), Err(StoreError::NotFound(_))));
    }
    // Reopened: the same state.
    let s = Store::open(&dir, None).unwrap();
    assert_eq!(s.len(), 9);
    assert!(s.get("chatcmpl-4").unwrap().is_none());
    assert_eq!(s.get("chatcmpl-1").unwrap().unwrap().metadata["reviewed"], "yes");
    let q = ListQuery { metadata: vec![("task".into(), "b".into())], limit: 20, ..Default::default() };
    assert_eq!(
        ids(&s.list(&q).unwrap()),
        ["chatcmpl-1", "chatcmpl-5", "chatcmpl-6", "chatcmpl-7", "chatcmpl-8", "chatcmpl-9"]
    );
    // A reader sees the same records without the lock.
    let all = Store::read_all(&dir).unwrap();
    assert_eq!(all.len(), 9);
    assert_eq!(all[1].metadata["reviewed"], "yes");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_torn_last_line_is_dropped_and_the_rest_kept() {
    let dir = tmp("torn");
    {
        let mut s = Store::open(&dir, None).unwrap();
        for i in 0..3 {
            s.put(&rec(i, "m", "a")).unwrap();
        }
    }
    let log = dir.join("completions.jsonl");
    let whole = std::fs::read(&log).unwrap();
    // A put cut off mid-line, as a kill during the write leaves it.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(br#"{"op":"put","record":{"id":"chatcmpl-9","crea"#).unwrap();
    drop(f);
    // A reader ignores it without touching the file.
    assert_eq!(Store::read_all(&dir).unwrap().len(), 3);
    let mut s = Store::open(&dir, None).unwrap();
    assert!(s.torn_bytes > 0);
    assert_eq!(s.len(), 3);
    assert_eq!(std::fs::read(&log).unwrap(), whole);
    s.put(&rec(9, "m", "a")).unwrap();
    drop(s);
    assert_eq!(Store::read_all(&dir).unwrap().len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compaction_keeps_the_live_records_and_their_metadata() {
    let dir = tmp("compact");
    let mut s = Store::open(&dir, None).unwrap();
    s.set_compact_min(1);
    for i in 0..20 {
        s.put(&rec(i, "m", "a")).unwrap();
    }
    let mut m = BTreeMap::new();
    m.insert("task".to_string(), "kept".to_string());
    s.update_metadata("chatcmpl-19", m).unwrap();
    let before = s.file_bytes();
    for i in 0..15 {
        s.delete(&format!("chatcmpl-{i}")).unwrap();
    }
    // Dead bytes outweighed live ones: the log was rewritten.
    assert!(s.file_bytes() < before, "{} !< {before}", s.file_bytes());
    assert_eq!(s.file_bytes(), s.live_bytes());
    let p = s.list(&ListQuery { limit: 100, ..Default::default() }).unwrap();
    assert_eq!(ids(&p), (15..20).map(|i| format!("chatcmpl-{i}")).collect::<Vec<_>>());
    assert_eq!(s.get("chatcmpl-19").unwrap().unwrap().metadata["task"], "kept");
    s.put(&rec(20, "m", "a")).unwrap();
    drop(s);
    let s = Store::open(&dir, None).unwrap();
    assert_eq!(s.len(), 6);
    assert_eq!(s.get("chatcmpl-19").unwrap().unwrap().metadata["task"], "kept");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_size_bound_refuses_new_records_and_deleting_makes_room() {
    let dir = tmp("full");
    let one = {
        let mut s = Store::open(&dir, None).unwrap();
        s.put(&rec(0, "m", "a")).unwrap();
        s.live_bytes()
    };
    std::fs::remove_dir_all(&dir).unwrap();
    let mut s = Store::open(&dir, Some(3 * one + one / 2)).unwrap();
    for i in 0..3 {
        s.put(&rec(i, "m", "a")).unwrap();
    }
    let e = s.put(&rec(3, "m", "a")).unwrap_err();
    assert!(matches!(e, StoreError::Full { .. }), "{e}");
    assert!(e.to_string().contains("--store-max-bytes"), "{e}");
    assert_eq!(s.len(), 3);
    s.delete("chatcmpl-0").unwrap();
    s.put(&rec(3, "m", "a")).unwrap();
    assert_eq!(s.len(), 3);
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_writer_at_a_time_and_foreign_files_are_refused() {
    let dir = tmp("lock");
    let s = Store::open(&dir, None).unwrap();
    let e = Store::open(&dir, None).err().unwrap().to_string();
    assert!(e.contains("in use by another process"), "{e}");
    drop(s);
    Store::open(&dir, None).unwrap();
    std::fs::write(dir.join("completions.jsonl"), "{\"prompt\": \"hi\"}\n").unwrap();
    let e = Store::open(&dir, None).err().unwrap().to_string();
    assert!(e.contains("completions.jsonl:1") && e.contains("minnow store"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    let e = Store::read_all(&dir).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
}
