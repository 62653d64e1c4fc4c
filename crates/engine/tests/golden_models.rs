//! The four test models against llama.cpp's own outputs
//! (`../shared/golden/<model>/{logits,nll}.json`), with the tolerances of the
//! golden README: top-1 agreement where the reference is decisive, logit
//! values, teacher-forced and free-running greedy paths, per-token
//! log-likelihoods. Each check runs with the default f16 KV cache, and again
//! with a q8_0 cache (`--cache-type-k/-v q8_0`), which must stay within the
//! same tolerances. For Qwen2.5-Coder-0.5B the q8_0 cache holds the values
//! only: its keys have a few channels far larger than the rest (the key
//! projection's bias), and 8-bit blocks of 32 lose the others next to them
//! (q8_0 keys move its `gpl3` mean NLL by 0.06 nats against the 0.02
//! allowed; with the query kept f32, 0.024), so q8_0 keys are not offered as
//! within the tolerances there.

mod common;

use common::*;
use minnow_engine::kv_cache::{CacheTypes, KvCache, KvType};
use minnow_engine::model::{Logits, Model};
use serde_json::Value;

/// Top-1 must agree wherever the reference's top-1 − top-2 gap is at least this.
const DECISIVE_GAP: f32 = 0.75;
/// Mean over positions of the mean |Δlogit| over the reference's top-10 ids.
const MAX_MEAN_LOGIT_DIFF: f32 = 0.35;
/// No single position's mean |Δlogit| above this.
const MAX_POSITION_LOGIT_DIFF: f32 = 1.5;
const MAX_MEAN_NLL_DIFF: f64 = 0.02;
const MAX_MEAN_LOGPROB_DIFF: f64 = 0.1;

/// Each model is loaded once per test binary.
fn model(file: &str) -> &'static Model {
    load_once(file, || open_model_file(file))
}

/// Compares our logits at one position with a reference top-20 entry.
/// Returns the mean |Δlogit| over the reference's top 10, and whether the
/// top-1 check applied and passed.
fn compare_position(ours: &[f32], reference: &Value, what: &str) -> f32 {
    let ref_ids = json_ids(&reference["ids"]);
    let ref_logits = json_floats(&reference["logits"]);
    let gap = ref_logits[0] - ref_logits[1];
    if gap >= DECISIVE_GAP {
        assert_eq!(argmax(ours), ref_ids[0], "{what}: top-1 differs from llama.cpp's (reference gap {gap:.3})");
    }
    let n = 10.min(ref_ids.len());
    (0..n).map(|i| (ours[ref_ids[i] as usize] - ref_logits[i]).abs()).sum::<f32>() / n as f32
}

const F16: CacheTypes = CacheTypes { k: KvType::F16, v: KvType::F16 };
const Q8_0: CacheTypes = CacheTypes { k: KvType::Q8_0, v: KvType::Q8_0 };
const Q8_0_VALUES: CacheTypes = CacheTypes { k: KvType::F16, v: KvType::Q8_0 };

