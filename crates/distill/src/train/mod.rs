//! `minnow distill train`: fine-tune a student GGUF on a labeled dataset and
//! write the result as a GGUF the engine runs.
//!
//! - [`model`]: the candle forward pass (llama, qwen2, Mixtral-style MoE),
//!   tested to give the engine's logits on the same weights.
//! - [`lora`]: low-rank adapters, merged on export.
//! - [`loss`]: masked cross-entropy and the top-k KL term (defined there).
//! - [`batch`]: tokenization with the prompt masked, validation split,
//!   seeded shuffling, sequence packing.
//! - [`optim`]: AdamW, warm-up + cosine schedule, gradient clipping.
//! - [`checkpoint`]: atomic checkpoints that resume exactly.
//! - [`export`]: the GGUF writer side.
//!
//! Choices where the task left room:
//! - MoE students: the router is **frozen** (its weights never update);
//!   gradients still flow through the routing probabilities into the hidden
//!   states and into the chosen experts. An upcycled model starts with
//!   identical experts, so a frozen router keeps the starting point's
//!   function and avoids the collapse a load-balancing loss must fight.
//! - Examples longer than `max_seq` are skipped (and counted), not cut: a
//!   truncated answer would teach the student to stop mid-answer.
//! - Runs on a CUDA GPU when built with the `cuda` feature and one is
//!   present, else on the CPU; nothing changes for the user.

pub mod batch;
pub mod checkpoint;
pub mod export;
pub mod fused;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
pub mod rng;

