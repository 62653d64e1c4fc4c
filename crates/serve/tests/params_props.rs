//! The request parser ([`minnow_serve::params`]) on arbitrary input: any
//! bytes, any JSON value in any parameter, must give `Ok` or a 400 with an
//! OpenAI-style message, never a panic or another status. The in-suite
//! twin of the cargo-fuzz target `fuzz/fuzz_targets/serve_params.rs`, whose
//! committed corpus seeds (`fuzz/corpus/serve_params/`) are replayed here too.

use minnow_serve::params::{parse_body, parse_chat, parse_completion};
use proptest::prelude::*;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Every parameter either endpoint reads, so generated objects hit them.
const PARAMS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "ignore_eos",
    "logit_bias",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "function_call",
    "response_format",
    "structured_outputs",
    "echo",
    "suffix",
    "best_of",
    "user",
    "functions",
];

/// Parses as the server does; the property every input must keep.
fn check(bytes: &[u8]) {
    match parse_body(bytes) {
        Err(e) => assert_eq!(e.status.as_u16(), 400, "{e:?}"),
        Ok(obj) => check_object(&obj),
    }
}

fn check_object(obj: &Map<String, Value>) {
    for r in [parse_chat(obj).map(|_| ()), parse_completion(obj).map(|_| ())] {
        if let Err(e) = r {
            assert_eq!(e.status.as_u16(), 400, "{e:?} for {obj:?}");
            assert!(!e.message.is_empty());
        }
    }
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..40).prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "tool",
            "developer",
            "text",
            "json_object",
            "auto",
            "required",
            "function",
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "role",
                        "content",
                        "type",
                        "text",
                        "include_usage",
                        "name",
                        "function",
                        "parameters",
                        "arguments",
                        "tool_calls",
                        "tool_call_id",
                        "x",
                    ]),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// A chat message that is often nearly right, so the deeper checks run.
fn message() -> impl Strategy<Value = Value> {
    (json_leaf(), json_value(), any::<bool>()).prop_map(|(role, content, plain)| {
        let role = if plain { Value::String("user".into()) } else { role };
        serde_json::json!({"role": role, "content": content})
    })
}

fn request_object() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::collection::vec((prop::sample::select(PARAMS.to_vec()), json_value()), 0..8),
        prop::collection::vec(message(), 0..4),
        any::<bool>(),
        ".{0,20}",
    )
        .prop_map(|(fields, messages, add_messages, prompt)| {
            let mut m = Map::new();
            if add_messages {
                m.insert("messages".into(), Value::Array(messages));
                m.insert("prompt".into(), Value::String(prompt));
            }
            for (k, v) in fields {
                m.insert(k.to_string(), v);
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&bytes);
    }

    #[test]
    fn arbitrary_json_in_every_parameter_never_panics(obj in request_object()) {
        check_object(&obj);
        // And the same through the byte path, as the server receives it.
        check(Value::Object(obj).to_string().as_bytes());
    }

    #[test]
    fn mutated_valid_requests_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = br#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"max_tokens":5,"temperature":0.7,"stop":["\n"],"n":2,"logprobs":true,"top_logprobs":3,"stream":true,"stream_options":{"include_usage":true},"seed":-1}"#.to_vec();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        check(&bytes);
    }
}

/// The seeds the fuzzer found (committed under fuzz/corpus/serve_params).
#[test]
fn fuzz_corpus_seeds_parse_without_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/serve_params");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        check(&bytes);
        n += 1;
    }
    assert!(n >= 10, "only {n} corpus seeds in {}", dir.display());
}
