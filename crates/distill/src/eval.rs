//! `minnow distill eval`: models answer cases with gold answers; each
//! answer is scored, and each model's speed and cost on this machine is
//! measured.
//!
//! Per model, in order (one model in memory at a time):
//! 1. speed, single stream: one case's prompt is prefilled and 32 tokens
//!    decoded with `generate` (best of two runs, since other work on the
//!    machine only ever slows a run down): prefill and decode tok/s;
//! 2. quality: every case answered greedily through the continuous-batching
//!    scheduler (as a server would), scored with the chosen scorer, and
//!    compared with the teacher's answers when given;
//! 3. cost: the batched run's wall time priced at `--price-per-hour`, per
//!    1,000 cases and per million generated tokens.
//!
//! Every model's answers are written to `OUTPUT/outputs/<label>.jsonl`.

use crate::data::{last_user_text, read_eval_cases, DatasetRecord, EvalCase};
use crate::label::teacher_messages;
use crate::report::{self, ModelResult, Report};
use crate::score::{CaseScore, Scorer};
use crate::teacher::{GenSettings, Job, LocalModel, Teacher};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use minnow_engine::generate::{generate, GenerateParams};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_kernels::pool::ThreadPool;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// One row of the evaluation: a model and how it is prompted.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The row's name; by default the file's stem (plus "N-shot").
    pub label: Option<String>,
    pub path: PathBuf,
    /// Prompted with the worked examples.
    pub few_shot: bool,
    /// Answers constrained to this JSON Schema (structured output).
    pub json_schema: Option<serde_json::Value>,
}

impl ModelSpec {
    pub fn new(label: Option<String>, path: PathBuf, few_shot: bool) -> ModelSpec {
        ModelSpec { label, path, few_shot, json_schema: None }
    }

    fn label(&self, n_shot: usize) -> String {
        let base = if let Some(l) = &self.label {
            l.clone()
        } else {
            let stem =
                self.path.file_stem().map_or_else(|| self.path.display().to_string(), |s| s.to_string_lossy().into());
            if self.few_shot {
                format!("{stem}, {n_shot}-shot")
            } else {
                format!("{stem}, zero-shot")
            }
        };
        if self.json_schema.is_some() {
            format!("{base}, schema")
        } else {
            base
        }
    }
}

pub struct EvalConfig {
    pub data: PathBuf,
    pub models: Vec<ModelSpec>,
    pub few_shot: Option<PathBuf>,
    pub n_shot: usize,
    pub scorer: Scorer,
    pub teacher_outputs: Option<PathBuf>,
    /// The label of a row (usually the teacher with worked examples) whose
    /// answers the other rows' agreement is measured against, when no
    /// `teacher_outputs` cover the cases.
    pub agree_with: Option<String>,
    pub price_per_hour: f64,
    pub limit: Option<usize>,
    pub max_tokens: usize,
    pub parallel: usize,
    pub threads: usize,
    pub output: PathBuf,
    pub progress: bool,
    /// When set, every row runs twice: as given, and with its answers
    /// constrained to this JSON Schema (a row pair per model).
    pub json_schema: Option<serde_json::Value>,
}

/// Tokens decoded per speed run.
const SPEED_TOKENS: usize = 32;

