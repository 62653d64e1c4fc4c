//! The official `openai` Python package drives a real server: chat,
//! completion, streaming, `n = 2`, logprobs and error cases
//! (tests/python/test_openai_client.py). Part of `cargo test` so the
//! README's one test command covers it; `.ci/run` installs the package.

mod common;

use common::TestServer;
use minnow_engine::scheduler::SchedulerConfig;
use minnow_serve::ServeOptions;
use std::path::PathBuf;
use std::process::Command;

/// Pinned in .ci/run.
const OPENAI_PIN: &str = "openai==2.8.0";

#[test]
fn official_openai_python_client_works_against_the_server() {
    let probe = Command::new("python3").args(["-c", "import openai; print(openai.__version__)"]).output();
    match probe {
        Ok(o) if o.status.success() => eprintln!("openai {}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => panic!(
            "the `openai` Python package is missing: run .ci/run, which installs it \
             (or `python3 -m pip install {OPENAI_PIN}`)"
        ),
    }
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 4, ctx: 2048, ..Default::default() },
        ServeOptions {
            model_id: "smollm2".into(),
            api_key: Some("py-test-key".into()),
            log_requests: false,
            ..Default::default()
        },
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_openai_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("MINNOW_BASE_URL", format!("http://{}/v1", s.addr))
        .env("MINNOW_API_KEY", "py-test-key")
        .env("MINNOW_MODEL_ID", "smollm2")
        // The client must talk to loopback directly, whatever the environment says.
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .expect("cannot run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client tests failed (see above)");
    assert!(stdout.contains(" passed, 0 failed"));
}
