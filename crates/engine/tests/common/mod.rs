//! Shared by the engine's integration tests: where the test models and the
//! llama.cpp reference data live, and one thread pool per test binary.
#![allow(dead_code)]

use minnow_gguf::GgufFile;
use minnow_kernels::pool::ThreadPool;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// `$MINNOW_MODELS`, else `$XDG_CACHE_HOME/minnow/models`, else
/// `~/.cache/minnow/models` (where `minnow pull` puts them).
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MINNOW_MODELS") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("minnow/models");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/minnow/models")
}

/// `$MINNOW_GOLDEN`, else `../shared/golden` next to the repository.
pub fn golden_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MINNOW_GOLDEN") {
        return PathBuf::from(d);
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden"))
}

/// The fixtures directory (`../shared/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    golden_dir().join("../fixtures")
}

/// Path of a test model file; fails the test with instructions when absent.
pub fn model_path(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(
        p.exists(),
        "test model {} is missing: run `cargo run --release -p minnow -- pull all` (or set MINNOW_MODELS)",
        p.display()
    );
    p
}

pub fn open_model_file(file: &str) -> Arc<GgufFile> {
    Arc::new(GgufFile::open(model_path(file)).unwrap_or_else(|e| panic!("{e}")))
}

/// Reads a golden JSON file.
pub fn golden_json(model_dir: &str, name: &str) -> serde_json::Value {
    let p = golden_dir().join(model_dir).join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// One pool per test binary; concurrent tests take turns using it.
pub fn pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(2))
}

/// The four test models: (golden directory, file name).
pub const MODELS: [(&str, &str); 4] = [
    ("smollm2-135m-instruct-q4_1", "smollm2-135m-instruct-q4_1.gguf"),
    ("gemma3-270m-q4_k_m", "gemma3-270m-q4_k_m.gguf"),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
];
