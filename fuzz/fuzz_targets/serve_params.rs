//! Fuzz target: the server's request parser (`minnow_serve::params`) on
//! arbitrary bytes, and on JSON objects built from those bytes over the
//! parameters the endpoints read (so the fuzzer reaches the per-field checks
//! without first having to discover JSON syntax). Every input must parse or
//! fail with a 400; a panic or any other status is a bug.
//!
//! `cargo +nightly fuzz run serve_params fuzz/corpus/serve_params -- -max_total_time=300`
//! The suite replays the committed corpus (crates/serve/tests/params_props.rs).

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use minnow_serve::params::{parse_body, parse_chat, parse_completion};
use serde_json::{Map, Number, Value};

const PARAMS: &[&str] = &[
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "seed", "stop", "n",
    "logprobs", "top_logprobs", "stream", "stream_options", "ignore_eos", "logit_bias", "tools", "tool_choice",
    "response_format", "echo", "suffix", "best_of", "role", "content", "type", "text", "include_usage",
];

fn check_object(obj: &Map<String, Value>) {
    for r in [parse_chat(obj).map(|_| ()), parse_completion(obj).map(|_| ())] {
        if let Err(e) = r {
            assert_eq!(e.status.as_u16(), 400, "{e:?}");
        }
    }
}

fn value(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let kinds = if depth >= 4 { 6 } else { 8 };
    Ok(match u.choose_index(kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::from(u.arbitrary::<u64>()?),
        4 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => {
            if u.arbitrary()? {
                Value::String(u.choose(PARAMS)?.to_string())
            } else {
                Value::String(u.arbitrary()?)
            }
        }
        6 => {
            let n = u.int_in_range(0..=5)?;
            Value::Array((0..n).map(|_| value(u, depth + 1)).collect::<Result<_>>()?)
        }
        _ => Value::Object(object(u, depth + 1)?),
    })
}

fn object(u: &mut Unstructured, depth: u32) -> Result<Map<String, Value>> {
    let n = u.int_in_range(0..=8)?;
    let mut m = Map::new();
    for _ in 0..n {
        let key = if u.ratio(7, 8)? { u.choose(PARAMS)?.to_string() } else { u.arbitrary()? };
        m.insert(key, value(u, depth)?);
    }
    Ok(m)
}

fuzz_target!(|data: &[u8]| {
    match parse_body(data) {
        Err(e) => assert_eq!(e.status.as_u16(), 400, "{e:?}"),
        Ok(obj) => check_object(&obj),
    }
    if let Ok(obj) = object(&mut Unstructured::new(data), 0) {
        check_object(&obj);
    }
});
