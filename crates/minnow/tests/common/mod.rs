//! Helpers shared by the `minnow` integration tests (each file in `tests/`
//! pulls them in with `mod common;`): where the test models live, the small
//! real model the tests run on, the `minnow` binary under test, and fresh
//! scratch directories.

// Every test file is its own crate and uses only some of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Where `minnow pull` puts the test models (the engine's model cache).
pub fn models_dir() -> PathBuf {
    minnow_engine::loader::model_cache_dir()
}

/// SmolLM2-135M-Instruct (Q4_1), the small real model the tests run on;
/// panics with a hint when it has not been pulled.
pub fn smollm2() -> PathBuf {
    let p = models_dir().join("smollm2-135m-instruct-q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `minnow pull all` first", p.display());
    p
}

/// [`smollm2`] as a `String`, for argument lists built from `&str`.
pub fn smollm2_arg() -> String {
    smollm2().display().to_string()
}

/// A command that runs the `minnow` binary built for these tests.
pub fn minnow_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_minnow"))
}

/// An empty directory `minnow-{test}-{pid}-{name}` under the system temp
/// directory, wiped first if a previous run left it behind.
pub fn scratch_dir(test: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minnow-{test}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