fn check_logits(golden: &str, file: &str, types: CacheTypes) {
    eprintln!("kernels: {:?}", minnow_kernels::formats::simd_level());
    let m = model(file);
    let new_cache = || KvCache::new(m.config(), 4096, types);
    let vocab = m.config().vocab_size;
    let data = golden_json(golden, "logits.json");
    for (c, case) in data["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = json_ids(&case["prompt_ids"]);
        let greedy = json_ids(&case["greedy_ids"]);
        let mut diffs = Vec::new();

        // Every prompt position.
        let mut cache = new_cache();
        let logits = m.forward_one(pool(), &mut cache, &prompt, Logits::All).unwrap();
        for (i, reference) in case["prompt_topk"].as_array().unwrap().iter().enumerate() {
            let what = format!("{golden} case {c} prompt position {i}");
            diffs.push((what.clone(), compare_position(&logits[i * vocab..(i + 1) * vocab], reference, &what)));
        }

        // The reference greedy path, teacher-forced: the logits before
        // greedy[j] come from the prompt's last position (j = 0) or from
        // feeding greedy[j-1].
        let forced = m.forward_one(pool(), &mut cache, &greedy[..greedy.len() - 1], Logits::All).unwrap();
        let last_prompt = &logits[(prompt.len() - 1) * vocab..prompt.len() * vocab];
        let greedy_topk = case["greedy_topk"].as_array().unwrap();
        for (j, reference) in greedy_topk.iter().enumerate() {
            let ours = if j == 0 { last_prompt } else { &forced[(j - 1) * vocab..j * vocab] };
            let what = format!("{golden} case {c} teacher-forced greedy step {j}");
            diffs.push((what.clone(), compare_position(ours, reference, &what)));
        }

        let mean = diffs.iter().map(|d| d.1).sum::<f32>() / diffs.len() as f32;
        let worst = diffs.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        eprintln!("{golden} ({types:?}) case {c}: mean |Δlogit| {mean:.4}, worst {:.4} at {}", worst.1, worst.0);
        assert!(mean <= MAX_MEAN_LOGIT_DIFF, "{golden} case {c}: mean |Δlogit| {mean} > {MAX_MEAN_LOGIT_DIFF}");
        assert!(worst.1 <= MAX_POSITION_LOGIT_DIFF, "{}: |Δlogit| {} > {MAX_POSITION_LOGIT_DIFF}", worst.0, worst.1);

        // Free-running greedy: equal up to the first step where the
        // reference itself was close to a tie.
        let mut cache = new_cache();
        let mut next = argmax(&m.forward_one(pool(), &mut cache, &prompt, Logits::Last).unwrap());
        for (j, reference) in greedy_topk.iter().enumerate() {
            let ref_logits = json_floats(&reference["logits"]);
            if ref_logits[0] - ref_logits[1] < DECISIVE_GAP {
                break;
            }
            assert_eq!(next, greedy[j], "{golden} case {c}: free-running greedy differs at step {j}");
            next = argmax(&m.forward_one(pool(), &mut cache, &[next], Logits::Last).unwrap());
        }
    }
}

fn check_nll(golden: &str, file: &str, types: CacheTypes) {
    for c in compare_nll_with(model(file), golden, types) {
        let (name, mean_nll, ref_nll, mean_diff) = (&c.case, c.mean_nll, c.ref_nll, c.mean_logprob_diff);
        eprintln!("{golden} ({types:?}) {name}: mean NLL {mean_nll:.4} (llama.cpp {ref_nll:.4}), mean |Δlogprob| {mean_diff:.4}");
        assert!((mean_nll - ref_nll).abs() <= MAX_MEAN_NLL_DIFF, "{golden} {name}: mean NLL {mean_nll} vs {ref_nll}");
        assert!(mean_diff <= MAX_MEAN_LOGPROB_DIFF, "{golden} {name}: mean |Δlogprob| {mean_diff}");
    }
}

macro_rules! model_tests {
    ($($logits:ident, $nll:ident, $types:expr => $idx:expr;)*) => {$(
        #[test]
        fn $logits() {
            let (golden, file) = MODELS[$idx];
            check_logits(golden, file, $types);
        }
        #[test]
        fn $nll() {
            let (golden, file) = MODELS[$idx];
            check_nll(golden, file, $types);
        }
    )*};
}

model_tests! {
    smollm2_logits, smollm2_nll, F16 => 0;
    gemma3_logits, gemma3_nll, F16 => 1;
    qwen05_logits, qwen05_nll, F16 => 2;
    qwen15_logits, qwen15_nll, F16 => 3;
    smollm2_logits_q8_0_cache, smollm2_nll_q8_0_cache, Q8_0 => 0;
    gemma3_logits_q8_0_cache, gemma3_nll_q8_0_cache, Q8_0 => 1;
    qwen05_logits_q8_0_values, qwen05_nll_q8_0_values, Q8_0_VALUES => 2;
    qwen15_logits_q8_0_cache, qwen15_nll_q8_0_cache, Q8_0 => 3;
}

/// SmolLM2's logit checks (top-1, logit values, teacher-forced and greedy
/// paths) again on the scalar reference kernels: this binary re-runs that
/// test in a child process with `MINNOW_SIMD=scalar`, which caps every
/// kernel's dispatch (the level is fixed per process), so the references
/// the SIMD kernels are tested against hold up on their own. (30 s; the
/// NLL texts would take another 140 s on the scalar kernels.)
#[test]
fn smollm2_on_the_scalar_kernels() {
    if std::env::var_os("MINNOW_SIMD").is_some() {
        // The child run (or a level chosen by hand): nothing to re-run.
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["smollm2_logits", "--exact", "--nocapture", "--test-threads", "1"])
        .env("MINNOW_SIMD", "scalar")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "smollm2_logits on the scalar kernels failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "smollm2_logits did not run:\n{stdout}");
    assert!(stderr.contains("kernels: Scalar"), "the child did not run on the scalar kernels:\n{stderr}");
}
