//! `minnow distill train`: the command-line face of
//! `minnow_distill::train` — flags to a `TrainConfig`, the student name
//! resolved to a file, a one-line summary (and `--json` report) at the end.

use anyhow::Result;
use clap::Args;
use minnow_distill::train::{train, TrainConfig};
use minnow_models as models;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// The student: a GGUF path or a known model name.
    student: String,
    /// The dataset: JSONL from `minnow distill label` or in any format
    /// minnow reads, or store:DIR?... (see below).
    #[arg(long, help = crate::distill_cmd::DATA_HELP)]
    data: PathBuf,
    /// Where the trained GGUF goes.
    #[arg(short, long)]
    output: PathBuf,
    /// Fraction of examples held out for the validation loss.
    #[arg(long, default_value_t = 0.05)]
    val_frac: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate (after warm-up; cosine decay to 0.1× at the end).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Most tokens (rows × padded length) per micro-batch.
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest packed row; longer examples are skipped.
    #[arg(long, default_value_t = 512)]
    max_seq: usize,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Train LoRA adapters of this rank (merged on export) instead of all weights.
    #[arg(long)]
    lora_rank: Option<usize>,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Modules that get adapters: a comma-separated subset of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    lora_targets: String,
    /// With --lora-rank: also write the adapters alone to this file, in
    /// llama.cpp's LoRA GGUF format (for `minnow run|serve --lora` and
    /// `llama-server --lora`); the merged model still goes to --output.
    #[arg(long, value_name = "ADAPTER.gguf", requires = "lora_rank")]
    adapter_out: Option<PathBuf>,
    /// With --lora-rank: also write the adapters to this directory in
    /// Hugging Face PEFT's layout (adapter_config.json +
    /// adapter_model.safetensors), for `peft.PeftModel.from_pretrained`.
    #[arg(long, value_name = "DIR", requires = "lora_rank")]
    peft_out: Option<PathBuf>,
    /// β in (1−β)·CE + β·KL against the teacher's stored top-k (needs `label --logprobs`).
    #[arg(long, default_value_t = 0.0)]
    kl_weight: f64,
    /// Temperature τ of the KL term.
    #[arg(long, default_value_t = 1.0)]
    kl_temperature: f64,
    /// Checkpoint directory; rerunning the same command resumes from it.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// The output's type. q8_0, f16, bf16, f32: the trained tensors in that
    /// type, the rest as in the base. q6_k, q5_k_m, q5_0, q4_k_m, q4_0,
    /// q3_k_m, q2_k: the whole model quantized as `minnow quantize` does,
    /// with an importance matrix collected on the training examples.
    /// Default q4_k_m: as accurate as q8_0 on the order task's student, 1.6×
    /// its decode speed (docs/distillation.md).
    #[arg(long, default_value = "q4_k_m")]
    out_type: String,
    /// Stop after this many optimizer steps (the schedule is sized to it).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Append one JSON line per optimizer step to this file: its learning
    /// rate, loss, gradient norm, tokens, seconds, and the rows it trained on
    /// (token ids, prompt length) — to compare with another trainer on the
    /// very same batches (`bench/train-speed`).
    #[arg(long, value_name = "FILE.jsonl")]
    trace: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn main(a: TrainArgs) -> Result<()> {
    let cfg = TrainConfig {
        student: models::resolve(&a.student)?,
        data: a.data,
        output: a.output,
        val_frac: a.val_frac,
        epochs: a.epochs,
        lr: a.lr,
        batch_tokens: a.batch_tokens,
        grad_accum: a.grad_accum,
        max_seq: a.max_seq,
        warmup: a.warmup,
        clip: a.clip,
        seed: a.seed,
        weight_decay: a.weight_decay,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha,
        lora_targets: a.lora_targets,
        adapter_out: a.adapter_out,
        peft_out: a.peft_out,
        kl_weight: a.kl_weight,
        kl_temperature: a.kl_temperature,
        checkpoint_dir: a.checkpoint_dir,
        checkpoint_every: a.checkpoint_every,
        out_type: a.out_type,
        threads: a.threads,
        max_steps: a.max_steps,
        trace: a.trace,
        // The bar on a terminal; a line a minute in a log file.
        progress: std::io::stderr().is_terminal(),
        ..TrainConfig::default()
    };
    let r = train(&cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    println!(
        "trained {} steps ({} train / {} val examples{}) in {:.1} s, {:.0} tok/s on {}; loss {}, val loss {} → {}; wrote {} ({:.1} MB{})",
        r.steps,
        r.train_examples,
        r.val_examples,
        if r.skipped_too_long > 0 { format!(", {} skipped as longer than --max-seq", r.skipped_too_long) } else { String::new() },
        r.seconds,
        r.tokens_per_sec,
        r.device,
        fmt(r.final_train_loss),
        fmt(r.initial_val_loss),
        fmt(r.final_val_loss),
        r.output.display(),
        r.output_bytes as f64 / 1e6,
        r.imatrix_tokens.map_or(String::new(), |t| format!(", quantized with an importance matrix of {t} training tokens")),
    );
    Ok(())
}
