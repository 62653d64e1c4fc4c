//! examples/traffic-to-student/run.sh end to end at a small scale: a
//! teacher served with `--store` gets task traffic (and unrelated chat)
//! from the official `openai` client, `distill run` trains a LoRA student
//! on `store:…?metadata.task=orders` for two steps and evaluates both on
//! two dev cases, and the student answers as an adapter of its base.

mod common;

use std::process::Command;

#[test]
fn the_traffic_to_student_example_runs_end_to_end() {
    let dir = common::scratch_dir("traffic-to-student", "work");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/traffic-to-student/run.sh");
    let teacher = minnow_models::test_model("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let out = Command::new("bash")
        .arg(&script)
        .env("MINNOW", env!("CARGO_BIN_EXE_minnow"))
        .env("WORK_DIR", &*dir)
        .env("TEACHER", &teacher)
        .env("STUDENT", common::smollm2())
        .env("N_ORDERS", "6")
        .env("N_CHAT", "2")
        .env("STEPS", "2")
        .env("EVAL_LIMIT", "2")
        .env("THREADS", "2")
        .env("NO_PROXY", "*")
        .env_remove("MINNOW_API_KEY")
        .output()
        .expect("cannot run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run.sh failed:\n{stdout}\n{stderr}");

    // The traffic: six task requests and two chat ones, all stored.
    let traffic = std::fs::read_to_string(dir.join("traffic.txt")).unwrap();
    assert!(traffic.contains("stored: 6 orders, 2 chat"), "{traffic}");
    // What the student trained on is the task's traffic only.
    let export = dir.join("orders.jsonl");
    let spec = format!("store:{}?metadata.task=orders", dir.join("store").display());
    let o = common::minnow_cmd().args(["distill", "export", &spec, "-o"]).arg(&export).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = std::fs::read_to_string(&export).unwrap();
    let n = records.lines().count();
    assert!((2..=6).contains(&n), "{n} task records (answers cut at max_tokens are left out)");
    assert!(records.lines().all(|l| l.contains("Extract the order")), "a chat request got into the task data");
    // Trained, evaluated, served.
    assert!(dir.join("orders-adapter.gguf").is_file() && dir.join("student.gguf").is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report/report.json")).unwrap()).unwrap();
    assert_eq!(report["models"].as_array().map(Vec::len), Some(3), "{report}");
    assert!(report["models"].as_array().unwrap().iter().all(|m| m["cases"] == 2), "{report}");
    assert!(stdout.contains("served: [") && stdout.contains("'orders'"), "{stdout}");
    assert!(stdout.contains("orders adapter: "), "{stdout}");
}
