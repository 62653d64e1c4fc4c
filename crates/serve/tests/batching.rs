//! Continuous batching seen from the API (SmolLM2-135M): sixteen concurrent
//! streaming clients all complete, each with exactly the greedy output it
//! gets alone; a shared system prompt is served from the prefix cache (far
//! fewer prompt tokens computed) with the same output as without the cache.

mod common;

use common::{stream_texts, Client, TestServer};
use minnow_engine::scheduler::SchedulerConfig;
use minnow_serve::ServeOptions;
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::time::Instant;

const TOPICS: [&str; 16] = [
    "the sea",
    "mountains",
    "a cat",
    "bread",
    "the moon",
    "trains",
    "music",
    "winter",
    "a library",
    "coffee",
    "rain",
    "bicycles",
    "the desert",
    "bees",
    "a lighthouse",
    "chess",
];

fn request(topic: &str) -> Value {
    json!({
        "messages": [{"role": "user", "content": format!("Write one sentence about {topic}.")}],
        "temperature": 0,
        "max_tokens": 16,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

fn run_stream(c: &Client, body: &Value) -> String {
    let s = c.stream("/v1/chat/completions", body);
    assert_eq!(s.status, 200);
    let events = s.collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream did not complete: {events:?}");
    let (texts, finish, usage) = stream_texts(&events, 1);
    assert!(finish[0].is_some() && usage.is_some());
    texts.into_iter().next().unwrap()
}

fn server(prefix_cache_bytes: usize) -> TestServer {
    TestServer::start(
        SchedulerConfig { max_parallel: 16, ctx: 1024, prefix_cache_bytes, ..Default::default() },
        ServeOptions { model_id: "smollm2".into(), log_requests: false, ..Default::default() },
    )
}

#[test]
fn sixteen_concurrent_streams_match_their_solo_outputs() {
    let _g = common::heavy();
    // No prefix cache: every request computes its own prompt, alone or not.
    let s = server(0);
    let c = s.client();
    let t = Instant::now();
    let alone: Vec<String> = TOPICS.iter().map(|t| run_stream(&c, &request(t))).collect();
    eprintln!("16 requests one at a time: {:.1} s", t.elapsed().as_secs_f64());
    assert!(alone.iter().all(|t| !t.is_empty()));

    let before = c.metrics();
    let barrier = Arc::new(Barrier::new(TOPICS.len()));
    let t = Instant::now();
    let handles: Vec<_> = TOPICS
        .iter()
        .map(|topic| {
            let (c, b, body) = (c.clone(), barrier.clone(), request(topic));
            std::thread::spawn(move || {
                b.wait();
                run_stream(&c, &body)
            })
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().expect("a client failed")).collect();
    eprintln!("16 requests at once: {:.1} s", t.elapsed().as_secs_f64());
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} ({}) differs when batched", TOPICS[i]);
    }
    // They really ran together: the mean batch of those steps is well above 1.
    let after = c.metrics();
    let sum = |m: &common::prom::Metrics| {
        m.get("minnow_batch_size_mean", &[]).unwrap() * m.get("minnow_steps_total", &[]).unwrap()
    };
    let steps = after.get("minnow_steps_total", &[]).unwrap() - before.get("minnow_steps_total", &[]).unwrap();
    let mean = (sum(&after) - sum(&before)) / steps;
    eprintln!("mean batch while concurrent: {mean:.1} sequences over {steps} steps");
    assert!(mean > 4.0, "mean batch {mean}");
}

#[test]
fn shared_system_prompt_is_served_from_the_prefix_cache() {
    let _g = common::heavy();
    let system = "You are a careful assistant for a small bakery. ".to_string()
        + &(1..=30)
            .map(|i| format!("Rule {i}: answer politely, briefly and truthfully about bread number {i}. "))
            .collect::<String>();
    let ask = |q: &str| {
        json!({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "temperature": 0,
            "max_tokens": 12,
        })
    };
    let cached = server(64 << 20);
    let uncached = server(0);
    let (c, u) = (cached.client(), uncached.client());

    let first = c.post("/v1/chat/completions", &ask("Do you sell rye bread?")).json();
    let p1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(p1 > 300, "the system prompt should be long: {p1} tokens");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let second = c.post("/v1/chat/completions", &ask("When do you open?")).json();
    let p2 = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let hit = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    eprintln!("second request: {p2} prompt tokens, {hit} from the prefix cache");
    assert!(hit >= p2 * 3 / 4, "only {hit} of {p2} prompt tokens were cached");
    let m = c.metrics();
    assert_eq!(m.get("minnow_cached_prompt_tokens_total", &[]), Some(hit as f64));
    assert!(m.get("minnow_prefix_cache_entries", &[]).unwrap() >= 1.0);

    // Same output as computing the whole prompt.
    let reference = u.post("/v1/chat/completions", &ask("When do you open?")).json();
    assert_eq!(reference["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(second["choices"][0]["message"]["content"], reference["choices"][0]["message"]["content"]);

    // A second turn of the first chat reuses at least the first turn's prompt.
    let mut turn2 = ask("Do you sell rye bread?");
    let answer = first["choices"][0]["message"]["content"].clone();
    turn2["messages"]
        .as_array_mut()
        .unwrap()
        .extend([json!({"role": "assistant", "content": answer}), json!({"role": "user", "content": "And wheat?"})]);
    let t2 = c.post("/v1/chat/completions", &turn2).json();
    let hit2 = t2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(hit2 >= p1 - 1, "turn 2 reused {hit2} tokens, turn 1's prompt was {p1}");
    let ref2 = u.post("/v1/chat/completions", &turn2).json();
    assert_eq!(t2["choices"][0]["message"]["content"], ref2["choices"][0]["message"]["content"]);
}
