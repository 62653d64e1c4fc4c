//! The official `openai` Python package drives a real server: chat,
//! completion, streaming, `n = 2`, logprobs, structured outputs and error
//! cases (tests/python/test_openai_client.py, SmolLM2), and tool calling
//! (tests/python/test_openai_tools.py, Qwen2.5-Coder-1.5B). Part of `cargo test` so the
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
    let _turn = common::heavy();
    let s = smollm2_server(None);
    run_script(&s, "test_openai_client.py", "smollm2");
}

/// Tool calling (tests/python/test_openai_tools.py) on Qwen2.5-Coder-1.5B:
/// `required` and a named function with arguments checked by pydantic, the
/// follow-up turn with the tool's result, streamed call deltas reassembled
/// by the client's own stream helper, bad tool requests.
#[test]
fn official_openai_python_client_calls_tools() {
    let model = minnow_models::test_model("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
    let model =
        std::sync::Arc::new(minnow_engine::loader::LoadedModel::load(&model).expect("loading Qwen2.5-Coder-1.5B"));
    let _turn = common::heavy();
    let s = TestServer::start_model(
        model,
        SchedulerConfig { max_parallel: 2, ctx: 2048, ..Default::default() },
        ServeOptions {
            model_id: "qwen".into(),
            api_key: Some("py-test-key".into()),
            log_requests: false,
            ..Default::default()
        },
    );
    run_script(&s, "test_openai_tools.py", "qwen");
}

/// Stored completions (tests/python/test_openai_store.py): `store=True`
/// with `metadata`, then the client's `list` (filters, its own pagination),
/// `retrieve`, `messages.list`, `update` and `delete` on a fresh store.
#[test]
fn official_openai_python_client_uses_stored_completions() {
    let dir = std::env::temp_dir().join(format!("minnow-openai-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = minnow_store::Store::open(&dir, None).expect("opening a fresh store");
    let _turn = common::heavy();
    let s = smollm2_server(Some(minnow_serve::StoreConfig {
        store: std::sync::Arc::new(std::sync::Mutex::new(store)),
        all: false,
        logprobs: 0,
    }));
    run_script(&s, "test_openai_store.py", "smollm2");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SmolLM2 behind the key the scripts send, 4 slots, a 2048-token context.
fn smollm2_server(store: Option<minnow_serve::StoreConfig>) -> TestServer {
    TestServer::start(
        SchedulerConfig { max_parallel: 4, ctx: 2048, ..Default::default() },
        ServeOptions {
            model_id: "smollm2".into(),
            api_key: Some("py-test-key".into()),
            log_requests: false,
            store,
            ..Default::default()
        },
    )
}

fn check_openai_installed() {
    let probe = Command::new("python3").args(["-c", "import openai; print(openai.__version__)"]).output();
    match probe {
        Ok(o) if o.status.success() => eprintln!("openai {}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => panic!(
            "the `openai` Python package is missing: run .ci/run, which installs it \
             (or `python3 -m pip install {OPENAI_PIN}`)"
        ),
    }
}

/// Runs one script of tests/python against `s`; fails unless every test passed.
fn run_script(s: &TestServer, name: &str, model_id: &str) {
    check_openai_installed();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python").join(name);
    let out = Command::new("python3")
        .arg(&script)
        .env("MINNOW_BASE_URL", format!("http://{}/v1", s.addr))
        .env("MINNOW_API_KEY", "py-test-key")
        .env("MINNOW_MODEL_ID", model_id)
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
    assert!(out.status.success(), "{name} failed (see above)");
    assert!(stdout.contains(" passed, 0 failed"));
}
