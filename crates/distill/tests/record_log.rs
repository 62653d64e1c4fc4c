//! The record log every stage writes through: torn last lines are dropped,
//! malformed lines are named by line number, ids are never written twice,
//! and reopening continues where the last writer stopped.

use minnow_distill::data::{read_eval_cases, read_inputs, DatasetRecord, RecordLog};
use minnow_engine::chat::ChatMessage;
use std::io::Write;
use std::path::PathBuf;

/// A fresh scratch directory, removed when the guard drops (kept when the
/// test fails).
fn tmp(name: &str) -> Tmp {
    let dir = std::env::temp_dir().join(format!("minnow-record-log-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Tmp(dir)
}

struct Tmp(PathBuf);

impl std::ops::Deref for Tmp {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn rec(id: &str, answer: &str) -> DatasetRecord {
    DatasetRecord {
        id: id.into(),
        messages: vec![
            ChatMessage::new("user", format!("question {id}\nwith a newline")),
            ChatMessage::new("assistant", answer),
        ],
        tools: None,
        provenance: None,
        teacher_logprobs: None,
    }
}

#[test]
fn appends_whole_lines_and_recovers_them() {
    let dir = tmp("append");
    let path = dir.join("sub/dir/data.jsonl");
    {
        let (mut log, rec0) = RecordLog::<DatasetRecord>::open(&path).unwrap();
        assert!(rec0.records.is_empty());
        log.append(&rec("a", "1")).unwrap();
        log.append(&rec("b", "2")).unwrap();
        let err = log.append(&rec("a", "again")).unwrap_err().to_string();
        assert!(err.contains("already recorded"), "{err}");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.ends_with('\n'));
    let (log, got) = RecordLog::<DatasetRecord>::open(&path).unwrap();
    assert_eq!(got.records, vec![rec("a", "1"), rec("b", "2")]);
    assert_eq!(got.torn_bytes, 0);
    assert!(log.contains("a") && log.contains("b") && !log.contains("c"));
}

#[test]
fn a_torn_last_line_is_truncated_and_writing_continues() {
    let dir = tmp("torn");
    let path = dir.join("data.jsonl");
    {
        let (mut log, _) = RecordLog::<DatasetRecord>::open(&path).unwrap();
        log.append(&rec("a", "1")).unwrap();
    }
    // What a kill in the middle of a write leaves: part of a line, no newline.
    let whole = serde_json::to_string(&rec("b", "2")).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&whole.as_bytes()[..whole.len() / 2]).unwrap();
    drop(f);
    let (mut log, got) = RecordLog::<DatasetRecord>::open(&path).unwrap();
    assert_eq!(got.records, vec![rec("a", "1")]);
    assert_eq!(got.torn_bytes as usize, whole.len() / 2);
    assert!(!log.contains("b"));
    log.append(&rec("b", "2")).unwrap();
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1], whole);
}

#[test]
fn a_malformed_complete_line_is_an_error_naming_it() {
    let dir = tmp("bad");
    let path = dir.join("data.jsonl");
    let good = serde_json::to_string(&rec("a", "1")).unwrap();
    std::fs::write(&path, format!("{good}\n{{\"id\": \"b\", \"messages\": 3}}\n")).unwrap();
    let err = RecordLog::<DatasetRecord>::open(&path).err().unwrap().to_string();
    assert!(err.contains("data.jsonl:2:"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    // The file is left as it was: nothing of the user's is destroyed.
    assert!(std::fs::read_to_string(&path).unwrap().ends_with("3}\n"));
}

#[test]
fn inputs_get_line_number_ids_and_clear_errors() {
    let dir = tmp("inputs");
    let p = dir.join("in.jsonl");
    std::fs::write(&p, "{\"prompt\": \"a\"}\n\n{\"id\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"b\"}]}\n{\"id\": 7, \"prompt\": \"c\"}\n").unwrap();
    let got = read_inputs(&p).unwrap();
    let ids: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["1", "x", "7"]);
    assert_eq!(got[1].messages, vec![ChatMessage::new("user", "b")]);

    let cases: [(&str, &str); 5] = [
        ("{\"prompt\": \"a\"}\nnot json\n", "in.jsonl:2:"),
        ("{\"text\": \"a\"}\n", "needs \"prompt\""),
        ("{\"prompt\": \"a\", \"messages\": []}\n", "both"),
        ("{\"id\": \"q\", \"prompt\": \"a\"}\n{\"id\": \"q\", \"prompt\": \"b\"}\n", "appears twice"),
        ("{\"id\": [1], \"prompt\": \"a\"}\n", "\"id\" must be"),
    ];
    for (text, want) in cases {
        std::fs::write(&p, text).unwrap();
        let err = read_inputs(&p).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
    std::fs::write(&p, "{\"prompt\": \"a\"}\n").unwrap();
    let err = read_eval_cases(&p).unwrap_err().to_string();
    assert!(err.contains("no \"answer\""), "{err}");
}

#[test]
fn eval_cases_keep_the_answer_as_written() {
    let dir = tmp("cases");
    let p = dir.join("dev.jsonl");
    std::fs::write(&p, "{\"prompt\": \"p\", \"answer\": {\"zeta\": 1, \"alpha\": \"A\"}}\n{\"prompt\": \"q\", \"answer\": \"plain\"}\n").unwrap();
    let c = read_eval_cases(&p).unwrap();
    // Key order as in the file (not sorted), so a worked example reads naturally.
    assert_eq!(c[0].answer_text(), "{\"zeta\": 1, \"alpha\": \"A\"}");
    assert_eq!(c[1].answer_text(), "plain");
    assert_eq!(c[0].answer_value()["alpha"], "A");
}