use crate::data::{vocab_fingerprint, DatasetRecord};
use anyhow::{bail, Context, Result};
use batch::{Example, MicroBatch};
use candle_core::Device;
use checkpoint::CheckpointHeader;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use minnow_engine::chat::ChatTemplate;
use minnow_engine::quantize::QuantType;
use minnow_engine::tokenizer::Tokenizer;
use minnow_gguf::GgufFile;
use model::Student;
use optim::{AdamW, AdamWParams};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a training run needs; built from CLI flags or a pipeline
/// config (unset fields take the defaults below).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The student GGUF to start from.
    pub student: PathBuf,
    /// Dataset JSONL (`DatasetRecord` per line).
    pub data: PathBuf,
    /// Where the trained GGUF goes.
    pub output: PathBuf,
    /// Fraction of examples held out for validation loss.
    pub val_frac: f64,
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Most tokens (rows × padded length) in one micro-batch.
    pub batch_tokens: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longest packed row (and longest example).
    pub max_seq: usize,
    /// Warm-up steps.
    pub warmup: usize,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
    pub seed: u64,
    pub weight_decay: f64,
    /// The cosine ends at `lr·min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Train LoRA adapters of this rank instead of all weights.
    pub lora_rank: Option<usize>,
    pub lora_alpha: f64,
    /// Comma-separated subset of q,k,v,o,gate,up,down.
    pub lora_targets: String,
    /// With `lora_rank`: also write the adapters alone here, as llama.cpp's
    /// LoRA GGUF (`minnow run|serve --lora`, `llama-server --lora`).
    pub adapter_out: Option<PathBuf>,
    /// With `lora_rank`: also write the adapters in Hugging Face PEFT's
    /// layout to this directory.
    pub peft_out: Option<PathBuf>,
    /// β of `(1−β)·CE + β·KL` (0 = cross-entropy only).
    pub kl_weight: f64,
    /// τ of the KL term.
    pub kl_temperature: f64,
    /// Where checkpoints go; a checkpoint found there is resumed.
    pub checkpoint_dir: Option<PathBuf>,
    /// Optimizer steps between checkpoints.
    pub checkpoint_every: usize,
    /// The output's type: f32, f16, bf16 or q8_0 (the trained tensors in
    /// that type, the others as the base has them), or one of `minnow
    /// quantize`'s mixes below 8 bits (q6_k, q5_k_m, q5_0, q4_k_m, q4_0,
    /// q3_k_m, q2_k: the whole model quantized, weighted by an importance
    /// matrix collected on the training examples). Default q4_k_m: on the
    /// order task's student it scored within 0.005 field accuracy of q8_0
    /// at 1.55–1.64× its decode speed and 73% of its size
    /// (docs/distillation.md).
    pub out_type: String,
    /// Compute threads (default: all cores).
    pub threads: Option<usize>,
    /// Stop after this many optimizer steps (the schedule is sized to it).
    pub max_steps: Option<usize>,
    /// Append a line per optimizer step here (see [`StepTrace`]).
    pub trace: Option<PathBuf>,
    /// Draw the progress bar (on stderr, when it is a terminal); without it
    /// a progress line goes to stderr once a minute.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            student: PathBuf::new(),
            data: PathBuf::new(),
            output: PathBuf::new(),
            val_frac: 0.05,
            epochs: 1,
            lr: 1e-4,
            batch_tokens: 2048,
            grad_accum: 1,
            max_seq: 512,
            warmup: 10,
            clip: 1.0,
            seed: 0,
            weight_decay: 0.0,
            min_lr_ratio: 0.1,
            lora_rank: None,
            lora_alpha: 16.0,
            lora_targets: "q,k,v,o,gate,up,down".into(),
            adapter_out: None,
            peft_out: None,
            kl_weight: 0.0,
            kl_temperature: 1.0,
            checkpoint_dir: None,
            checkpoint_every: 50,
            out_type: "q4_k_m".into(),
            threads: None,
            max_steps: None,
            trace: None,
            progress: true,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps of the whole run (including any done before a resume).
    pub steps: usize,
    /// The step this invocation started from (0 unless resumed).
    pub resumed_from: usize,
    /// Mean loss of the last step.
    pub final_train_loss: Option<f64>,
    /// Validation loss (mean CE over answer tokens) before training and at the end.
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// (step, validation loss) at the start and after each epoch.
    pub val_history: Vec<(usize, f64)>,
    pub train_examples: usize,
    pub val_examples: usize,
    /// Examples longer than `max_seq`, skipped.
    pub skipped_too_long: usize,
    /// Answer positions with a teacher distribution (KL term) / all.
    pub kl_positions: usize,
    pub answer_positions: usize,
    /// Tokens (prompt + answer, no padding) processed by this invocation.
    pub tokens: u64,
    /// Training throughput of this invocation: tokens through forward and backward per second.
    pub tokens_per_sec: f64,
    pub seconds: f64,
    pub output: PathBuf,
    pub output_bytes: u64,
    /// Training tokens the output's importance matrix was collected on
    /// (below-8-bit output types only).
    pub imatrix_tokens: Option<usize>,
    pub device: String,
}

/// The device to train on: the first CUDA GPU when built with `cuda` and
/// one is present, else the CPU.
pub fn select_device() -> Result<Device> {
    Ok(Device::cuda_if_available(0)?)
}

fn check_config(c: &TrainConfig) -> Result<()> {
    let pos = |v: usize, flag: &str| if v == 0 { bail!("{flag} must be at least 1") } else { Ok(()) };
    pos(c.epochs, "--epochs")?;
    pos(c.batch_tokens, "--batch-tokens")?;
    pos(c.grad_accum, "--grad-accum")?;
    pos(c.max_seq, "--max-seq")?;
    pos(c.checkpoint_every, "--checkpoint-every")?;
    if !(c.lr.is_finite() && c.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", c.lr);
    }
    if !(0.0..1.0).contains(&c.val_frac) {
        bail!("--val-frac must be in [0, 1), got {}", c.val_frac);
    }
    if !(0.0..=1.0).contains(&c.kl_weight) {
        bail!("--kl-weight must be in [0, 1], got {}", c.kl_weight);
    }
    if !(c.kl_temperature.is_finite() && c.kl_temperature > 0.0) {
        bail!("--kl-temperature must be positive, got {}", c.kl_temperature);
    }
    if c.clip < 0.0 || !c.clip.is_finite() {
        bail!("--clip must be 0 (off) or positive, got {}", c.clip);
    }
    if c.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    if c.output.as_os_str().is_empty() {
        bail!("no output path: give -o OUT.gguf");
    }
    QuantType::parse(&c.out_type).map_err(|e| anyhow::anyhow!("--out-type: {e}"))?;
    Ok(())
}

