//! The KL term end to end: a vocabulary mismatch between the teacher's
//! stored log-probs and the student is refused with a clear error, and a
//! dataset whose log-probs share the student's vocabulary trains with
//! (1−β)·CE + β·KL over every answer position.

mod train_common;

use minnow_distill::data::{vocab_fingerprint, DatasetRecord, TeacherLogprobs};
use minnow_distill::train::batch::tokenize_record;
use minnow_distill::train::{TrainConfig, Trainer};
use minnow_engine::loader::LoadedModel;
use std::path::Path;
use train_common::*;

/// The dataset of [`write_dataset`] with the teacher's top-5 at every answer
/// token, here taken from SmolLM2 itself (so the vocabulary is shared), stored
/// with the vocabulary fingerprint `vocab`.
fn with_logprobs(m: &LoadedModel, data: &Path, vocab: Option<String>) -> String {
    let mut out = String::new();
    for line in std::fs::read_to_string(data).unwrap().lines() {
        let mut rec: DatasetRecord = serde_json::from_str(line).unwrap();
        let (prompt, answer) = tokenize_record(&m.tokenizer, m.chat.as_ref(), &rec).unwrap();
        let mut all = prompt.clone();
        all.extend(&answer);
        let logits = engine_logits(m, &all);
        let top = (0..answer.len())
            .map(|i| {
                let row = &logits[prompt.len() + i - 1];
                let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
                let mut idx: Vec<usize> = (0..row.len()).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                idx[..5].iter().map(|&j| (j as u32, (row[j] as f64 - lse) as f32)).collect()
            })
            .collect();
        rec.teacher_logprobs = Some(TeacherLogprobs { vocab: vocab.clone(), tokens: answer, top });
        out.push_str(&serde_json::to_string(&rec).unwrap());
        out.push('\n');
    }
    out
}

#[test]
fn kl_refuses_a_vocabulary_mismatch_and_trains_on_a_shared_one() {
    let dir = temp_dir("kl");
    let plain = write_dataset(&dir);
    let m = LoadedModel::load(&model_path(SMOLLM2)).unwrap();
    let cfg = |data: &Path| TrainConfig {
        student: model_path(SMOLLM2),
        data: data.to_path_buf(),
        output: dir.join("kl.gguf"),
        val_frac: 0.0,
        epochs: 2,
        lr: 3e-5,
        warmup: 0,
        kl_weight: 0.5,
        kl_temperature: 2.0,
        progress: false,
        ..TrainConfig::default()
    };

    let other = dir.join("other-vocab.jsonl");
    std::fs::write(&other, with_logprobs(&m, &plain, Some("vocab-151936-0123456789abcdef".into()))).unwrap();
    let err = Trainer::new(&cfg(&other)).err().expect("a vocabulary mismatch must be refused").to_string();
    assert!(err.contains("differs from the student's") && !err.contains('\n'), "{err}");

    let unknown = dir.join("unknown-vocab.jsonl");
    std::fs::write(&unknown, with_logprobs(&m, &plain, None)).unwrap();
    let err = Trainer::new(&cfg(&unknown)).err().expect("an unknown vocabulary must be refused").to_string();
    assert!(err.contains("unknown"), "{err}");

    let err = Trainer::new(&cfg(&plain)).err().expect("KL without log-probs must be refused").to_string();
    assert!(err.contains("--logprobs"), "{err}");

    let shared = dir.join("shared-vocab.jsonl");
    std::fs::write(&shared, with_logprobs(&m, &plain, Some(vocab_fingerprint(&m.tokenizer)))).unwrap();
    let mut t = Trainer::new(&cfg(&shared)).unwrap();
    let (kl, all) = t.kl_coverage();
    assert!(all > 0 && kl == all, "the KL term should cover every answer position: {kl}/{all}");
    let before = t.training_set_loss().unwrap().unwrap();
    t.run_until(usize::MAX).unwrap();
    let after = t.training_set_loss().unwrap().unwrap();
    eprintln!("CE on the batch with β = 0.5: {before:.4} → {after:.4}");
    assert!(after < before, "{before} → {after}");
    let _ = std::fs::remove_dir_all(&dir);
}