/// Runs the evaluation and writes the report into `cfg.output`.
pub fn run(cfg: &EvalConfig) -> Result<Report> {
    let machine = machine(cfg.threads);
    let (cases, examples) = load_cases(cfg)?;
    let teacher = match &cfg.teacher_outputs {
        Some(p) => Some(read_teacher_outputs(p)?),
        None => None,
    };
    std::fs::create_dir_all(cfg.output.join("outputs"))
        .with_context(|| format!("cannot create {}", cfg.output.display()))?;
    if let Some(a) = &cfg.agree_with {
        if !cfg.models.iter().any(|m| &m.label(examples.len()) == a) {
            bail!(
                "--agree-with {a:?} names no row; rows are {:?}",
                cfg.models.iter().map(|m| m.label(examples.len())).collect::<Vec<_>>()
            );
        }
    }
    let mut rows = Vec::new();
    let mut replies = Vec::new();
    let specs: Vec<ModelSpec> = cfg
        .models
        .iter()
        .flat_map(|m| {
            let constrained = cfg.json_schema.clone().map(|s| ModelSpec { json_schema: Some(s), ..m.clone() });
            std::iter::once(m.clone()).chain(constrained)
        })
        .collect();
    for spec in &specs {
        let shots = if spec.few_shot { &examples[..] } else { &[] };
        let (row, texts) = eval_model(cfg, spec, &cases, shots, teacher.as_ref())
            .with_context(|| format!("evaluating {}", spec.path.display()))?;
        eprintln!(
            "minnow distill eval: {}: field accuracy {:.3}, exact {:.3}, decode {:.1} tok/s, {:.1} s",
            row.label, row.field_accuracy, row.exact, row.decode_tok_s, row.wall_secs
        );
        rows.push(row);
        replies.push(texts);
    }
    if let Some(a) = &cfg.agree_with {
        let reference = rows.iter().position(|r| &r.label == a).expect("checked above");
        for i in 0..rows.len() {
            if rows[i].teacher_agreement.is_none() {
                rows[i].teacher_agreement = agreement(&cfg.scorer, &replies[i], &replies[reference]);
            }
        }
    }
    let report = Report {
        data: cfg.data.display().to_string(),
        scorer: cfg.scorer.name(),
        cases: cases.len(),
        excluded_examples: examples.len(),
        price_per_hour: cfg.price_per_hour,
        machine,
        date_unix: crate::label::unix_now(),
        models: rows,
    };
    report::write(&report, &cfg.output)?;
    Ok(report)
}

/// The cases to score, and the worked examples (left out of the cases).
fn load_cases(cfg: &EvalConfig) -> Result<(Vec<EvalCase>, Vec<EvalCase>)> {
    let mut cases = read_eval_cases(&cfg.data)?;
    let mut examples = Vec::new();
    if let Some(p) = &cfg.few_shot {
        examples = read_eval_cases(p)?;
        if examples.len() < cfg.n_shot {
            bail!("--few-shot {} has {} cases, fewer than --n-shot {}", p.display(), examples.len(), cfg.n_shot);
        }
        examples.truncate(cfg.n_shot);
        // A model shown a case's answer would be scored on copying it.
        cases.retain(|c| !examples.iter().any(|e| e.last_user() == c.last_user()));
    }
    if let Some(n) = cfg.limit {
        cases.truncate(n);
    }
    if cases.is_empty() {
        bail!("{}: no cases left to evaluate", cfg.data.display());
    }
    Ok((cases, examples))
}

/// The teacher's answer per prompt (its last user message), from a dataset
/// (`label`'s output) or from another evaluation's per-case outputs
/// (`outputs/<row>.jsonl`: `{"prompt", "reply", ...}`).
fn read_teacher_outputs(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    if crate::formats::is_store(path) {
        for rec in crate::formats::load(path)?.records {
            let (prompt, answer) =
                teacher_answer(&rec).ok_or_else(|| anyhow!("{}: {}: {NOT_ANSWERED}", path.display(), rec.id))?;
            out.insert(prompt, answer);
        }
        return Ok(out);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}:{}: not JSON ({e})", path.display(), i + 1))?;
        if let (Some(p), Some(r)) = (v["prompt"].as_str(), v["reply"].as_str()) {
            out.insert(p.to_string(), r.to_string());
            continue;
        }
        let rec: DatasetRecord = serde_json::from_value(v)
            .map_err(|e| anyhow!("{}:{}: neither a dataset record nor an eval output ({e})", path.display(), i + 1))?;
        let (prompt, answer) =
            teacher_answer(&rec).ok_or_else(|| anyhow!("{}:{}: {NOT_ANSWERED}", path.display(), i + 1))?;
        out.insert(prompt, answer);
    }
    Ok(out)
}

const NOT_ANSWERED: &str = "the last message is not the teacher's (assistant) answer";