/// Reads the training data: a JSONL file in any format `formats` reads,
/// or a store (`store:DIR?…`); errors name the line.
pub fn read_dataset(path: &Path) -> Result<Vec<DatasetRecord>> {
    let loaded = crate::formats::load(path)?;
    if loaded.skipped_truncated > 0 {
        eprintln!(
            "minnow distill: {}: left out {} stored answers cut at max_tokens",
            path.display(),
            loaded.skipped_truncated
        );
    }
    if loaded.records.is_empty() {
        bail!("dataset {} has no records", path.display());
    }
    Ok(loaded.records)
}

/// The bytes that identify the training data: a file's, or a store's
/// records as read (a store that grew is other data).
fn data_bytes(path: &Path) -> Result<Vec<u8>> {
    if crate::formats::is_store(path) {
        return Ok(serde_json::to_vec(&crate::formats::load(path)?.records)?);
    }
    std::fs::read(path).with_context(|| format!("cannot read dataset {}", path.display()))
}

/// Checks the KL term can be computed on `records` for a student with
/// vocabulary fingerprint `student_vocab`; returns k (largest stored top-k).
pub fn check_kl_vocab(records: &[DatasetRecord], student_vocab: &str) -> Result<usize> {
    let mut k = 0;
    for r in records {
        let Some(t) = &r.teacher_logprobs else { continue };
        match &t.vocab {
            Some(v) if v == student_vocab => {}
            Some(v) => bail!(
                "record '{}': the teacher's vocabulary ({v}) differs from the student's ({student_vocab}); \
                 the KL term needs a shared vocabulary: drop --kl-weight or label with a teacher that shares the student's tokenizer",
                r.id
            ),
            None => bail!(
                "record '{}': the teacher's vocabulary is unknown (remote teacher), so the KL term cannot be checked; drop --kl-weight",
                r.id
            ),
        }
        k = k.max(t.top.iter().map(Vec::len).max().unwrap_or(0));
    }
    if k == 0 {
        bail!("--kl-weight needs teacher log-probabilities in the dataset: label with --logprobs K");
    }
    Ok(k)
}

/// What makes two runs the same run: the student file, the data, and every
/// setting that changes the weights (not threads, paths or checkpointing).
fn run_fingerprint(c: &TrainConfig, student: &GgufFile) -> Result<String> {
    let mut h = minnow_kernels::mix::FNV1A_START;
    h = minnow_kernels::mix::fnv1a_extend(h, &data_bytes(&c.data)?);
    h = minnow_kernels::mix::fnv1a_extend(h, &student.file_size().to_le_bytes());
    for t in student.tensors() {
        h = minnow_kernels::mix::fnv1a_extend(h, t.name.as_bytes());
        h = minnow_kernels::mix::fnv1a_extend(h, &t.offset.to_le_bytes());
    }
    let s = TrainConfig {
        student: PathBuf::new(),
        data: PathBuf::new(),
        output: PathBuf::new(),
        checkpoint_dir: None,
        checkpoint_every: 0,
        threads: None,
        progress: false,
        out_type: String::new(),
        ..c.clone()
    };
    h = minnow_kernels::mix::fnv1a_extend(h, serde_json::to_string(&s)?.as_bytes());
    Ok(format!("{h:016x}"))
}

/// Mean CE over the answer tokens of `order`'s examples.
fn validation_loss(
    student: &Student,
    examples: &[Example],
    order: &[usize],
    row_len: usize,
    c: &TrainConfig,
) -> Result<Option<f64>> {
    if order.is_empty() {
        return Ok(None);
    }
    let (mut sum, mut n) = (0f64, 0f64);
    for mb in batch::pack(order, examples, row_len, c.batch_tokens) {
        let (inp, tg) = batch::build(&mb, examples, &student.shape, 0, student.device())?;
        let logits = student.forward(&inp)?;
        let s = loss::loss_sum(&logits, &tg, 0.0, 1.0)?;
        sum += s.ce_sum;
        n += s.n_rows;
    }
    Ok((n > 0.0).then(|| sum / n))
}

