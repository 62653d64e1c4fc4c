//! Many LoRA adapters on one server (SmolLM2-135M): `/v1/models` lists the
//! base and each adapter; a request's `model` picks one; 16 concurrent
//! greedy requests spread over three adapters and the base each get the
//! answer they get alone; `/metrics` counts per model; an unknown `model`
//! is a 404.

mod common;

use common::TestServer;
use minnow_engine::lora::{LoraAdapter, LowRank, Proj};
use minnow_engine::scheduler::SchedulerConfig;
use minnow_serve::ServeOptions;
use serde_json::json;
use std::sync::Arc;

/// An adapter on `projs` of every layer whose entries follow a smooth
/// pattern set by `phase` (no randomness needed: any non-trivial low-rank
/// correction moves a 135M model's greedy answers).
fn adapter(name: &str, rank: usize, projs: &[Proj], phase: f32) -> Arc<LoraAdapter> {
    let cfg = common::smollm2().model.config().clone();
    let mut pairs = Vec::new();
    for l in 0..cfg.n_layer {
        for &p in projs {
            let (rows, cols) = p.shape(&cfg);
            let wave = |i: usize, k: f32| 0.15 * ((i as f32) * k + phase + l as f32).sin();
            let a = (0..rank * cols).map(|i| wave(i, 0.37)).collect();
            let b = (0..rows * rank).map(|i| wave(i, 0.91)).collect();
            pairs.push((l, p, LowRank::new(rank, cols, rows, a, b)));
        }
    }
    Arc::new(LoraAdapter::new(name, 2.0 * rank as f32, 1.0, cfg.n_layer, pairs).unwrap())
}

#[test]
fn three_adapters_and_the_base_share_one_batch() {
    let adapters = vec![
        adapter("orders", 4, &[Proj::Q, Proj::V], 0.3),
        adapter("support", 8, &[Proj::Gate, Proj::Up, Proj::Down], 1.1),
        adapter("finance", 2, &[Proj::K, Proj::O, Proj::Down], 2.0),
    ];
    let s = TestServer::start(
        SchedulerConfig { max_parallel: 16, ctx: 512, ..Default::default() },
        ServeOptions { model_id: "smollm2".into(), log_requests: false, adapters, ..Default::default() },
    );
    let c = s.client();
    let ids: Vec<String> = c.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(ids, ["smollm2", "orders", "support", "finance"]);
    assert_eq!(c.get("/v1/models/support").json()["parent"], "smollm2");

    let models = ["smollm2", "orders", "support", "finance"];
    let prompts = ["The capital of Italy is", "Ten minus three equals", "Once upon a time, a fox", "import numpy as"];
    let body = |k: usize| json!({"model": models[k / 4], "prompt": prompts[k % 4], "max_tokens": 12, "temperature": 0});
    let alone: Vec<String> = (0..16)
        .map(|k| {
            let r = c.post("/v1/completions", &body(k)).json();
            assert_eq!(r["model"], models[k / 4]);
            r["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    for a in 1..4 {
        let moved = (0..4).filter(|&i| alone[a * 4 + i] != alone[i]).count();
        assert!(moved >= 2, "adapter {} changed only {moved} of 4 answers", models[a]);
    }
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..16)
            .map(|k| {
                let c = s.client();
                let b = body(k);
                sc.spawn(move || {
                    c.post("/v1/completions", &b).json()["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for k in 0..16 {
        assert_eq!(together[k], alone[k], "request {k} ({}) alone and among 16", models[k / 4]);
    }

    let m = c.metrics();
    for name in models {
        assert_eq!(m.get("minnow_model_requests_total", &[("model", name)]), Some(8.0), "{name}");
    }
    let e = c.post("/v1/completions", &json!({"model": "legal", "prompt": "x", "max_tokens": 1}));
    let v = e.assert_error(404, Some("model"));
    assert!(v["error"]["message"].as_str().unwrap().contains("`finance` (an adapter)"), "{v}");
    s.stop();
}