/// A record's prompt (its last user message) and the teacher's answer (its
/// last message, when that is the assistant's).
fn teacher_answer(rec: &DatasetRecord) -> Option<(String, String)> {
    let (answer, convo) = rec.messages.split_last().filter(|(a, _)| a.role == "assistant")?;
    Some((last_user_text(convo).to_string(), answer.content.clone()))
}

fn eval_model(
    cfg: &EvalConfig,
    spec: &ModelSpec,
    cases: &[EvalCase],
    shots: &[EvalCase],
    teacher: Option<&HashMap<String, String>>,
) -> Result<(ModelResult, Vec<String>)> {
    let label = spec.label(shots.len());
    let model = Arc::new(LoadedModel::load(&spec.path)?);
    let pool = ThreadPool::new(cfg.threads);
    let convos: Vec<_> = cases.iter().map(|c| teacher_messages(None, shots, &c.messages)).collect();
    let ctx = context_for(&model, &convos, cfg.max_tokens)?;
    let (prefill_tok_s, decode_tok_s) = measure_speed(&model, &pool, &convos[0], ctx)?;
    let local = LocalModel::start(spec.path.display().to_string(), model, pool, cfg.parallel, ctx);
    let settings =
        GenSettings { max_tokens: cfg.max_tokens, json_schema: spec.json_schema.clone(), ..GenSettings::default() };
    let jobs: Vec<Job> = convos.iter().enumerate().map(|(index, m)| Job { index, messages: m.clone() }).collect();
    let mut answers: Vec<Option<crate::teacher::Answer>> = vec![None; cases.len()];
    let bar = bar(cfg.progress, cases.len(), &label);
    let t0 = Instant::now();
    local.answer_all(jobs, &settings, &mut |i, r| {
        bar.inc(1);
        answers[i] = Some(r.map_err(|e| anyhow!("case {}: {e}", cases[i].id))?);
        Ok(())
    })?;
    let wall_secs = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let answers: Vec<_> = answers.into_iter().map(|a| a.expect("every job answered")).collect();
    write_outputs(&cfg.output, &label, cases, &answers, &cfg.scorer)?;

    let scores: Vec<CaseScore> =
        cases.iter().zip(&answers).map(|(c, a)| cfg.scorer.score(&a.text, &c.answer_value())).collect();
    let texts: Vec<String> = answers.iter().map(|a| a.text.clone()).collect();
    let agreement = teacher.and_then(|t| {
        let theirs: Vec<Option<&String>> = cases.iter().map(|c| t.get(c.last_user())).collect();
        agreement_with(&cfg.scorer, &texts, &theirs)
    });
    let n = cases.len() as f64;
    let prompt_tokens: u64 = answers.iter().map(|a| a.prompt_tokens).sum();
    let completion_tokens: u64 = answers.iter().map(|a| a.completion_tokens).sum();
    let price_per_sec = cfg.price_per_hour / 3600.0;
    let row = ModelResult {
        label,
        model: spec.path.display().to_string(),
        shots: shots.len(),
        cases: cases.len(),
        field_accuracy: field_accuracy(&scores),
        exact: exact_rate(&scores),
        teacher_agreement: agreement,
        prompt_tokens_per_case: prompt_tokens as f64 / n,
        completion_tokens_per_case: completion_tokens as f64 / n,
        prefill_tok_s,
        decode_tok_s,
        batch_gen_tok_s: completion_tokens as f64 / wall_secs,
        wall_secs,
        usd_per_1k_cases: price_per_sec * wall_secs / n * 1000.0,
        usd_per_1m_gen_tokens: price_per_sec * wall_secs / (completion_tokens.max(1) as f64) * 1e6,
        model_bytes: std::fs::metadata(&spec.path).map(|m| m.len()).unwrap_or(0),
    };
    Ok((row, texts))
}

/// Agreement of `mine` with `theirs`, case by case; `None` when no case
/// has an answer of theirs to compare with.
fn agreement(scorer: &Scorer, mine: &[String], theirs: &[String]) -> Option<report::Agreement> {
    agreement_with(scorer, mine, &theirs.iter().map(Some).collect::<Vec<_>>())
}