fn progress_bar(total: usize, start: usize, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(total as u64),
        if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    pb.set_style(
        ProgressStyle::with_template("train {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(start as u64);
    pb
}

/// Runs one optimizer step over its micro-batches; returns (mean loss, tokens).
fn train_step(
    student: &Student,
    opt: &mut AdamW,
    mbs: &[MicroBatch],
    examples: &[Example],
    c: &TrainConfig,
    kl_k: usize,
    lr: f64,
) -> Result<(f64, u64, f64)> {
    let n_answer: usize = mbs.iter().map(|mb| batch::answer_tokens(mb, examples)).sum();
    let mut acc = Vec::new();
    let (mut loss_total, mut tokens) = (0f64, 0u64);
    for mb in mbs {
        let (inp, tg) = batch::build(mb, examples, &student.shape, kl_k, student.device())?;
        tokens += mb.rows.iter().flatten().map(|&i| examples[i].tokens.len() as u64).sum::<u64>();
        let logits = student.forward(&inp)?;
        let s = loss::loss_sum(&logits, &tg, c.kl_weight, c.kl_temperature)?;
        let scaled = (s.total / n_answer as f64)?;
        loss_total += scaled.to_scalar::<f32>()? as f64;
        let grads = scaled.backward()?;
        optim::accumulate(&mut acc, &opt.slots, &grads)?;
    }
    if !loss_total.is_finite() {
        bail!("the training loss became {loss_total}: lower --lr (or raise --clip)");
    }
    let grad_norm = opt.step(&acc, lr, c.clip)?;
    Ok((loss_total, tokens, grad_norm))
}

/// One optimizer step as `--trace` writes it (a JSON line): enough to
/// replay the step in another trainer and compare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTrace {
    /// 0-based.
    pub step: usize,
    pub lr: f64,
    /// Mean loss over the step's answer tokens (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens through forward and backward (no padding).
    pub tokens: u64,
    pub seconds: f64,
    /// Micro-batches, each a list of rows, each row the examples packed in it.
    pub micro_batches: Vec<Vec<Vec<TracedExample>>>,
}

/// An example as trained: its ids, and how many lead ids are prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TracedExample {
    pub tokens: Vec<u32>,
    pub n_prompt: usize,
}

/// Everything loaded and planned before the first step.
struct Setup {
    base: GgufFile,
    student: Student,
    examples: Vec<Example>,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    steps: Vec<Vec<MicroBatch>>,
    /// Step indices (exclusive ends) where an epoch ends.
    epoch_ends: Vec<usize>,
    kl_k: usize,
    stats: batch::PrepStats,
    /// Capacity of a packed row: the longest example (at most `max_seq`).
    /// Attention costs T² per row, so rows no longer than the longest
    /// example keep packing from multiplying it when examples are similar
    /// in length, while short examples still share rows.
    row_len: usize,
}

