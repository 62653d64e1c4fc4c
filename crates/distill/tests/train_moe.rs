//! Mixture-of-experts students: the candle forward pass of a Mixtral-style
//! llama with experts agrees with the engine's (the tiny-mixtral fixture,
//! with the golden README's MoE-fixture bounds; and SmolLM2 upcycled by
//! `minnow upcycle` with noise, with the real-model bounds), and training
//! one lowers its loss, keeps the router frozen, and exports a file the
//! engine runs.

mod train_common;

use candle_core::Device;
use minnow_distill::train::model::{single_sequence_input, Student};
use minnow_distill::train::{TrainConfig, Trainer};
use minnow_engine::loader::LoadedModel;
use minnow_engine::upcycle::{upcycle_file, UpcycleOptions};
use minnow_gguf::GgufFile;
use train_common::*;

fn candle_logits(s: &Student, tokens: &[u32]) -> Vec<Vec<f32>> {
    s.forward(&single_sequence_input(tokens, &s.shape, &Device::Cpu).unwrap()).unwrap().to_vec2().unwrap()
}

fn sample_tokens(m: &LoadedModel) -> Vec<u32> {
    m.tokenizer
        .encode("The quick brown fox jumps over the lazy dog, then orders 12 whiteboards for Osaka.", true, false)
        .unwrap()
}

#[test]
fn tiny_mixtral_forward_matches_engine() {
    let path = fixtures_dir().join("tiny-mixtral.gguf");
    let engine = LoadedModel::load(&path).unwrap();
    assert!(engine.model.config().moe.is_some());
    let student = Student::load(&engine.file, &Device::Cpu, false).unwrap();
    let toks = sample_tokens(&engine);
    let reference = engine_logits(&engine, &toks);
    let ours = candle_logits(&student, &toks);
    let a = agreement(&reference, &ours);
    // MoE-fixture bounds (golden README): mean ≤ 0.5; ≥ 95% top-1 where the gap ≥ 1.5.
    let (mut decisive, mut agree) = (0, 0);
    for (r, o) in reference.iter().zip(&ours) {
        let mut idx: Vec<usize> = (0..r.len()).collect();
        idx.sort_by(|&x, &y| r[y].total_cmp(&r[x]));
        if r[idx[0]] - r[idx[1]] >= 1.5 {
            decisive += 1;
            let best = (0..o.len()).max_by(|&x, &y| o[x].total_cmp(&o[y])).unwrap();
            agree += (best == idx[0]) as usize;
        }
    }
    eprintln!("tiny-mixtral: {a:?}, top-1 {agree}/{decisive} at gap ≥ 1.5");
    assert!(a.mean_abs <= 0.5, "{a:?}");
    assert!(decisive > 0 && agree as f64 >= 0.95 * decisive as f64, "top-1 {agree}/{decisive}");
}

#[test]
fn upcycled_smollm2_forward_matches_engine() {
    let dir = temp_dir("moe-up");
    let out = dir.join("smollm2-moe.gguf");
    let opts = UpcycleOptions { experts: 4, top_k: 2, noise: 0.02, seed: 3, threads: 2, ..Default::default() };
    upcycle_file(&model_path(SMOLLM2), &out, &opts).unwrap();
    let engine = LoadedModel::load(&out).unwrap();
    let student = Student::load(&engine.file, &Device::Cpu, false).unwrap();
    let toks = sample_tokens(&engine);
    let a = agreement(&engine_logits(&engine, &toks), &candle_logits(&student, &toks));
    eprintln!("upcycled SmolLM2 (4 experts, top-2, noise 0.02): {a:?}");
    assert!(a.decisive > 0);
    assert_within_golden(&a, "upcycled SmolLM2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn training_an_moe_student_lowers_loss_with_a_frozen_router() {
    let dir = temp_dir("moe-train");
    let base = fixtures_dir().join("tiny-mixtral.gguf");
    let cfg = TrainConfig {
        student: base.clone(),
        data: write_dataset(&dir),
        output: dir.join("moe-trained.gguf"),
        val_frac: 0.0,
        epochs: 5,
        lr: 1e-3,
        warmup: 0,
        out_type: "f32".into(),
        progress: false,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&cfg).unwrap();
    let names: Vec<String> = t.student().trainable().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.ends_with("ffn_gate_exps.weight")), "experts must train");
    assert!(!names.iter().any(|n| n.ends_with("ffn_gate_inp.weight")), "the router must be frozen");
    let before = t.training_set_loss().unwrap().unwrap();
    t.run_until(usize::MAX).unwrap();
    let after = t.training_set_loss().unwrap().unwrap();
    eprintln!("tiny-mixtral loss on its batch: {before:.4} → {after:.4}");
    assert!(after < 0.8 * before, "{before} → {after}");
    let toks: Vec<u32> = (1..30).map(|i| (i * 911) % 49152).collect();
    let ours = candle_logits(t.student(), &toks);
    t.finish().unwrap();

    let (bf, of) = (GgufFile::open(&base).unwrap(), GgufFile::open(&cfg.output).unwrap());
    for info in bf.tensors().iter().filter(|i| i.name.ends_with("ffn_gate_inp.weight")) {
        assert_eq!(of.tensor_data_by_name(&info.name).unwrap(), bf.tensor_data(info), "router '{}' changed", info.name);
    }
    // The exported MoE runs in the engine and computes the trained function.
    let engine = LoadedModel::load(&cfg.output).unwrap();
    let a = agreement(&engine_logits(&engine, &toks), &ours);
    eprintln!("exported MoE in the engine vs trained candle model: {a:?}");
    assert!(a.mean_abs <= 0.5, "{a:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
