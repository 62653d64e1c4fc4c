//! `minnow distill label`: a teacher answers every input; each answer
//! becomes a [`DatasetRecord`] appended to a crash-safe [`RecordLog`].
//!
//! Worked examples (a few cases with gold answers) are shown to the teacher
//! as earlier user/assistant turns; the record keeps only the zero-shot
//! conversation and the teacher's answer, because that is what the student
//! will be asked. Rerunning the same command after a crash or a kill
//! continues with the inputs not yet in the output file.

use crate::data::{read_inputs, DatasetRecord, EvalCase, Input, Provenance, RecordLog};
use crate::teacher::{GenSettings, Job, Teacher};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use minnow_engine::chat::ChatMessage;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct LabelConfig {
    pub inputs: PathBuf,
    pub output: PathBuf,
    /// Worked examples shown before every input (already the chosen few).
    pub examples: Vec<EvalCase>,
    /// A system message put first (and kept in the records).
    pub system: Option<String>,
    pub settings: GenSettings,
    /// Label only the first N inputs of the file.
    pub limit: Option<usize>,
    /// USD per hour of the machine, for the cost estimate.
    pub price_per_hour: Option<f64>,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

#[derive(Debug, Default, Clone)]
pub struct LabelSummary {
    /// Inputs this run was asked to cover (after `--limit`).
    pub wanted: usize,
    /// Already in the output file when the run started.
    pub already: usize,
    /// Labeled by this run.
    pub labeled: usize,
    /// `(id, why)` of inputs the teacher could not answer.
    pub failed: Vec<(String, String)>,
    /// Answers cut at `max_tokens`.
    pub truncated: usize,
    pub torn_bytes_dropped: u64,
    pub secs: f64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The conversation the teacher sees: system (given, or the input's own),
/// the worked examples as earlier turns, then the input.
pub fn teacher_messages(system: Option<&str>, examples: &[EvalCase], input: &[ChatMessage]) -> Vec<ChatMessage> {
    let (own_system, rest) = split_system(input);
    let mut out = Vec::new();
    if let Some(s) = system.or(own_system) {
        out.push(ChatMessage::new("system", s));
    }
    for ex in examples {
        out.extend(split_system(&ex.messages).1.iter().cloned());
        out.push(ChatMessage::new("assistant", ex.answer_text()));
    }
    out.extend(rest.iter().cloned());
    out
}

/// The zero-shot conversation recorded for the student.
fn student_messages(system: Option<&str>, input: &[ChatMessage], answer: &str) -> Vec<ChatMessage> {
    let (own_system, rest) = split_system(input);
    let mut out = Vec::new();
    if let Some(s) = system.or(own_system) {
        out.push(ChatMessage::new("system", s));
    }
    out.extend(rest.iter().cloned());
    out.push(ChatMessage::new("assistant", answer));
    out
}

fn split_system(m: &[ChatMessage]) -> (Option<&str>, &[ChatMessage]) {
    match m.first() {
        Some(f) if f.role == "system" => (Some(f.content.as_str()), &m[1..]),
        _ => (None, m),
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Labels the inputs not yet in `cfg.output`.
pub fn label(cfg: &LabelConfig, teacher: &dyn Teacher) -> Result<LabelSummary> {
    let mut inputs = read_inputs(&cfg.inputs)?;
    if let Some(n) = cfg.limit {
        inputs.truncate(n);
    }
    let (mut log, recovered) = RecordLog::<DatasetRecord>::open(&cfg.output)?;
    let mut sum = LabelSummary { wanted: inputs.len(), torn_bytes_dropped: recovered.torn_bytes, ..Default::default() };
    sum.already = inputs.iter().filter(|i| log.contains(&i.id)).count();
    let todo: Vec<Input> = inputs.into_iter().filter(|i| !log.contains(&i.id)).collect();
    if todo.is_empty() {
        return Ok(sum);
    }
    let jobs: Vec<Job> = todo
        .iter()
        .enumerate()
        .map(|(index, i)| Job { index, messages: teacher_messages(cfg.system.as_deref(), &cfg.examples, &i.messages) })
        .collect();
    let bar = progress_bar(cfg, todo.len());
    let t0 = Instant::now();
    let teacher_name = teacher.describe();
    let sampling = cfg.settings.to_json();
    let mut last_note = Instant::now();
    teacher.answer_all(jobs, &cfg.settings, &mut |index, result| {
        let input = &todo[index];
        bar.inc(1);
        let a = match result {
            Ok(a) => a,
            Err(e) => {
                bar.println(format!("minnow distill label: input {}: {e}", input.id));
                sum.failed.push((input.id.clone(), e));
                return Ok(());
            }
        };
        sum.truncated += (a.finish_reason == "length") as usize;
        sum.prompt_tokens += a.prompt_tokens;
        sum.cached_prompt_tokens += a.cached_prompt_tokens;
        sum.completion_tokens += a.completion_tokens;
        let rec = DatasetRecord {
            id: input.id.clone(),
            messages: student_messages(cfg.system.as_deref(), &input.messages, &a.text),
            tools: None,
            provenance: Some(Provenance {
                teacher: teacher_name.clone(),
                sampling: sampling.clone(),
                time: unix_now(),
                prompt_tokens: Some(a.prompt_tokens),
                completion_tokens: Some(a.completion_tokens),
                finish_reason: Some(a.finish_reason.clone()),
            }),
            teacher_logprobs: a.logprobs,
        };
        log.append(&rec)?;
        sum.labeled += 1;
        update_cost(&bar, cfg.price_per_hour, t0);
        if !cfg.progress && last_note.elapsed().as_secs() >= 60 {
            // No terminal, no bar: a line a minute for logs.
            last_note = Instant::now();
            eprintln!("minnow distill label: {}", progress_line(sum.labeled, todo.len(), t0, cfg.price_per_hour));
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    sum.secs = t0.elapsed().as_secs_f64();
    Ok(sum)
}

fn progress_bar(cfg: &LabelConfig, n: usize) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    let style =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// "12/400 labeled, 0.21/s, ETA 31 min, $0.0012 so far (est. $0.0520 total)".
fn progress_line(done: usize, total: usize, t0: Instant, price_per_hour: Option<f64>) -> String {
    let secs = t0.elapsed().as_secs_f64();
    let rate = done as f64 / secs.max(1e-9);
    let eta = (total - done) as f64 / rate.max(1e-9);
    let mut s = format!("{done}/{total} labeled, {rate:.2}/s, ETA {:.0} min", eta / 60.0);
    if let Some(p) = price_per_hour {
        s += &format!(", ${:.4} so far (est. ${:.4} total)", p * secs / 3600.0, p * (secs + eta) / 3600.0);
    }
    s
}

/// Cost so far plus the projection to the end at the current rate.
fn update_cost(bar: &ProgressBar, price_per_hour: Option<f64>, t0: Instant) {
    let Some(p) = price_per_hour else { return };
    let spent = t0.elapsed().as_secs_f64();
    let total = spent + bar.eta().as_secs_f64();
    bar.set_message(format!("${:.4} (est. ${:.4} total)", p * spent / 3600.0, p * total / 3600.0));
}

/// A one-line account of a run, for the command's output.
pub fn describe(sum: &LabelSummary, output: &std::path::Path) -> String {
    let mut s = format!(
        "labeled {} inputs in {:.1} s ({} were already done, {} of {} now in {})",
        sum.labeled,
        sum.secs,
        sum.already,
        sum.already + sum.labeled,
        sum.wanted,
        output.display()
    );
    if sum.labeled > 0 && sum.secs > 0.0 {
        s += &format!(
            "; {:.2} inputs/s, {} prompt tokens ({} from the prefix cache), {} completion tokens",
            sum.labeled as f64 / sum.secs,
            sum.prompt_tokens,
            sum.cached_prompt_tokens,
            sum.completion_tokens
        );
    }
    if sum.truncated > 0 {
        s += &format!("; {} answers hit --max-tokens", sum.truncated);
    }
    if sum.torn_bytes_dropped > 0 {
        s += &format!("; dropped a torn last line ({} bytes) left by an interrupted run", sum.torn_bytes_dropped);
    }
    s
}

/// An error when some inputs failed (they can be retried by rerunning).
pub fn check_failures(sum: &LabelSummary) -> Result<()> {
    if let Some((id, why)) = sum.failed.first() {
        bail!(
            "{} inputs could not be labeled (first: {id}: {why}); fix the cause and rerun the same command to label just those",
            sum.failed.len()
        );
    }
    Ok(())
}
