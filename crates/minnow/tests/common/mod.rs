//! Helpers shared by the `minnow` integration tests (each file in `tests/`
//! pulls them in with `mod common;`): where the test models live, the small
//! real model the tests run on, the `minnow` binary under test, and fresh
//! scratch directories.

// Every test file is its own crate and uses only some of these helpers.
#![allow(dead_code)]

pub mod server;

use std::path::PathBuf;
use std::process::Command;

/// SmolLM2-135M-Instruct (Q4_1), the small real model the tests run on;
/// panics with a hint when it has not been pulled.
pub fn smollm2() -> PathBuf {
    minnow_models::test_model("smollm2-135m-instruct-q4_1.gguf")
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
/// directory, wiped first if a previous run left it behind, and removed when
/// the returned guard drops — unless the test is failing, when it is kept
/// (and named) for a look. (Kept always, the pipeline test alone left 1.7 GB
/// of training checkpoints behind per run.)
pub fn scratch_dir(test: &str, name: &str) -> ScratchDir {
    let dir = std::env::temp_dir().join(format!("minnow-{test}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    ScratchDir(dir)
}

/// A test's scratch directory (see [`scratch_dir`]); derefs to its path.
pub struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for ScratchDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scratch directory kept: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
