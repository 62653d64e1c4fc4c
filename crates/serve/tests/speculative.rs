//! `minnow serve --draft/--lookup` on a real socket: greedy answers are the
//! same with speculative decoding as without (Qwen2.5-Coder-1.5B with the
//! 0.5B as draft; SmolLM2 with prompt lookup, streamed, with stop strings,
//! and with concurrent requests, which decode batched instead), and
//! `/metrics` reports acceptance, tokens per target pass and the speed-up.

mod common;

use common::{stream_texts, Client, TestServer};
use minnow_engine::loader::LoadedModel;
use minnow_engine::scheduler::{SchedulerConfig, Speculation};
use minnow_engine::speculative::{check_draft_vocab, SpecConfig};
use minnow_serve::ServeOptions;
use serde_json::json;
use std::sync::{Arc, Barrier};

fn load(file: &str) -> Arc<LoadedModel> {
    let p = minnow_models::test_model(file);
    Arc::new(LoadedModel::load(&p).unwrap_or_else(|e| panic!("{e}")))
}

fn server(model: Arc<LoadedModel>, speculation: Option<Speculation>) -> TestServer {
    TestServer::start_model(
        model,
        SchedulerConfig { max_parallel: 4, ctx: 1024, speculation, ..Default::default() },
        ServeOptions { log_requests: false, ..Default::default() },
    )
}

/// A greedy chat completion: (text, finish_reason).
fn complete(c: &Client, prompt: &str, max_tokens: usize, stop: &[&str]) -> (String, String) {
    let r = c.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens, "stop": stop}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    (choice["message"]["content"].as_str().unwrap().to_string(), choice["finish_reason"].as_str().unwrap().to_string())
}

fn spec_metrics(c: &Client) -> (f64, f64, f64, f64, f64) {
    let m = c.metrics();
    let get = |n: &str| m.get(n, &[]).unwrap_or_else(|| panic!("/metrics lacks {n}"));
    (
        get("minnow_spec_drafted_tokens_total"),
        get("minnow_spec_accepted_tokens_total"),
        get("minnow_spec_acceptance_rate"),
        get("minnow_spec_tokens_per_target_forward"),
        get("minnow_spec_speedup"),
    )
}

#[test]
fn greedy_with_draft_model_equals_without() {
    let _g = common::heavy();
    let target = load("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
    let draft = load("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    check_draft_vocab(&target, &draft).unwrap();
    let prompt = "Write a Python function that returns the n-th Fibonacci number.";
    let plain = {
        let s = server(target.clone(), None);
        let c = s.client();
        assert!(
            c.metrics().get("minnow_spec_drafted_tokens_total", &[]).is_none(),
            "no speculation metrics without it"
        );
        complete(&c, prompt, 24, &[])
    };
    let s = server(target, Some(Speculation { draft: Some(draft), config: SpecConfig::default() }));
    let c = s.client();
    let got = complete(&c, prompt, 24, &[]);
    assert_eq!(got, plain, "greedy output with --draft differs from without");
    let (drafted, accepted, rate, per_pass, speedup) = spec_metrics(&c);
    eprintln!("{got:?}: {accepted}/{drafted} accepted, {per_pass:.2} tokens/target pass, speed-up {speedup:.2}");
    assert!(drafted > 0.0 && accepted > 0.0, "the draft model drafted and was accepted");
    assert!((rate - accepted / drafted).abs() < 1e-9);
    assert!(per_pass > 1.0, "several tokens per target pass: {per_pass}");
    assert!(speedup > 0.0, "the speed-up was estimated");
}

#[test]
fn greedy_with_lookup_equals_without_streamed_stopped_and_batched() {
    let _g = common::heavy();
    let model = common::smollm2();
    let prompts = [
        "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.",
        "Copy this list: apples, pears, plums, cherries, grapes, lemons, limes, oranges.",
    ];
    let plain_server = server(model.clone(), None);
    let pc = plain_server.client();
    let spec_server = server(model, Some(Speculation { draft: None, config: SpecConfig::default() }));
    let sc = spec_server.client();

    for p in prompts {
        assert_eq!(complete(&sc, p, 40, &[]), complete(&pc, p, 40, &[]), "{p}");
    }
    let (drafted, accepted, _, per_pass, _) = spec_metrics(&sc);
    assert!(accepted > 5.0 && per_pass > 1.2, "lookup drafts paid: {accepted}/{drafted}, {per_pass:.2} tokens/pass");

    // Stop strings cut where plain decoding cuts, also when the stop string
    // lies inside a round's accepted drafts.
    for stop in ["lazy", "cat sleeps"] {
        assert_eq!(complete(&sc, prompts[0], 40, &[stop]), complete(&pc, prompts[0], 40, &[stop]), "stop {stop:?}");
    }

    // Streamed: the same text.
    let body = json!({"messages": [{"role": "user", "content": prompts[1]}], "temperature": 0, "max_tokens": 40, "stream": true});
    let events = sc.stream("/v1/chat/completions", &body).collect();
    let (texts, finish, _) = stream_texts(&events, 1);
    let want = complete(&pc, prompts[1], 40, &[]);
    assert_eq!((texts[0].clone(), finish[0].clone().unwrap()), want, "streamed");

    // Concurrent requests decode batched (no speculation while several
    // sequences decode; the last one left speculates again) and still answer
    // exactly as alone.
    let barrier = Arc::new(Barrier::new(prompts.len()));
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (c, b, p) = (sc.clone(), barrier.clone(), p.to_string());
            std::thread::spawn(move || {
                b.wait();
                complete(&c, &p, 40, &[])
            })
        })
        .collect();
    for (h, p) in handles.into_iter().zip(prompts) {
        assert_eq!(h.join().unwrap(), complete(&pc, p, 40, &[]), "concurrent: {p}");
    }
}

/// `--lookup` keeps recent answers: a request like earlier ones (same
/// instruction, another message) drafts the answers' shared skeleton from
/// them, and still answers exactly as without speculation.
#[test]
fn lookup_drafts_from_earlier_answers_to_similar_prompts() {
    let _g = common::heavy();
    let model = common::smollm2();
    let ask = |msg: &str| {
        format!("Extract the person's name and city from the message as JSON, for example {{\"name\": \"Ann Lee\", \"city\": \"Rome\"}}.\n\nMessage: {msg}")
    };
    let messages = [
        "Hi, I am Paula Gomez and I live in Lisbon.",
        "This is Tom Becker from Hamburg.",
        "Greetings from Osaka, my name is Yuki Sato.",
    ];
    let plain_server = server(model.clone(), None);
    let pc = plain_server.client();
    let spec_server = server(model, Some(Speculation { draft: None, config: SpecConfig::default() }));
    let sc = spec_server.client();
    for m in messages {
        assert_eq!(complete(&sc, &ask(m), 48, &[]), complete(&pc, &ask(m), 48, &[]), "{m}");
    }
    let got = sc.metrics();
    let get = |n: &str| got.get(n, &[]).unwrap_or_else(|| panic!("/metrics lacks {n}"));
    let (drafted, accepted) =
        (get("minnow_spec_memory_drafted_tokens_total"), get("minnow_spec_memory_accepted_tokens_total"));
    eprintln!("earlier answers: {accepted}/{drafted} drafts accepted");
    assert!(
        accepted >= 4.0,
        "the answers' shared skeleton was drafted from earlier ones and accepted: {accepted}/{drafted}"
    );
}