fn setup(c: &TrainConfig, device: &Device) -> Result<Setup> {
    let base = GgufFile::open(&c.student).with_context(|| format!("cannot open student {}", c.student.display()))?;
    let name = c.student.display();
    let tok = Tokenizer::from_gguf(&base).map_err(|e| anyhow::anyhow!("{name}: tokenizer: {e}"))?;
    let chat = ChatTemplate::from_gguf(&base).map_err(|e| anyhow::anyhow!("{name}: chat template: {e}"))?;
    let records = read_dataset(&c.data)?;
    let kl_k = if c.kl_weight > 0.0 { check_kl_vocab(&records, &vocab_fingerprint(&tok))? } else { 0 };
    let (examples, stats) = batch::prepare(&records, &tok, chat.as_ref(), c.max_seq, kl_k > 0)?;
    if examples.is_empty() {
        bail!("every example is longer than --max-seq {}: raise it", c.max_seq);
    }
    let (train_idx, val_idx) = batch::split(examples.len(), c.val_frac, c.seed);
    let row_len = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1).min(c.max_seq);
    let mut steps = Vec::new();
    let mut epoch_ends = Vec::new();
    for epoch in 0..c.epochs {
        let one = batch::plan_steps(
            &train_idx,
            &examples,
            1,
            row_len,
            c.batch_tokens,
            c.grad_accum,
            c.seed.wrapping_add(epoch as u64),
        );
        steps.extend(one);
        epoch_ends.push(steps.len());
    }
    if let Some(m) = c.max_steps {
        steps.truncate(m);
        epoch_ends.retain(|&e| e <= m);
        if epoch_ends.last() != Some(&steps.len()) {
            epoch_ends.push(steps.len());
        }
    }
    let mut student =
        Student::load(&base, device, c.lora_rank.is_none()).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if let Some(rank) = c.lora_rank {
        let stems = lora::parse_targets(&c.lora_targets)?;
        let mut weights = Vec::new();
        for l in 0..student.shape.cfg.n_layer {
            for stem in &stems {
                let n = format!("blk.{l}.{stem}.weight");
                match student.get(&n) {
                    Ok(t) if t.rank() == 2 => weights.push((n, (t.dim(0)?, t.dim(1)?))),
                    _ => bail!("LoRA target '{stem}' has no 2-D weight '{n}' in this model (MoE expert FFNs take no adapters: drop gate,up,down)"),
                }
            }
        }
        student.lora = Some(lora::LoraSet::new(&weights, rank, c.lora_alpha, c.seed, device)?);
    }
    Ok(Setup { base, student, examples, train_idx, val_idx, steps, epoch_ends, kl_k, stats, row_len })
}

/// Asks glibc's malloc to keep freed blocks up to its largest threshold
/// (32 MiB) for reuse rather than returning them to the kernel: a training
/// step frees and reallocates the same activation and gradient sizes every
/// step, and fresh pages cost a fault and zeroing each (about a fifth of a
/// step's time on a CPU without this). glibc is linked anyway; declaring
/// `mallopt` here avoids a dependency for one call.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only changes malloc's tuning parameters; the
        // values are in the documented ranges.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// Trains as `cfg` says and writes the student GGUF.
pub fn train(cfg: &TrainConfig) -> Result<TrainReport> {
    let mut t = Trainer::new(cfg)?;
    t.run_until(usize::MAX)?;
    t.finish()
}

/// A training run in progress: loaded, planned, possibly resumed from a
/// checkpoint. [`train`] is `new`, `run_until(all)`, `finish`; tests stop
/// in between.
pub struct Trainer {
    cfg: TrainConfig,
    s: Setup,
    opt: AdamW,
    header: CheckpointHeader,
    device: Device,
    start: usize,
    tokens: u64,
    seconds: f64,
}

impl Trainer {
    /// Loads the student and data, plans every step, and resumes from the
    /// checkpoint in `checkpoint_dir` if there is one of this run.
    pub fn new(cfg: &TrainConfig) -> Result<Trainer> {
        check_config(cfg)?;
        // candle's CPU matmul reads its thread count from this variable; its
        // own default counts physical cores only, leaving SMT siblings idle.
        match cfg.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => std::env::set_var("RAYON_NUM_THREADS", n.to_string()),
            None if std::env::var_os("RAYON_NUM_THREADS").is_none() => {
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            None => {}
        }
        keep_freed_memory();
        let device = select_device()?;
        let s = setup(cfg, &device)?;
        let fingerprint = run_fingerprint(cfg, &s.base)?;
        let mut opt =
            AdamW::new(s.student.trainable(), AdamWParams { weight_decay: cfg.weight_decay, ..Default::default() })?;
        let mut header = CheckpointHeader {
            step: 0,
            adam_t: 0,
            fingerprint: fingerprint.clone(),
            vars: Vec::new(),
            val_history: Vec::new(),
            last_train_loss: None,
        };
        if let Some(dir) = &cfg.checkpoint_dir {
            if let Some((h, r)) = checkpoint::read_header(dir)? {
                if h.fingerprint != fingerprint {
                    bail!(
                        "the checkpoint in {} belongs to another run (different student, data or settings): use another --checkpoint-dir or delete it",
                        dir.display()
                    );
                }
                checkpoint::restore(&h, r, &mut opt)?;
                header = h;
            }
        }
        let start = header.step.min(s.steps.len());
        Ok(Trainer { cfg: cfg.clone(), s, opt, header, device, start, tokens: 0, seconds: 0.0 })
    }

