//! `minnow distill label` as a user runs it: the real binary, a real model
//! (SmolLM2-135M), killed with SIGKILL at random moments and rerun with the
//! same command until done — the dataset must equal an uninterrupted run's:
//! no record lost, none duplicated, no torn line. Plus its one-line errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

/// Four order messages from the task, ids given by line number.
fn write_inputs(dir: &Path) -> PathBuf {
    let p = dir.join("inputs.jsonl");
    let lines = [
        "Order request from Anna Haddad (Kazan branch): five x paper shredder, unit price $35.00, delivery no later than 10/07/2025.",
        "Hi, this is Jonas Schmidt. Please send 4 wireless mouses at $310.00 each to our office in Prague.",
        "Dear sales, we confirm the purchase of 10 noise-cancelling headsets (149.5 USD each). Deliver to Beirut. Best, Hana Schmidt",
        "Liam Okafor here. For the Osaka team we'd like 12 whiteboards. Quote said 79 USD apiece.",
    ];
    let text: String = lines
        .iter()
        .map(|m| {
            serde_json::json!({"prompt": format!("Extract the order as JSON.\n\nMessage: {m}")}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn label_cmd(inputs: &Path, out: &Path) -> Command {
    let mut c = common::minnow_cmd();
    c.args(["distill", "label"])
        .arg(inputs)
        .arg("-o")
        .arg(out)
        .arg("--teacher")
        .arg(common::smollm2())
        .args(["--max-tokens", "24", "--parallel", "2", "--threads", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Every line of the dataset, parsed; panics on a torn or malformed line.
fn records(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "a torn last line was left: {:?}", text.lines().last());
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"))).collect()
}

/// id → messages (provenance carries a time, which differs between runs).
fn by_id(recs: &[serde_json::Value]) -> HashMap<String, serde_json::Value> {
    let mut m = HashMap::new();
    for r in recs {
        let id = r["id"].as_str().unwrap().to_string();
        assert!(m.insert(id.clone(), r["messages"].clone()).is_none(), "id {id} written twice");
    }
    m
}

/// A small xorshift generator: the kill times vary per run, and the seed
/// is printed so a failure can be replayed with DISTILL_KILL_SEED.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn label_killed_at_random_points_then_rerun_equals_an_uninterrupted_run() {
    let dir = common::scratch_dir("distill-label", "kill");
    let inputs = write_inputs(&dir);
    let reference = dir.join("reference.jsonl");
    let t0 = Instant::now();
    let out = label_cmd(&inputs, &reference).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut full = t0.elapsed();
    let want = by_id(&records(&reference));
    assert_eq!(want.len(), 4);

    let seed = std::env::var("DISTILL_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("kill seed {seed} (set DISTILL_KILL_SEED to replay); uninterrupted run {full:?}");
    let mut rng = Rng(seed);
    let resumed = dir.join("resumed.jsonl");
    let mut kills = 0;
    let mut done_before = Vec::new();
    // Four kills at random moments of a run (loading included), then one
    // run to the end. A run that finished before its moment came (runs
    // vary: the first one shared the machine with the other test) tells how
    // long a run takes; its complete file is removed, to be labeled again.
    let mut attempts = 0;
    while kills < 4 && attempts < 16 {
        attempts += 1;
        let started = Instant::now();
        let mut child = label_cmd(&inputs, &resumed).spawn().unwrap();
        let at = full.mul_f64(0.1 + 0.8 * rng.next());
        std::thread::sleep(at);
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        if finished {
            full = full.min(started.elapsed());
        }
        // Whatever was written is whole lines of distinct ids, each equal
        // to the uninterrupted run's record.
        let now = by_id(&records(&resumed));
        for (id, m) in &now {
            assert_eq!(Some(m), want.get(id), "record {id} differs from the uninterrupted run");
        }
        done_before.push(now.len());
        if finished {
            let _ = std::fs::remove_file(&resumed);
        }
    }
    let out = label_cmd(&inputs, &resumed).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = by_id(&records(&resumed));
    assert_eq!(got, want, "after {kills} kills (records after each: {done_before:?})");
    assert!(kills >= 1, "no run was killed: the test proved nothing");

    // Once complete, a rerun labels nothing and leaves the file as it is.
    let before = std::fs::read(&resumed).unwrap();
    let out: Output = label_cmd(&inputs, &resumed).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("labeled 0 inputs"), "{err}");
    assert_eq!(std::fs::read(&resumed).unwrap(), before);
}

#[test]
fn label_errors_are_one_line() {
    let dir = common::scratch_dir("distill-label", "errors");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"fine\"}\n{\"prompt\": 5}\n").unwrap();
    let started = Instant::now();
    let out = label_cmd(&bad, &dir.join("out.jsonl")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Bad input is found before a teacher is loaded.
    assert!(started.elapsed() < Duration::from_secs(5));

    // A dataset file that is not a dataset is refused, not appended to.
    let inputs = write_inputs(&dir);
    let not_dataset = dir.join("notes.jsonl");
    std::fs::write(&not_dataset, "{\"note\": 1}\n").unwrap();
    let out = label_cmd(&inputs, &not_dataset).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("notes.jsonl:1:"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read_to_string(&not_dataset).unwrap(), "{\"note\": 1}\n");
}
