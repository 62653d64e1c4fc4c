//! A tiny real training run of SmolLM2-135M (full fine-tuning): the loss on
//! its own batch goes down, and the exported GGUF loads in the engine and
//! gives the trained candle model's logits within the golden tolerances.

mod train_common;

use candle_core::Device;
use minnow_distill::train::model::{single_sequence_input, Student};
use minnow_distill::train::{TrainConfig, Trainer};
use minnow_engine::chat::ChatMessage;
use minnow_engine::loader::LoadedModel;
use train_common::*;

#[test]
fn tiny_run_lowers_loss_and_export_matches_engine() {
    let dir = temp_dir("loop");
    let cfg = TrainConfig {
        student: model_path(SMOLLM2),
        data: write_dataset(&dir),
        output: dir.join("out.gguf"),
        val_frac: 0.0,
        epochs: 4,
        lr: 2e-5,
        warmup: 0,
        progress: false,
        // The trained tensors in Q8_0 and the rest as the base has them: the
        // export compared with the trained model (the default, q4_k_m,
        // re-quantizes the whole model; the CLI tests check it).
        out_type: "q8_0".into(),
        ..TrainConfig::default()
    };
    let t0 = std::time::Instant::now();
    let mut t = Trainer::new(&cfg).unwrap();
    eprintln!("loaded in {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(t.total_steps(), 4, "4 short examples pack into one micro-batch per epoch");
    let before = t.training_set_loss().unwrap().unwrap();
    let t1 = std::time::Instant::now();
    t.run_until(usize::MAX).unwrap();
    eprintln!("4 steps in {:.1} s", t1.elapsed().as_secs_f64());
    let after = t.training_set_loss().unwrap().unwrap();
    eprintln!("loss on the batch: {before:.4} → {after:.4}");
    assert!(after < 0.8 * before, "training did not lower the loss enough: {before} → {after}");

    // The trained candle model's logits on a training prompt and a new one.
    let base = LoadedModel::load(&model_path(SMOLLM2)).unwrap();
    let chat = base.chat.as_ref().unwrap();
    let seqs: Vec<Vec<u32>> = ["Capital of France?", "Name a fruit that is yellow."]
        .iter()
        .map(|q| {
            let text = chat.render(&[ChatMessage::new("user", *q)], true).unwrap();
            base.tokenizer.encode(&text, !chat.starts_with_bos(&text), true).unwrap()
        })
        .collect();
    let ours: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|s| {
            t.student()
                .forward(&single_sequence_input(s, &t.student().shape, &Device::Cpu).unwrap())
                .unwrap()
                .to_vec2()
                .unwrap()
        })
        .collect();
    let report = t.finish().unwrap();
    assert_eq!(report.steps, 4);
    assert!(report.output_bytes > 0);

    let trained = LoadedModel::load(&cfg.output).unwrap();
    // Every metadata entry of the base file is kept as it was.
    assert_eq!(trained.file.metadata(), base.file.metadata());
    for (s, o) in seqs.iter().zip(&ours) {
        let a = agreement(&engine_logits(&trained, s), o);
        eprintln!("exported model in the engine vs trained candle model: {a:?}");
        assert!(a.decisive > 0);
        assert_within_golden(&a, "exported GGUF vs trained model");
    }
    // And training changed the function: the base model's logits differ.
    let base_logits = engine_logits(&base, &seqs[0]);
    let d = agreement(&base_logits, &ours[0]);
    assert!(d.mean_abs > 0.35, "the trained model's logits barely differ from the base model's: {d:?}");

    // The trained student itself, reloaded by the trainer's own loader, still works.
    let reloaded = Student::load(&trained.file, &Device::Cpu, false).unwrap();
    assert_eq!(reloaded.shape.cfg.n_layer, 30);
    let _ = std::fs::remove_dir_all(&dir);
}
