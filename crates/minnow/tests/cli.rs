//! The `minnow` binary end to end, on a real model (SmolLM2-135M): the JSON
//! shapes scripts rely on, determinism of seeded sampling, and one-line errors.

use serde_json::Value;
use std::io::Write;
use std::process::{Output, Stdio};

mod common;

fn minnow(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = common::minnow_cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start minnow");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "minnow failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn tokenize_json_matches_golden_shape_and_ids() {
    let m = common::smollm2_arg();
    let v = json_of(&minnow(&["tokenize", &m, "--json"], Some("Hello world")));
    assert_eq!(v, serde_json::json!({"ids": [19556, 905]}));
    // Special tokens parse only when asked.
    let plain = json_of(&minnow(&["tokenize", &m, "--json"], Some("<|im_start|>")));
    let special = json_of(&minnow(&["tokenize", &m, "--json", "--parse-special"], Some("<|im_start|>")));
    assert_eq!(special["ids"], serde_json::json!([1]));
    assert!(plain["ids"].as_array().unwrap().len() > 1);
}

#[test]
fn logits_json_has_one_entry_per_position_best_first() {
    let m = common::smollm2_arg();
    let v = json_of(&minnow(&["logits", &m, "--ids", "1,2,3,4", "--top", "5", "--json"], None));
    assert_eq!(v["ids"], serde_json::json!([1, 2, 3, 4]));
    let positions = v["positions"].as_array().unwrap();
    assert_eq!(positions.len(), 4);
    for p in positions {
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let logits: Vec<f64> = top.iter().map(|t| t["logit"].as_f64().unwrap()).collect();
        assert!(logits.windows(2).all(|w| w[0] >= w[1]), "not best first: {logits:?}");
        for t in top {
            assert!(t["logprob"].as_f64().unwrap() <= 0.0);
            assert!(t["id"].as_u64().is_some());
        }
    }
}

#[test]
fn run_json_is_deterministic_for_a_seed() {
    let m = common::smollm2_arg();
    let args = ["run", &m, "-p", "Once upon a time", "-n", "12", "--temp", "0.9", "--seed", "42", "--json"];
    let a = json_of(&minnow(&args, None));
    let b = json_of(&minnow(&args, None));
    assert_eq!(a["text"], b["text"]);
    assert_eq!(a["ids"], b["ids"]);
    for key in ["prompt_tokens", "gen_tokens"] {
        assert!(a[key].as_u64().unwrap() > 0, "{key}");
    }
    for key in ["prompt_tps", "gen_tps"] {
        assert!(a[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert_eq!(a["gen_tokens"].as_u64().unwrap() as usize, a["ids"].as_array().unwrap().len());
}

#[test]
fn perplexity_json_shape() {
    let m = common::smollm2_arg();
    let dir = common::scratch_dir("cli", "ppl");
    let f = dir.join("t.txt");
    std::fs::write(&f, "The quick brown fox jumps over the lazy dog.").unwrap();
    let v = json_of(&minnow(&["perplexity", &m, f.to_str().unwrap(), "--json"], None));
    let ids = v["ids"].as_array().unwrap().len();
    let lps = v["next_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), ids - 1);
    let mean: f64 = -lps.iter().map(|x| x.as_f64().unwrap()).sum::<f64>() / lps.len() as f64;
    assert!((mean - v["mean_nll"].as_f64().unwrap()).abs() < 1e-4);
}

#[test]
fn bench_json_shape() {
    let m = common::smollm2_arg();
    let v = json_of(&minnow(&["bench", &m, "-p", "16", "-n", "4", "-r", "1", "--threads", "2", "--json"], None));
    assert_eq!(v["threads"], 2);
    assert_eq!(v["pp"], 16);
    assert_eq!(v["tg"], 4);
    assert_eq!(v["depth"], 0);
    assert!(v["pp_tps"].as_f64().unwrap() > 0.0 && v["tg_tps"].as_f64().unwrap() > 0.0);
    assert!(["Scalar", "Avx2", "Avx512Vnni"].contains(&v["simd"].as_str().unwrap()), "simd: {}", v["simd"]);
}

/// `-d`: both tests run after a filled context (reported in the JSON), and a
/// depth the model's context cannot hold is a one-line error, not a panic.
#[test]
fn bench_depth_runs_after_a_filled_context() {
    let m = common::smollm2_arg();
    let v = json_of(&minnow(
        &["bench", &m, "-p", "8", "-n", "4", "-r", "1", "-d", "300", "--threads", "2", "--json"],
        None,
    ));
    assert_eq!(v["depth"], 300);
    assert!(v["pp_tps"].as_f64().unwrap() > 0.0 && v["tg_tps"].as_f64().unwrap() > 0.0);
    let out = minnow(&["bench", &m, "-p", "8", "-n", "4", "-r", "1", "-d", "1000000"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than the model's context"), "{err}");
}

/// `--alternate-depth`: two caches, decode steps alternating, both speeds
/// and the change; a depth beyond the context is refused.
#[test]
fn bench_alternates_two_depths() {
    let m = common::smollm2_arg();
    let args = ["bench", &m, "-n", "4", "-r", "1", "-d", "300", "--threads", "2"];
    let v = json_of(&minnow(&[&args[..], &["--alternate-depth", "8", "--json"]].concat(), None));
    assert_eq!((v["depth"].as_u64(), v["alternate_depth"].as_u64()), (Some(300), Some(8)));
    let (deep, shallow) = (v["tg_tps"].as_f64().unwrap(), v["tg_tps_alternate"].as_f64().unwrap());
    assert!(deep > 0.0 && shallow > 0.0);
    let change = v["change_pct"].as_f64().unwrap();
    assert!((change - 100.0 * (deep / shallow - 1.0)).abs() < 1e-6, "{change}");
    let out = minnow(&[&args[..], &["--alternate-depth", "1000000"]].concat(), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than the model's context"), "{err}");
}

/// `--cache-type-k/-v` (llama.cpp's `-ctk/-ctv`): a q8_0 cache runs and
/// says so; an unknown type is refused with the ones there are.
#[test]
fn cache_types_are_chosen_and_a_bad_one_refused() {
    let m = common::smollm2_arg();
    let args = ["bench", &m, "-p", "8", "-n", "4", "-r", "1", "-d", "300", "--threads", "2", "--json"];
    let v = json_of(&minnow(&[&args[..], &["--cache-type-k", "q8_0", "--ctv", "q8_0"]].concat(), None));
    assert_eq!((v["type_k"].as_str(), v["type_v"].as_str()), (Some("q8_0"), Some("q8_0")));
    assert!(v["tg_tps"].as_f64().unwrap() > 0.0);
    let v = json_of(&minnow(&args, None));
    assert_eq!((v["type_k"].as_str(), v["type_v"].as_str()), (Some("f16"), Some("f16")));
    // `info` sizes the cache it would use: q8_0 about half of f16.
    let kv_bytes = |extra: &[&str]| {
        let v = json_of(&minnow(&[&["info", &m, "--json"][..], extra].concat(), None));
        v["kv_cache_bytes_at_4096"].as_f64().unwrap()
    };
    let (f16, q8) = (kv_bytes(&[]), kv_bytes(&["--ctk", "q8_0", "--ctv", "q8_0"]));
    assert!((q8 / f16 - 1.125 / 2.0).abs() < 1e-3, "q8_0 {q8} vs f16 {f16} bytes");
    let out = minnow(&[&args[..], &["--ctk", "q4_0"]].concat(), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use f16 or q8_0"), "{err}");
}

#[test]
fn simd_cap_is_honoured_and_a_bad_one_refused() {
    let m = common::smollm2_arg();
    let run = |cap: &str| {
        common::minnow_cmd()
            .args(["bench", &m, "-p", "4", "-n", "2", "-r", "1", "--json"])
            .env("MINNOW_SIMD", cap)
            .output()
            .expect("cannot start minnow")
    };
    let v = json_of(&run("scalar"));
    assert_eq!(v["simd"], "Scalar");
    let bad = run("avx3");
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("MINNOW_SIMD") && err.lines().count() == 1, "stderr: {err}");
}

#[test]
fn user_mistakes_are_one_line_errors_not_panics() {
    let cases: Vec<Vec<String>> = vec![
        vec!["run".into(), "/no/such/model.gguf".into(), "-p".into(), "hi".into()],
        vec!["info".into(), "not-a-known-model".into()],
        vec!["run".into(), common::smollm2_arg(), "-p".into(), "hi".into(), "--temp=-1".into()],
        vec!["logits".into(), common::smollm2_arg(), "--ids".into(), "99999999".into(), "--json".into()],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = minnow(&args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.starts_with("minnow: error:"), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn a_non_gguf_file_is_a_clear_error() {
    let dir = common::scratch_dir("cli", "bad");
    let f = dir.join("bad.gguf");
    std::fs::write(&f, b"this is not a model").unwrap();
    let out = minnow(&["info", f.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GGUF") || err.contains("magic"), "{err}");
}

/// `run --choice`, `--regex` and `--json-schema` constrain the answer
/// (sampled, several seeds); a constraint that does not compile is a
/// one-line error naming the flag.
#[test]
fn run_constraints_shape_the_answer_and_bad_ones_are_refused() {
    let m = common::smollm2_arg();
    for seed in ["1", "2", "3"] {
        let v = json_of(&minnow(
            &["run", &m, "--chat", "-p", "Is the sea wet?", "--choice", "yes,no,maybe", "--seed", seed, "--json"],
            None,
        ));
        let text = v["text"].as_str().unwrap();
        assert!(["yes", "no", "maybe"].contains(&text), "{text:?}");
        let v = json_of(&minnow(
            &["run", &m, "-p", "Her phone number is", "--regex", " [0-9]{3}-[0-9]{4}", "--seed", seed, "--json"],
            None,
        ));
        let text = v["text"].as_str().unwrap();
        let b = text.as_bytes();
        assert!(b.len() == 9 && b[0] == b' ' && b[4] == b'-', "{text:?}");
    }
    let dir = std::env::temp_dir().join(format!("minnow-cli-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"], "additionalProperties": false}"#,
    )
    .unwrap();
    let args = ["run", &m, "--chat", "-p", "Tom the cat is 3. Give his name and age.", "--temp", "0", "--json"];
    let mut with_schema = args.to_vec();
    with_schema.extend(["--json-schema", schema.to_str().unwrap(), "-n", "60"]);
    let v = json_of(&minnow(&with_schema, None));
    let answer: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
    assert!(answer["name"].is_string() && answer["age"].is_i64(), "{answer}");
    assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
    let _ = std::fs::remove_dir_all(&dir);

    let out = minnow(&["run", &m, "-p", "x", "--regex", "(unclosed"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--regex: the constraint does not compile"), "{err}");
    let out = minnow(&["run", &m, "-p", "x", "--regex", "a", "--choice", "b"], None);
    assert!(!out.status.success(), "two constraints at once are refused");
}

/// `minnow quantize` is as good as llama.cpp's `llama-quantize` from the
/// same F16 source. SmolLM2 (Q4_1) to F16 warns that its tensors were
/// already quantized; that F16 file to each type, without and with an
/// importance matrix `minnow imatrix` collects on the order task's dev set,
/// gives a model whose mean NLL on the golden texts (cut to 512 tokens; held
/// out: nothing was tuned on them) is within 0.04 nats of what
/// `llama-quantize` made of the same file with the same importance matrix
/// (measured: −0.027 to +0.030, the worst Q2_K without an imatrix),
/// and a file of the same size (the same per-tensor mix). llama.cpp's
/// figures are committed (`tests/data/llama-quantize-smollm2.json`, made
/// by `bench/quantize-vs-llamacpp.sh`, which CI cannot run); the F16
/// source must score as it did there, so both sides start from one file.
/// An unknown type is a one-line error naming the types.
#[test]
fn quantize_is_as_good_as_llama_quantize() {
    let reference: Value = serde_json::from_str(include_str!("data/llama-quantize-smollm2.json")).unwrap();
    let dir = common::scratch_dir("cli", "quantize");
    let f16 = dir.join("f16.gguf");
    let out = minnow(&["quantize", &common::smollm2_arg(), f16.to_str().unwrap(), "F16", "-t", "2"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already quantized"));
    let golden = std::env::var_os("MINNOW_GOLDEN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden").into());
    let nll: Value =
        serde_json::from_slice(&std::fs::read(golden.join("smollm2-135m-instruct-q4_1/nll.json")).unwrap()).unwrap();
    let mut texts = Vec::new();
    for case in nll["cases"].as_array().unwrap() {
        let path = dir.join(format!("{}.txt", case["name"].as_str().unwrap()));
        std::fs::write(&path, case["text"].as_str().unwrap()).unwrap();
        texts.push(path);
    }
    // Mean over the texts of each text's mean NLL, as the bench script scores.
    let score = |model: &std::path::Path| -> f64 {
        let sum: f64 = texts
            .iter()
            .map(|t| {
                let args = ["perplexity", model.to_str().unwrap(), t.to_str().unwrap(), "--max-tokens", "512"];
                json_of(&minnow(&[&args[..], &["--json", "-t", "2"]].concat(), None))["mean_nll"].as_f64().unwrap()
            })
            .sum();
        sum / texts.len() as f64
    };
    let base = score(&f16);
    let f16_ref = reference["f16_nll"].as_f64().unwrap();
    assert!((base - f16_ref).abs() < 0.002, "the F16 source scores {base:.4}, the reference's {f16_ref:.4}");
    let im = dir.join("imatrix.gguf");
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tasks/order-extraction/dev.jsonl");
    let out =
        minnow(&["imatrix", f16.to_str().unwrap(), "--data", data.to_str().unwrap(), "-o", im.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("211 matrices"), "{}", String::from_utf8_lossy(&out.stdout));
    let rows = reference["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 16, "eight types, each without and with the imatrix");
    for row in rows {
        let ty = row["type"].as_str().unwrap();
        let with_im = row["imatrix"].as_bool().unwrap();
        let path = dir.join(format!("{ty}-{with_im}.gguf"));
        let mut args = vec!["quantize", f16.to_str().unwrap(), path.to_str().unwrap(), ty, "-t", "2"];
        if with_im {
            args.extend(["--imatrix", im.to_str().unwrap()]);
        }
        let out = minnow(&args, None);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{ty}: {}", String::from_utf8_lossy(&out.stderr));
        if with_im && ty != "Q8_0" {
            assert!(!said.contains(" 0 weighted"), "{ty}: the imatrix weighed nothing: {said}");
        }
        let ours = score(&path);
        let theirs = row["llama_nll"].as_f64().unwrap();
        eprintln!("{ty} imatrix={with_im}: {ours:.4} (llama-quantize {theirs:.4}, F16 {base:.4})");
        assert!(
            ours.is_finite() && ours <= theirs + 0.04,
            "{ty} imatrix={with_im}: mean NLL {ours:.4}, llama-quantize's {theirs:.4}"
        );
        let mb = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
        let llama_mb = row["llama_mb"].as_f64().unwrap();
        assert!((mb - llama_mb).abs() <= 0.15, "{ty} imatrix={with_im}: {mb:.1} MB, llama-quantize's {llama_mb} MB");
        std::fs::remove_file(&path).unwrap();
    }

    let bad = minnow(&["quantize", f16.to_str().unwrap(), dir.join("x.gguf").to_str().unwrap(), "Q3_K_S"], None);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("Q4_K_M") && err.trim().lines().count() == 1, "{err}");
}
