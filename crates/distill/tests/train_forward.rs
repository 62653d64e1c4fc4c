//! The training forward pass (candle, f32 weights) against the engine's
//! (minnow's kernels, quantized weights) on the same GGUF files: same logits
//! within the golden tolerances, on chat prompts of the distillation task
//! and on a held-out prompt no reference data was made from; and against
//! llama.cpp's own top-20 logits from the golden data.

mod train_common;

use candle_core::Device;
use minnow_distill::train::model::{single_sequence_input, Student};
use minnow_engine::chat::ChatMessage;
use minnow_engine::loader::LoadedModel;
use train_common::*;

const TASK_PROMPT: &str = "Extract the order from the message as JSON with keys customer (full name), product (singular, lower case), quantity (integer), unit_price (number), city (city name only), delivery_date (YYYY-MM-DD). Reply with the JSON only.\n\nMessage: Liam Okafor here. For the Osaka team we'd like 12 whiteboards. Quote said 79 USD apiece. Delivery date 2025-06-07, please.";
/// Written for this test only: no reference data exists for it.
const HELD_OUT: &str = "Die Katze schläft auf dem warmen Fensterbrett, while the kettle whistles: 3 + 4 = 7.";

fn prompts(m: &LoadedModel) -> Vec<Vec<u32>> {
    let chat = m.chat.as_ref().expect("chat template");
    let text = chat.render(&[ChatMessage::new("user", TASK_PROMPT)], true).unwrap();
    let mut convo = m.tokenizer.encode(&text, !chat.starts_with_bos(&text), true).unwrap();
    convo.truncate(96);
    vec![convo, m.tokenizer.encode(HELD_OUT, true, false).unwrap()]
}

fn candle_logits(s: &Student, tokens: &[u32]) -> Vec<Vec<f32>> {
    let inp = single_sequence_input(tokens, &s.shape, &Device::Cpu).unwrap();
    s.forward(&inp).unwrap().to_vec2().unwrap()
}

fn check_model(file: &str) {
    let path = model_path(file);
    let engine = LoadedModel::load(&path).unwrap();
    let student = Student::load(&engine.file, &Device::Cpu, false).unwrap();
    for (i, toks) in prompts(&engine).iter().enumerate() {
        let a = agreement(&engine_logits(&engine, toks), &candle_logits(&student, toks));
        eprintln!("{file} prompt {i} ({} tokens): {a:?}", toks.len());
        assert!(a.decisive > 0, "no decisive position: the comparison would prove nothing");
        assert_within_golden(&a, &format!("{file} prompt {i}"));
    }
}

#[test]
fn smollm2_candle_forward_matches_engine() {
    check_model(SMOLLM2);
}

#[test]
fn qwen2_candle_forward_matches_engine() {
    check_model(QWEN05);
}

/// llama.cpp's top-20 logits at every prompt position (golden logits.json)
/// against the candle forward pass: mean |Δ| over the reference's top-10
/// and top-1 agreement where the reference is decisive.
#[test]
fn smollm2_candle_forward_matches_llama_cpp_golden() {
    let golden = match std::env::var_os("MINNOW_GOLDEN") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden")),
    };
    let text = std::fs::read_to_string(golden.join("smollm2-135m-instruct-q4_1/logits.json")).unwrap();
    let g: serde_json::Value = serde_json::from_str(&text).unwrap();
    let file = minnow_gguf::GgufFile::open(model_path(SMOLLM2)).unwrap();
    let student = Student::load(&file, &Device::Cpu, false).unwrap();
    let (mut sum, mut n, mut decisive, mut agree) = (0f64, 0usize, 0usize, 0usize);
    for case in g["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ours = candle_logits(&student, &ids);
        for (pos, top) in case["prompt_topk"].as_array().unwrap().iter().enumerate() {
            let rid: Vec<usize> = top["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let rl: Vec<f32> = top["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let d: f64 = (0..10).map(|j| (rl[j] - ours[pos][rid[j]]).abs() as f64).sum::<f64>() / 10.0;
            assert!(d <= 1.5, "position {pos}: mean |Δlogit| {d}");
            sum += d;
            n += 1;
            if rl[0] - rl[1] >= 0.75 {
                decisive += 1;
                let argmax = (0..ours[pos].len()).max_by(|&a, &b| ours[pos][a].total_cmp(&ours[pos][b])).unwrap();
                agree += (argmax == rid[0]) as usize;
            }
        }
    }
    let mean = sum / n as f64;
    eprintln!("vs llama.cpp: mean |Δ| {mean:.4} over {n} positions, top-1 {agree}/{decisive}");
    assert!(mean <= 0.35, "mean |Δlogit| {mean} > 0.35");
    assert_eq!(agree, decisive);
}