    pub fn student(&self) -> &Student {
        &self.s.student
    }

    /// Optimizer steps done so far, and planned in all.
    pub fn step(&self) -> usize {
        self.header.step
    }

    /// Answer positions with a teacher distribution for the KL term, and all answer positions.
    pub fn kl_coverage(&self) -> (usize, usize) {
        (self.s.stats.kl_positions, self.s.stats.answer_positions)
    }

    pub fn total_steps(&self) -> usize {
        self.s.steps.len()
    }

    /// Mean CE over the validation examples' answer tokens with the current weights.
    pub fn validation_loss(&self) -> Result<Option<f64>> {
        validation_loss(&self.s.student, &self.s.examples, &self.s.val_idx, self.s.row_len, &self.cfg)
    }

    /// Mean CE over the training examples' answer tokens with the current weights.
    pub fn training_set_loss(&self) -> Result<Option<f64>> {
        validation_loss(&self.s.student, &self.s.examples, &self.s.train_idx, self.s.row_len, &self.cfg)
    }

    /// Writes a checkpoint now (when a checkpoint directory is set).
    pub fn save_checkpoint(&self) -> Result<()> {
        if let Some(dir) = &self.cfg.checkpoint_dir {
            checkpoint::save(dir, self.header.clone(), &self.opt)?;
        }
        Ok(())
    }

