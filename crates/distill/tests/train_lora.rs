//! LoRA: the merged weights export writes compute the same function as the
//! base weights plus the adapter path, and only the adapted tensors change.

mod train_common;

use candle_core::Device;
use minnow_distill::train::model::{single_sequence_input, Student};
use minnow_distill::train::{TrainConfig, Trainer};
use minnow_gguf::GgufFile;
use train_common::*;

#[test]
fn merged_lora_equals_base_plus_adapter() {
    let dir = temp_dir("lora");
    let cfg = TrainConfig {
        student: model_path(SMOLLM2),
        data: write_dataset(&dir),
        output: dir.join("lora.gguf"),
        val_frac: 0.0,
        epochs: 3,
        lr: 1e-3,
        warmup: 0,
        lora_rank: Some(4),
        lora_alpha: 8.0,
        lora_targets: "q,v,down".into(),
        out_type: "f32".into(),
        progress: false,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&cfg).unwrap();
    let before = t.training_set_loss().unwrap().unwrap();
    t.run_until(usize::MAX).unwrap();
    let after = t.training_set_loss().unwrap().unwrap();
    assert!(after < before, "LoRA training did not lower the loss: {before} → {after}");
    // Only adapters train: 30 layers × 3 targets × (A, B).
    assert_eq!(t.student().trainable().len(), 30 * 3 * 2);

    let tokens: Vec<u32> = (1..40).map(|i| (i * 617) % 49152).collect();
    let inp = single_sequence_input(&tokens, &t.student().shape, &Device::Cpu).unwrap();
    let adapted: Vec<Vec<f32>> = t.student().forward(&inp).unwrap().to_vec2().unwrap();
    t.finish().unwrap();

    let merged_file = GgufFile::open(&cfg.output).unwrap();
    let merged = Student::load(&merged_file, &Device::Cpu, false).unwrap();
    let merged_logits: Vec<Vec<f32>> = merged.forward(&inp).unwrap().to_vec2().unwrap();
    let base_file = GgufFile::open(model_path(SMOLLM2)).unwrap();
    let base = Student::load(&base_file, &Device::Cpu, false).unwrap();
    let base_logits: Vec<Vec<f32>> = base.forward(&inp).unwrap().to_vec2().unwrap();

    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    };
    let merged_vs_adapter = max_diff(&merged_logits, &adapted);
    let adapter_vs_base = max_diff(&adapted, &base_logits);
    eprintln!("max |Δlogit|: merged vs base+adapter {merged_vs_adapter}, base+adapter vs base {adapter_vs_base}");
    // f32 rounding of W + BA against x·Wᵀ + x·AᵀBᵀ only.
    assert!(merged_vs_adapter < 2e-3, "merged model differs from base + adapter by {merged_vs_adapter}");
    assert!(adapter_vs_base > 0.1, "the adapters did not change the model ({adapter_vs_base})");

    // Only adapted tensors were rewritten; the rest are the base file's bytes.
    for info in base_file.tensors() {
        let adapted = [".attn_q.weight", ".attn_v.weight", ".ffn_down.weight"].iter().any(|s| info.name.ends_with(s));
        let same = merged_file.tensor_data_by_name(&info.name).unwrap() == base_file.tensor_data(info);
        assert_eq!(!same, adapted, "tensor '{}'", info.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
