//! Checkpoint resume is exact: training k steps, stopping (a checkpoint
//! written, the trainer dropped), and resuming in a new trainer gives
//! bit-identical weights to training straight through — with full
//! fine-tuning of SmolLM2-135M, two epochs whose data order differs, so the
//! optimizer moments, step count and data order must all come back.

mod train_common;

use minnow_distill::train::{TrainConfig, Trainer};
use train_common::*;

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.student()
        .trainable()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn resume_gives_bit_identical_weights() {
    let dir = temp_dir("resume");
    let cfg = TrainConfig {
        student: model_path(SMOLLM2),
        data: write_dataset(&dir),
        output: dir.join("out.gguf"),
        val_frac: 0.0,
        epochs: 2,
        // Two examples per row, one row per micro-batch: 2 steps per epoch.
        max_seq: 110,
        batch_tokens: 110,
        lr: 3e-5,
        warmup: 1,
        progress: false,
        checkpoint_every: 1000,
        ..TrainConfig::default()
    };
    let straight = {
        let mut t = Trainer::new(&cfg).unwrap();
        assert_eq!(t.total_steps(), 4, "expected 2 micro-batches in each of 2 epochs");
        t.run_until(usize::MAX).unwrap();
        weights(&t)
    };

    let ckpt = dir.join("ckpt");
    let with_ckpt = TrainConfig { checkpoint_dir: Some(ckpt.clone()), ..cfg.clone() };
    {
        let mut t = Trainer::new(&with_ckpt).unwrap();
        t.run_until(3).unwrap();
        t.save_checkpoint().unwrap();
    }
    let mut t = Trainer::new(&with_ckpt).unwrap();
    assert_eq!(t.step(), 3, "the trainer did not resume from the checkpoint");
    t.run_until(usize::MAX).unwrap();
    let resumed = weights(&t);

    assert_eq!(straight.len(), resumed.len());
    let mut moved = false;
    for ((n, a), (m, b)) in straight.iter().zip(&resumed) {
        assert_eq!(n, m);
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "tensor '{n}' differs between the straight and the resumed run");
        moved |= n == "blk.0.attn_q.weight";
    }
    assert!(moved);

    // A checkpoint of another run (different seed) is refused, not misused.
    let other = TrainConfig { seed: 7, ..with_ckpt.clone() };
    let err = Trainer::new(&other).err().expect("a checkpoint of another run must be refused").to_string();
    assert!(err.contains("belongs to another run"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