    /// Runs optimizer steps until `until` steps are done (or all of them).
    pub fn run_until(&mut self, until: usize) -> Result<()> {
        let (c, s) = (&self.cfg, &self.s);
        let total = s.steps.len();
        let end = until.min(total);
        let at = self.header.step;
        if at == 0 && self.header.val_history.is_empty() {
            if let Some(v) = validation_loss(&s.student, &s.examples, &s.val_idx, s.row_len, c)? {
                self.header.val_history.push((0, v));
            }
        }
        let pb = progress_bar(total, at, c.progress && end > at);
        if end > at {
            // One line up front, terminal or not: what is being trained, on
            // what, and for how long.
            let mode = c.lora_rank.map_or("full fine-tuning".to_string(), |r| format!("LoRA rank {r}"));
            let resumed = if at > 0 { format!(", resuming at step {at}") } else { String::new() };
            eprintln!(
                "minnow distill train: {} ({mode}) on {}: {} train / {} val examples, {total} steps planned{resumed}",
                c.student.display(),
                c.data.display(),
                s.train_idx.len(),
                s.val_idx.len(),
            );
        }
        let t0 = Instant::now();
        // Without a terminal (a log file, CI) the bar is hidden: a line a
        // minute instead, so a long run still shows it is moving.
        let mut last_line = Instant::now();
        let mut tokens = 0u64;
        let mut trace = match &c.trace {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--trace: cannot open {}", path.display()))?,
            ),
            None => None,
        };
        for step in at..end {
            let lr = optim::lr_at(step, total, c.warmup, c.lr, c.min_lr_ratio);
            let step_start = Instant::now();
            let (loss, n, grad_norm) =
                train_step(&s.student, &mut self.opt, &s.steps[step], &s.examples, c, s.kl_k, lr)?;
            if let Some(file) = trace.as_mut() {
                let line = StepTrace {
                    step,
                    lr,
                    loss,
                    grad_norm,
                    tokens: n,
                    seconds: step_start.elapsed().as_secs_f64(),
                    micro_batches: s.steps[step]
                        .iter()
                        .map(|mb| {
                            mb.rows
                                .iter()
                                .map(|row| {
                                    row.iter()
                                        .map(|&i| TracedExample {
                                            tokens: s.examples[i].tokens.clone(),
                                            n_prompt: s.examples[i].n_prompt,
                                        })
                                        .collect()
                                })
                                .collect()
                        })
                        .collect(),
                };
                use std::io::Write;
                writeln!(file, "{}", serde_json::to_string(&line)?).context("--trace: cannot write")?;
            }
            tokens += n;
            self.header.step = step + 1;
            self.header.last_train_loss = Some(loss);
            if s.epoch_ends.contains(&(step + 1)) {
                if let Some(v) = validation_loss(&s.student, &s.examples, &s.val_idx, s.row_len, c)? {
                    self.header.val_history.push((step + 1, v));
                }
            }
            let rate = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            let val = self.header.val_history.last().map(|v| format!("  val {:.4}", v.1)).unwrap_or_default();
            pb.set_message(format!("loss {loss:.4}{val}  {rate:.0} tok/s"));
            pb.set_position((step + 1) as u64);
            // The first step's line gives the speed early; then one a minute.
            if !c.progress && (step == at || last_line.elapsed().as_secs() >= 60) {
                last_line = Instant::now();
                let done = step + 1 - at;
                let eta = t0.elapsed().as_secs_f64() / done as f64 * (end - step - 1) as f64;
                eprintln!(
                    "minnow distill train: step {}/{total}, loss {loss:.4}{val}, {rate:.0} tok/s, ETA {:.0} min",
                    step + 1,
                    eta / 60.0
                );
            }
            if let Some(dir) = &c.checkpoint_dir {
                if (step + 1) % c.checkpoint_every == 0 || step + 1 == total {
                    checkpoint::save(dir, self.header.clone(), &self.opt)?;
                }
            }
        }
        pb.finish_and_clear();
        self.tokens += tokens;
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Writes the output GGUF and reports.
    pub fn finish(self) -> Result<TrainReport> {
        let (c, s, h) = (&self.cfg, &self.s, &self.header);
        let out_type = QuantType::parse(&c.out_type).map_err(|e| anyhow::anyhow!("--out-type: {e}"))?;
        let (output_bytes, imatrix_tokens) = match out_type {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 | QuantType::Q8_0 => {
                (export::export(&s.base, &s.student, &c.output, out_type.base())?, None)
            }
            mix => {
                let train = s.train_idx.iter().map(|&i| &s.examples[i].tokens[..]);
                let threads = c.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                let (bytes, tokens) = export::export_quantized(&s.base, &s.student, &c.output, mix, train, threads)?;
                (bytes, Some(tokens))
            }
        };
        if let Some(path) = &c.adapter_out {
            let lora = s.student.lora.as_ref().context("--adapter-out needs --lora-rank")?;
            export::export_adapter(&s.base, lora, path)?;
        }
        if let Some(dir) = &c.peft_out {
            let lora = s.student.lora.as_ref().context("--peft-out needs --lora-rank")?;
            let cfg = minnow_engine::model::ModelConfig::from_gguf(&s.base)
                .map_err(|e| anyhow::anyhow!("the base model: {e}"))?;
            export::export_peft(&s.base, &cfg, lora, dir)?;
        }
        Ok(TrainReport {
            steps: h.step,
            resumed_from: self.start,
            final_train_loss: h.last_train_loss,
            initial_val_loss: h.val_history.first().filter(|v| v.0 == 0).map(|v| v.1),
            final_val_loss: h.val_history.last().map(|v| v.1),
            val_history: h.val_history.clone(),
            train_examples: s.train_idx.len(),
            val_examples: s.val_idx.len(),
            skipped_too_long: s.stats.too_long,
            kl_positions: s.stats.kl_positions,
            answer_positions: s.stats.answer_positions,
            tokens: self.tokens,
            tokens_per_sec: if self.seconds > 0.0 { self.tokens as f64 / self.seconds } else { 0.0 },
            seconds: self.seconds,
            output: c.output.clone(),
            output_bytes,
            imatrix_tokens,
            device: format!("{:?}", self.device),
        })
    }
}
