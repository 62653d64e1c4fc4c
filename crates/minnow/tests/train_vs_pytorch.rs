//! Training agrees with PyTorch: minnow's first 8 full fine-tuning steps of
//! the reference experiment (SmolLM2-135M on the committed teacher labels)
//! against the losses PyTorch + transformers computed on the very same rows
//! from the same initial weights, recorded once by
//! `bench/train-speed/record_losses.py` into
//! `bench/train-speed/pytorch-losses.json` (CI does not install PyTorch).
//!
//! The rows must be the same (their digests), and every step's loss within
//! 1% of PyTorch's; a change to the forward pass, the loss, AdamW, clipping
//! or the schedule that moves the curve fails here.

mod common;

use common::{minnow_cmd, scratch_dir, smollm2};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The digest record_losses.py computes: ids comma-joined, `;` and the
/// prompt length, examples joined by `+`, rows by `|`, micro-batches by `#`.
fn rows_digest(step: &serde_json::Value) -> String {
    let mbs: Vec<String> = step["micro_batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mb| {
            let rows: Vec<String> = mb
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    let exs: Vec<String> = row
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| {
                            let ids: Vec<String> = e["tokens"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|t| t.as_u64().unwrap().to_string())
                                .collect();
                            format!("{};{}", ids.join(","), e["n_prompt"])
                        })
                        .collect();
                    exs.join("+")
                })
                .collect();
            rows.join("|")
        })
        .collect();
    Sha256::digest(mbs.join("#").as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_first_eight_losses_match_pytorchs() {
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("bench/train-speed/pytorch-losses.json")).unwrap())
            .unwrap();
    let mut args: Vec<String> =
        recorded["minnow_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    // The recorded run names the test model; use the file the tests use.
    let model = args.iter().position(|a| a == "smollm2-135m").expect("the recorded run trains smollm2-135m");
    args[model] = smollm2().display().to_string();
    let dir = scratch_dir("train-vs-pytorch", "run");
    let trace = dir.join("trace.jsonl");
    let out = minnow_cmd()
        .current_dir(root())
        .args(&args)
        .arg("-o")
        .arg(dir.join("out.gguf"))
        .arg("--trace")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours: Vec<serde_json::Value> =
        std::fs::read_to_string(&trace).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let theirs = recorded["steps"].as_array().unwrap();
    assert_eq!(ours.len(), 8);
    assert_eq!(theirs.len(), 8);
    for (o, t) in ours.iter().zip(theirs) {
        let step = o["step"].as_u64().unwrap();
        assert_eq!(step, t["step"].as_u64().unwrap());
        assert_eq!(rows_digest(o), t["rows_sha256"].as_str().unwrap(), "step {step}: not the rows PyTorch trained on");
        let (lr, their_lr) = (o["lr"].as_f64().unwrap(), t["lr"].as_f64().unwrap());
        assert!((lr - their_lr).abs() <= 1e-12 * their_lr.abs(), "step {step}: lr {lr} vs {their_lr}");
        let (loss, their_loss) = (o["loss"].as_f64().unwrap(), t["loss"].as_f64().unwrap());
        let rel = (loss - their_loss).abs() / their_loss;
        eprintln!("step {step}: minnow {loss:.6}, PyTorch {their_loss:.6} ({:.3}%)", 100.0 * rel);
        assert!(rel <= 0.01, "step {step}: loss {loss} is not within 1% of PyTorch's {their_loss}");
    }
}
