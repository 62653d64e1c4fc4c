//! `minnow distill eval` and `minnow distill run` as a user runs them, on
//! SmolLM2-135M and a few cases of the order-extraction task: the report's
//! figures are consistent with the per-case outputs it writes, and a
//! pipeline rerun skips every completed stage.

use std::path::{Path, PathBuf};

mod common;

/// Five dev-style cases: two serve as worked examples.
fn write_dev(dir: &Path) -> PathBuf {
    let p = dir.join("dev.jsonl");
    let rows = [
        ("Liam Okafor here. For the Osaka team we'd like 12 whiteboards. Quote said 79 USD apiece. Delivery date 2025-06-07, please.",
         r#"{"customer": "Liam Okafor", "product": "whiteboard", "quantity": 12, "unit_price": 79, "city": "Osaka", "delivery_date": "2025-06-07"}"#),
        ("Dear sales, we confirm the purchase of 10 standing desks (489.9 USD each). Deliver to Kazan on 2026-07-01. Best, Hana Patel",
         r#"{"customer": "Hana Patel", "product": "standing desk", "quantity": 10, "unit_price": 489.9, "city": "Kazan", "delivery_date": "2026-07-01"}"#),
        ("Order request from Anna Haddad (Berlin branch): 5 x paper shredder, unit price 35 USD, delivery no later than 2025-07-10.",
         r#"{"customer": "Anna Haddad", "product": "paper shredder", "quantity": 5, "unit_price": 35, "city": "Berlin", "delivery_date": "2025-07-10"}"#),
        ("Hi, this is Jonas Schmidt. Please send 4 wireless mice at 310 USD each to our office in Prague by 2025-12-12.",
         r#"{"customer": "Jonas Schmidt", "product": "wireless mouse", "quantity": 4, "unit_price": 310, "city": "Prague", "delivery_date": "2025-12-12"}"#),
        ("Wei Murphy (Lima) orders 2 office chairs at 120 USD each, delivery 2025-03-01.",
         r#"{"customer": "Wei Murphy", "product": "office chair", "quantity": 2, "unit_price": 120, "city": "Lima", "delivery_date": "2025-03-01"}"#),
    ];
    let text: String = rows
        .iter()
        .map(|(m, a)| format!("{{\"prompt\": {}, \"answer\": {a}}}\n", serde_json::json!(format!("Extract the order as JSON with keys customer, product, quantity, unit_price, city, delivery_date.\n\nMessage: {m}"))))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn minnow(args: &[&str]) -> (bool, String, String) {
    let o = common::minnow_cmd().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn eval_report_matches_its_per_case_outputs() {
    let dir = common::scratch_dir("distill-eval", "eval");
    let dev = write_dev(&dir);
    let out = dir.join("report");
    let m = common::smollm2();
    let (ok, stdout, err) = minnow(&[
        "distill",
        "eval",
        dev.to_str().unwrap(),
        "--few-shot",
        dev.to_str().unwrap(),
        "--n-shot",
        "2",
        "--model",
        &format!("zero={}", m.display()),
        "--model-few-shot",
        &format!("two={}", m.display()),
        "--agree-with",
        "two",
        "--max-tokens",
        "64",
        "--parallel",
        "2",
        "-t",
        "2",
        "--price-per-hour",
        "3.6",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("| zero |") && stdout.contains("| two |"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["cases"], 3, "the 2 worked examples are left out of 5 cases");
    let rows = report["models"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let label = row["label"].as_str().unwrap();
        // Recompute field accuracy and exact from the per-case outputs.
        let text = std::fs::read_to_string(out.join("outputs").join(format!("{label}.jsonl"))).unwrap();
        let cases: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(cases.len(), 3);
        let right: u64 = cases.iter().map(|c| c["right"].as_u64().unwrap()).sum();
        let total: u64 = cases.iter().map(|c| c["total"].as_u64().unwrap()).sum();
        assert_eq!(total, 18);
        assert!((row["field_accuracy"].as_f64().unwrap() - right as f64 / 18.0).abs() < 1e-9);
        let exact = cases.iter().filter(|c| c["right"] == c["total"]).count() as f64 / 3.0;
        assert!((row["exact"].as_f64().unwrap() - exact).abs() < 1e-9);
        assert_eq!(row["shots"], if label == "two" { 2 } else { 0 });
        // Few-shot prompts are longer; speeds are real measurements.
        assert!(row["prefill_tok_s"].as_f64().unwrap() > 0.0 && row["decode_tok_s"].as_f64().unwrap() > 0.0);
        // $3.60/hour is $0.001 per second: cost per 1,000 cases follows the wall time.
        let per_case = row["wall_secs"].as_f64().unwrap() / 3.0;
        assert!((row["usd_per_1k_cases"].as_f64().unwrap() - per_case).abs() < 1e-6 * per_case.max(1.0));
    }
    let prompt = |i: usize| rows[i]["prompt_tokens_per_case"].as_f64().unwrap();
    assert!(prompt(1) > 2.0 * prompt(0), "two worked examples should more than double the prompt");
    // A row agrees fully with itself.
    assert_eq!(rows[1]["teacher_agreement"]["field_accuracy"], 1.0);
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<circle").count() == 4, "two panels, two points each");
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("| zero |"));
}

#[test]
fn eval_errors_are_one_line() {
    let dir = common::scratch_dir("distill-eval", "eval-errors");
    let dev = write_dev(&dir);
    let m = common::smollm2();
    let cases: [(&[&str], &str); 3] = [
        (&["--model", "no-such-model"], "no-such-model"),
        (&["--model", m.to_str().unwrap(), "--scorer", "bleu"], "unknown scorer"),
        (&["--model-few-shot", m.to_str().unwrap()], "--few-shot"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["distill", "eval", dev.to_str().unwrap(), "-o", "/tmp/never"];
        args.extend_from_slice(extra);
        let (ok, _, err) = minnow(&args);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn pipeline_runs_label_train_eval_and_a_rerun_skips_every_stage() {
    let dir = common::scratch_dir("distill-eval", "pipeline");
    write_dev(&dir);
    let m = common::smollm2();
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            r#"work_dir = "work"
[label]
inputs = "dev.jsonl"
teacher = "{m}"
max_tokens = 32
parallel = 2
ctx = 512
threads = 2
[train]
student = "{m}"
max_steps = 1
batch_tokens = 512
val_frac = 0.0
threads = 2
[eval]
data = "dev.jsonl"
models = ["base={m}", "tuned=student"]
# exact: every case compares with the teacher's label, JSON or not.
scorer = "exact"
max_tokens = 32
parallel = 2
threads = 2
limit = 2
"#,
            m = m.display()
        ),
    )
    .unwrap();
    let (ok, _, err) = minnow(&["distill", "run", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    for stage in ["label", "train", "eval"] {
        assert!(err.contains(&format!("stage {stage} finished")), "{err}");
    }
    let work = dir.join("work");
    assert_eq!(std::fs::read_to_string(work.join("dataset.jsonl")).unwrap().lines().count(), 5);
    assert!(work.join("student.gguf").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("report/report.json")).unwrap()).unwrap();
    assert_eq!(report["models"][1]["label"], "tuned");
    assert!(report["models"][1]["model"].as_str().unwrap().ends_with("student.gguf"));
    // Teacher agreement comes from the dataset (the same prompts were labeled).
    assert_eq!(report["models"][0]["teacher_agreement"]["cases"], 2);

    let (ok, _, err) = minnow(&["distill", "run", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    for stage in ["label", "train", "eval"] {
        assert!(err.contains(&format!("{stage}: complete, skipped")), "{err}");
    }

    // A typo in the config is one line naming the file.
    std::fs::write(&config, "[label]\ninputs = \"dev.jsonl\"\nteacher = \"x\"\nmax_tokenz = 3\n").unwrap();
    let (ok, _, err) = minnow(&["distill", "run", config.to_str().unwrap()]);
    assert!(!ok && err.contains("pipeline.toml") && err.contains("max_tokenz"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `distill eval --json-schema` runs every row twice, as given and with its
/// answers constrained to the schema: SmolLM2-135M zero-shot, which without
/// the schema gives no usable JSON on these cases (field accuracy 0), scores
/// with it (measured 0.63). `distill label --json-schema` gives a
/// dataset whose every answer is valid JSON of the schema's keys
/// (Qwen2.5-Coder-0.5B as the teacher).
#[test]
fn json_schema_gives_a_constrained_row_pair_and_valid_labels() {
    let dir = common::scratch_dir("distill-eval", "schema");
    let dev = write_dev(&dir);
    let schema = dir.join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"customer": {"type": "string"}, "product": {"type": "string"},
            "quantity": {"type": "integer"}, "unit_price": {"type": "number"}, "city": {"type": "string"},
            "delivery_date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["customer", "product", "quantity", "unit_price", "city", "delivery_date"],
            "additionalProperties": false}"#,
    )
    .unwrap();
    let m = common::smollm2();
    let out = dir.join("report");
    let (ok, _, err) = minnow(&[
        "distill",
        "eval",
        dev.to_str().unwrap(),
        "--model",
        &format!("small={}", m.display()),
        "--json-schema",
        schema.to_str().unwrap(),
        "--max-tokens",
        "160",
        "-t",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let labels: Vec<&str> = report["models"].as_array().unwrap().iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["small", "small, schema"]);
    let acc = |i: usize| report["models"][i]["field_accuracy"].as_f64().unwrap();
    assert!(acc(1) > acc(0) + 0.2, "the schema row ({}) should beat the free row ({})", acc(1), acc(0));

    let keys = ["customer", "product", "quantity", "unit_price", "city", "delivery_date"];
    let data = dir.join("labels.jsonl");
    let (ok, _, err) = minnow(&[
        "distill",
        "label",
        dev.to_str().unwrap(),
        "-o",
        data.to_str().unwrap(),
        "--teacher",
        "qwen2.5-coder-0.5b",
        "--json-schema",
        schema.to_str().unwrap(),
        "--max-tokens",
        "160",
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&data).unwrap();
    let records: Vec<serde_json::Value> =
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 5);
    for r in &records {
        let last = r["messages"].as_array().and_then(|m| m.last()).unwrap_or_else(|| panic!("no messages in {r}"));
        assert_eq!(last["role"], "assistant");
        let answer = last["content"].as_str().unwrap();
        let v: serde_json::Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        let mut got: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        got.sort();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(got, want, "{answer}");
    }
}
