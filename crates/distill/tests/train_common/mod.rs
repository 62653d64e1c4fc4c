//! Shared by the training tests: where the test models live, the engine's
//! logits for a token sequence, and the golden-data agreement measures
//! (/work/shared/golden/README.md) used to compare two forward passes.
#![allow(dead_code)]

use minnow_engine::loader::LoadedModel;
use minnow_engine::model::Logits;
use minnow_kernels::pool::ThreadPool;
use std::path::PathBuf;
use std::sync::OnceLock;

pub const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
pub const QWEN05: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// Path of a test model, fetched and verified on first use.
pub fn model_path(file: &str) -> PathBuf {
    minnow_models::test_model(file)
}

/// The fixtures directory (`../shared/fixtures`, or `$MINNOW_GOLDEN/../fixtures`).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("MINNOW_GOLDEN") {
        Some(d) => PathBuf::from(d).join("../fixtures"),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures")),
    }
}

pub fn pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(2))
}

/// The engine's logits at every position of `tokens`: [T][vocab].
pub fn engine_logits(m: &LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.model.new_cache(tokens.len() + 1);
    let flat = m.model.forward_one(pool(), &mut cache, tokens, Logits::All).unwrap();
    let v = m.model.config().vocab_size;
    flat.chunks_exact(v).map(|r| r.to_vec()).collect()
}

/// How far `ours` is from `reference`, measured as the golden README does.
#[derive(Debug)]
pub struct Agreement {
    /// Mean over positions of the mean |Δlogit| over the reference's top-10 ids.
    pub mean_abs: f64,
    /// The largest of those per-position means.
    pub max_pos: f64,
    /// Positions whose reference top-1 minus top-2 gap is ≥ 0.75, and how many
    /// of them have the same argmax.
    pub decisive: usize,
    pub top1_agree: usize,
}

fn top_ids(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx
}

pub fn agreement(reference: &[Vec<f32>], ours: &[Vec<f32>]) -> Agreement {
    assert_eq!(reference.len(), ours.len());
    let (mut sum, mut max_pos, mut decisive, mut agree) = (0f64, 0f64, 0, 0);
    for (r, o) in reference.iter().zip(ours) {
        let top = top_ids(r, 10);
        let d: f64 = top.iter().map(|&i| (r[i] - o[i]).abs() as f64).sum::<f64>() / top.len() as f64;
        sum += d;
        max_pos = max_pos.max(d);
        if r[top[0]] - r[top[1]] >= 0.75 {
            decisive += 1;
            if top_ids(o, 1)[0] == top[0] {
                agree += 1;
            }
        }
    }
    Agreement { mean_abs: sum / reference.len() as f64, max_pos, decisive, top1_agree: agree }
}

/// The golden bounds for real models: mean ≤ 0.35, no position above 1.5,
/// top-1 agreement at every decisive position.
pub fn assert_within_golden(a: &Agreement, what: &str) {
    assert!(a.mean_abs <= 0.35, "{what}: mean |Δlogit| {:.4} > 0.35 ({a:?})", a.mean_abs);
    assert!(a.max_pos <= 1.5, "{what}: a position has mean |Δlogit| {:.4} > 1.5 ({a:?})", a.max_pos);
    assert_eq!(a.top1_agree, a.decisive, "{what}: top-1 disagrees at a decisive position ({a:?})");
}

/// Short question/answer pairs, so a training step costs little.
pub const QA: [(&str, &str); 4] = [
    ("Capital of France?", "Paris."),
    ("2 + 3 = ?", "5"),
    ("Opposite of hot?", "Cold."),
    ("Color of the sky?", "Blue."),
];

/// A fresh empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("minnow-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes [`QA`] as a dataset JSONL (user question, assistant answer).
pub fn write_dataset(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let mut text = String::new();
    for (i, (q, a)) in QA.iter().enumerate() {
        let rec = minnow_distill::data::DatasetRecord {
            id: format!("qa-{i}"),
            messages: vec![
                minnow_engine::chat::ChatMessage::new("user", *q),
                minnow_engine::chat::ChatMessage::new("assistant", *a),
            ],
            tools: None,
            provenance: None,
            teacher_logprobs: None,
        };
        text.push_str(&serde_json::to_string(&rec).unwrap());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}