fn agreement_with(scorer: &Scorer, mine: &[String], theirs: &[Option<&String>]) -> Option<report::Agreement> {
    let agree: Vec<CaseScore> =
        mine.iter().zip(theirs).filter_map(|(m, t)| t.and_then(|t| scorer.agree(m, t))).collect();
    (!agree.is_empty()).then(|| report::Agreement {
        cases: agree.len(),
        field_accuracy: field_accuracy(&agree),
        exact: exact_rate(&agree),
    })
}

/// A context that holds the longest prompt plus `max_tokens`, within the
/// model's own; an error names the case that cannot fit.
fn context_for(
    model: &LoadedModel,
    convos: &[Vec<minnow_engine::chat::ChatMessage>],
    max_tokens: usize,
) -> Result<usize> {
    let train = model.model.config().context_length;
    let mut longest = 0;
    for c in convos {
        longest = longest.max(model.chat_prompt(c)?.len());
    }
    let need = longest + max_tokens;
    if need > train {
        bail!("the longest prompt ({longest} tokens) plus --max-tokens {max_tokens} exceeds the model's context of {train}");
    }
    Ok(need.next_multiple_of(256).min(train))
}

/// Single-stream prefill and decode tok/s on `convo`'s prompt: best of two.
fn measure_speed(
    model: &LoadedModel,
    pool: &ThreadPool,
    convo: &[minnow_engine::chat::ChatMessage],
    ctx: usize,
) -> Result<(f64, f64)> {
    let prompt = model.chat_prompt(convo)?;
    let params = GenerateParams {
        max_tokens: SPEED_TOKENS,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        // A fixed number of decoded tokens, whatever the model would say.
        stop_at_eog: false,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    };
    let (mut prefill, mut decode) = (0.0f64, 0.0f64);
    for _ in 0..2 {
        let mut cache = model.model.new_cache(ctx.max(prompt.len() + SPEED_TOKENS));
        let g = generate(&model.model, &model.tokenizer, pool, &mut cache, &prompt, &params, |_| {})
            .map_err(|e| anyhow!("speed run: {e}"))?;
        prefill = prefill.max(g.prompt_tps());
        decode = decode.max(g.gen_tps());
    }
    Ok((prefill, decode))
}

fn field_accuracy(s: &[CaseScore]) -> f64 {
    let total: usize = s.iter().map(|c| c.total).sum();
    if total == 0 {
        return 0.0;
    }
    s.iter().map(|c| c.right).sum::<usize>() as f64 / total as f64
}

fn exact_rate(s: &[CaseScore]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    s.iter().filter(|c| c.exact()).count() as f64 / s.len() as f64
}

/// A file name from a row label.
pub fn slug(label: &str) -> String {
    let s: String = label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-")
}

fn write_outputs(
    dir: &Path,
    label: &str,
    cases: &[EvalCase],
    answers: &[crate::teacher::Answer],
    scorer: &Scorer,
) -> Result<()> {
    let path = dir.join("outputs").join(format!("{}.jsonl", slug(label)));
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for (c, a) in cases.iter().zip(answers) {
        let s = scorer.score(&a.text, &c.answer_value());
        let line = json!({
            "id": c.id, "prompt": c.last_user(), "gold": c.answer_value(), "reply": a.text,
            "right": s.right, "total": s.total, "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens, "finish_reason": a.finish_reason,
        });
        writeln!(f, "{line}")?;
    }
    f.flush()?;
    Ok(())
}

fn bar(progress: bool, n: usize, label: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(n as u64);
    if let Ok(s) = ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} {per_sec} ETA {eta}") {
        b.set_style(s);
    }
    b.set_message(label.to_string());
    b
}

/// The CPU model and thread count, for the report.
fn machine(threads: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // Speeds on a shared machine depend on what else runs: say how busy it was.
    let load =
        std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().map(str::to_string));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    match load {
        Some(l) => format!("{cpu}, {cores} CPUs, {threads} threads, load average {l} when the evaluation started"),
        None => format!("{cpu}, {cores} CPUs, {threads} threads"),
    }
}
