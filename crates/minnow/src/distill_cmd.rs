//! `minnow distill`: label, synth, train, eval, run — thin commands over
//! `minnow_distill` (argument parsing, model names resolved to files, the
//! one-line summaries printed at the end).

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use minnow_distill::data::read_eval_cases;
use minnow_distill::teacher::{GenSettings, LocalModel, RemoteConfig, RemoteTeacher, Teacher, VocabMap};
use minnow_models as models;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct DistillArgs {
    #[command(subcommand)]
    command: DistillCommand,
}

#[derive(Subcommand)]
enum DistillCommand {
    /// A teacher answers every input of a JSONL file: a chat fine-tuning
    /// dataset. Kill it at any time; the same command continues.
    Label(LabelArgs),
    /// The teacher writes new inputs from a task description and seeds
    /// (near-duplicates and refusals removed). Resumable like label.
    Synth(SynthArgs),
    /// Fine-tune a student GGUF on a dataset (full or LoRA) and write a GGUF.
    Train(crate::distill_train::TrainArgs),
    /// Score models on cases with gold answers; quality, speed and cost
    /// report (Markdown, JSON, SVG chart).
    Eval(EvalArgs),
    /// The whole pipeline from one TOML file: label (or synth + label),
    /// train, eval; each stage skipped when its outputs are complete.
    Run(RunArgs),
    /// Write a dataset (any format minnow reads, or a store) as OpenAI
    /// chat, ShareGPT or Alpaca JSONL.
    Export(ExportArgs),
}

/// Where data comes from, in the forms every data argument takes.
pub(crate) const DATA_HELP: &str = "a JSONL file (OpenAI chat, ShareGPT, Alpaca or prompt/completion, detected) \
    or store:DIR[?metadata.KEY=VALUE&model=NAME] (the completions `minnow serve --store DIR` kept)";

/// The data of a command that takes it as a positional argument or as `--data`.
fn data_arg(positional: Option<PathBuf>, flag: Option<PathBuf>, what: &str) -> Result<PathBuf> {
    match (positional, flag) {
        (Some(p), None) | (None, Some(p)) => Ok(p),
        (Some(_), Some(_)) => bail!("give the {what} once: as an argument or as --data"),
        (None, None) => bail!("give the {what}: a file, or --data store:DIR"),
    }
}

#[derive(Args)]
struct ExportArgs {
    /// The data to export: a file or store:DIR?... (see `distill train --help`).
    data: PathBuf,
    /// Where the JSONL goes (written whole, then renamed into place).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// openai, sharegpt or alpaca.
    #[arg(long, default_value = "openai")]
    format: String,
}

fn export(a: ExportArgs) -> Result<()> {
    let format = minnow_distill::formats::Format::parse(&a.format)?;
    let loaded = minnow_distill::formats::load(&a.data)?;
    minnow_distill::formats::write(&loaded.records, format, &a.output)?;
    eprintln!(
        "minnow distill export: {} conversations ({}{}) written to {} as {}",
        loaded.records.len(),
        loaded.format,
        if loaded.skipped_truncated > 0 {
            format!("; {} stored answers cut at max_tokens left out", loaded.skipped_truncated)
        } else {
            String::new()
        },
        a.output.display(),
        format.name()
    );
    Ok(())
}

/// Who the teacher is and how it runs.
#[derive(Args, Clone)]
pub struct TeacherArgs {
    /// The teacher: a GGUF file or a test model's short name, run locally.
    #[arg(long, conflicts_with_all = ["teacher_url", "teacher_urls"], required_unless_present_any = ["teacher_url", "teacher_urls"])]
    teacher: Option<String>,
    /// An OpenAI-compatible server instead (a root URL, its /v1, or the
    /// full /v1/chat/completions URL). Repeat it for a fleet: requests are
    /// spread over the endpoints, each with --concurrency in flight; one
    /// that fails is benched and retried later while the others go on.
    #[arg(long)]
    teacher_url: Vec<String>,
    /// A fleet's endpoints from a file: `URL [CONCURRENCY]` per line
    /// (`#` comments), added to any --teacher-url.
    #[arg(long, value_name = "FILE")]
    teacher_urls: Option<PathBuf>,
    /// The `model` sent to --teacher-url.
    #[arg(long)]
    model: Option<String>,
    /// API key for --teacher-url (default: $OPENAI_API_KEY, then $MINNOW_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests in flight at once (remote).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds one request may take, connect to last byte (remote).
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Retries per request on 429, 5xx and connection errors (remote).
    #[arg(long, default_value_t = 6)]
    retries: u32,
    /// First retry delay in seconds, doubled per retry (remote; a
    /// Retry-After header takes precedence).
    #[arg(long, default_value_t = 0.5)]
    backoff: f64,
    /// Requests started per minute at most (remote).
    #[arg(long)]
    rpm: Option<f64>,
    /// The remote teacher's GGUF (or short name), for its vocabulary:
    /// needed with --logprobs to store token ids.
    #[arg(long)]
    teacher_vocab: Option<String>,
    /// Sequences decoded together (local).
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Context per sequence in tokens (local).
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// Compute threads (local; default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
}

impl TeacherArgs {
    fn build(&self) -> Result<Box<dyn Teacher>> {
        if let Some(t) = &self.teacher {
            let path = models::resolve(t)?;
            return Ok(Box::new(LocalModel::load(&path, threads(self.threads)?, self.parallel, self.ctx)?));
        }
        let mut urls: Vec<(String, Option<usize>)> = self.teacher_url.iter().map(|u| (u.clone(), None)).collect();
        if let Some(f) = &self.teacher_urls {
            urls.extend(minnow_distill::fleet::read_urls(f)?);
        }
        if urls.is_empty() {
            bail!("give --teacher MODEL or --teacher-url URL");
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !positive(self.timeout) || !non_negative(self.backoff) {
            bail!("--timeout must be positive and --backoff non-negative (seconds)");
        }
        let api_key = self
            .api_key
            .clone()
            .or_else(|| std::env::var("OPENAI_API_KEY").ok())
            .or_else(|| std::env::var("MINNOW_API_KEY").ok())
            .filter(|k| !k.is_empty());
        let cfg = |url: &str, concurrency: Option<usize>| RemoteConfig {
            model: self.model.clone(),
            api_key: api_key.clone(),
            concurrency: concurrency.unwrap_or(self.concurrency),
            timeout: Duration::from_secs_f64(self.timeout),
            max_retries: self.retries,
            backoff: Duration::from_secs_f64(self.backoff),
            requests_per_minute: self.rpm,
            ..RemoteConfig::new(url)
        };
        let vocab = match &self.teacher_vocab {
            Some(v) => {
                let file = minnow_gguf::GgufFile::open(models::resolve(v)?)?;
                let tok = minnow_engine::tokenizer::Tokenizer::from_gguf(&file).map_err(|e| anyhow!("{v}: {e}"))?;
                Some(VocabMap::from_tokenizer(&tok))
            }
            None => None,
        };
        if let [(url, concurrency)] = &urls[..] {
            return Ok(Box::new(RemoteTeacher::new(cfg(url, *concurrency), vocab)?));
        }
        let endpoints =
            urls.iter().map(|(url, c)| RemoteTeacher::new(cfg(url, *c), vocab.clone())).collect::<Result<Vec<_>>>()?;
        Ok(Box::new(minnow_distill::fleet::Fleet::new(endpoints)?))
    }
}

fn threads(t: Option<usize>) -> Result<usize> {
    match t {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    }
}

/// Generation settings shared by label and synth.
#[derive(Args, Clone)]
pub struct GenArgs {
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the teacher's top-K log-probabilities per answer token (K ≤ 20).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Answers must be JSON valid against the JSON Schema in this file
    /// (structured output; a remote teacher gets it as `response_format`).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
}

impl GenArgs {
    fn settings(&self) -> Result<GenSettings> {
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a non-negative number");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        if let Some(k) = self.logprobs {
            if !(1..=20).contains(&k) {
                bail!("--logprobs must be between 1 and 20");
            }
        }
        Ok(GenSettings {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            logprobs: self.logprobs,
            json_schema: self.json_schema.as_deref().map(minnow_distill::pipeline::read_schema).transpose()?,
        })
    }
}

#[derive(Args)]
struct LabelArgs {
    /// Inputs: JSONL of {"id"?, "prompt" | "messages"}, or any data the
    /// other commands read (each conversation answered again).
    inputs: Option<PathBuf>,
    /// The inputs as `--data` (e.g. store:DIR?metadata.task=orders to
    /// re-answer stored prompts with this teacher).
    #[arg(long, help = DATA_HELP)]
    data: Option<PathBuf>,
    /// The dataset (JSONL, appended to; rerun to continue).
    #[arg(long, short = 'o')]
    output: PathBuf,
    #[command(flatten)]
    teacher: TeacherArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// Worked examples: JSONL of {"prompt" | "messages", "answer"}.
    #[arg(long)]
    examples: Option<PathBuf>,
    /// How many of --examples to show (the first N).
    #[arg(long, default_value_t = 3)]
    n_examples: usize,
    /// A system message for every conversation (kept in the dataset).
    #[arg(long)]
    system: Option<String>,
    /// Label only the first N inputs.
    #[arg(long)]
    limit: Option<usize>,
    /// Machine price in USD per hour, for the cost estimate.
    #[arg(long)]
    price_per_hour: Option<f64>,
}

fn label(a: LabelArgs) -> Result<()> {
    let inputs = data_arg(a.inputs, a.data, "inputs")?;
    // Bad input is reported before minutes go into loading a teacher.
    minnow_distill::data::read_inputs(&inputs)?;
    let examples = match &a.examples {
        Some(p) => {
            let mut ex = read_eval_cases(p)?;
            if ex.len() < a.n_examples {
                bail!("--examples {} has {} cases, fewer than --n-examples {}", p.display(), ex.len(), a.n_examples);
            }
            ex.truncate(a.n_examples);
            ex
        }
        None => Vec::new(),
    };
    check_price(a.price_per_hour)?;
    let cfg = minnow_distill::label::LabelConfig {
        inputs,
        output: a.output,
        examples,
        system: a.system,
        settings: a.gen.settings()?,
        limit: a.limit,
        price_per_hour: a.price_per_hour,
        progress: std::io::stderr().is_terminal(),
    };
    let teacher = a.teacher.build()?;
    let sum = minnow_distill::label::label(&cfg, teacher.as_ref())?;
    eprintln!("minnow distill label: {}", minnow_distill::label::describe(&sum, &cfg.output));
    minnow_distill::label::check_failures(&sum)
}

fn check_price(p: Option<f64>) -> Result<()> {
    match p {
        Some(p) if !(p.is_finite() && p >= 0.0) => bail!("--price-per-hour must be a non-negative number of USD"),
        _ => Ok(()),
    }
}

#[derive(Args)]
struct SynthArgs {
    /// What the inputs are for, in a sentence or two.
    #[arg(long)]
    task: String,
    /// Seed inputs: JSONL of {"prompt" | "messages"}.
    #[arg(long)]
    seeds: PathBuf,
    /// New inputs (JSONL of {"id", "prompt"}; appended to, rerun to continue).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// How many new inputs to end with.
    #[arg(long)]
    count: usize,
    #[command(flatten)]
    teacher: TeacherArgs,
    #[command(flatten)]
    gen: SynthGenArgs,
    /// Seeds shown per request (sampled).
    #[arg(long, default_value_t = 3)]
    seeds_per_request: usize,
    /// Shortest and longest accepted input, in characters.
    #[arg(long, default_value_t = 20)]
    min_chars: usize,
    #[arg(long, default_value_t = 2000)]
    max_chars: usize,
    /// Drop an input whose word-shingle Jaccard similarity to any kept
    /// input or seed is at least this.
    #[arg(long, default_value_t = 0.7)]
    max_similarity: f64,
}

#[derive(Args, Clone)]
struct SynthGenArgs {
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Sampling temperature (varied inputs need > 0).
    #[arg(long, default_value_t = 0.9)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn synth(a: SynthArgs) -> Result<()> {
    let cfg = minnow_distill::synth::SynthConfig {
        task: a.task,
        seeds: a.seeds,
        output: a.output,
        count: a.count,
        seeds_per_request: a.seeds_per_request,
        settings: GenSettings {
            max_tokens: a.gen.max_tokens,
            temperature: a.gen.temperature,
            top_p: a.gen.top_p,
            seed: a.gen.seed,
            logprobs: None,
            json_schema: None,
        },
        filters: minnow_distill::synth::Filters {
            min_chars: a.min_chars,
            max_chars: a.max_chars,
            max_similarity: a.max_similarity,
        },
        progress: std::io::stderr().is_terminal(),
    };
    let teacher = a.teacher.build()?;
    let sum = minnow_distill::synth::synth(&cfg, teacher.as_ref())?;
    eprintln!("minnow distill synth: {}", minnow_distill::synth::describe(&sum, &cfg.output));
    Ok(())
}

#[derive(Args)]
struct EvalArgs {
    /// Cases with gold answers: JSONL of {"prompt" | "messages", "answer"},
    /// or conversations whose last (assistant) message is the answer.
    cases: Option<PathBuf>,
    /// The cases as `--data`.
    #[arg(long, help = DATA_HELP)]
    data: Option<PathBuf>,
    /// A model answered zero-shot (repeatable): a GGUF, a short name, or
    /// LABEL=MODEL to name its row.
    #[arg(long = "model")]
    models: Vec<String>,
    /// A model answered with the --few-shot examples in its prompt (repeatable).
    #[arg(long = "model-few-shot")]
    few_shot_models: Vec<String>,
    /// Worked examples (JSONL with answers); the first --n-shot are used,
    /// and cases equal to them are left out of the evaluation.
    #[arg(long)]
    few_shot: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    n_shot: usize,
    /// exact, json-fields or regex:PATTERN.
    #[arg(long, default_value = "json-fields")]
    scorer: String,
    /// The teacher's dataset: agreement of every model with its answers.
    #[arg(long)]
    teacher_outputs: Option<PathBuf>,
    /// Agreement with the answers of this row (a row label, e.g. the
    /// teacher with worked examples) where --teacher-outputs has none.
    #[arg(long)]
    agree_with: Option<String>,
    /// Machine price in USD per hour, for cost per token and per case.
    #[arg(long, default_value_t = 1.0)]
    price_per_hour: f64,
    /// Evaluate only the first N cases.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Report directory (report.md, report.json, chart.svg, outputs).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// A JSON Schema file: every row runs a second time with its answers
    /// constrained to it (a row pair per model).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Instead of evaluating: merge these report.json files (same cases,
    /// rows evaluated separately) into one report in --output.
    #[arg(long, conflicts_with_all = ["models", "few_shot_models"])]
    merge: Vec<PathBuf>,
}

/// `LABEL=MODEL` or `MODEL` (a path that exists wins over a split at `=`).
fn model_spec(s: &str, few_shot: bool) -> Result<minnow_distill::eval::ModelSpec> {
    let (label, model) = match s.split_once('=') {
        Some((l, m)) if !Path::new(s).exists() && !l.is_empty() => (Some(l.to_string()), m),
        _ => (None, s),
    };
    let path = models::resolve(model)?;
    Ok(minnow_distill::eval::ModelSpec::new(label, path, few_shot))
}

fn eval(a: EvalArgs) -> Result<()> {
    if !a.merge.is_empty() {
        let report = minnow_distill::report::merge(&a.merge)?;
        minnow_distill::report::write(&report, &a.output)?;
        print!("{}", minnow_distill::report::summary_table(&report));
        eprintln!("minnow distill eval: merged report in {}", a.output.display());
        return Ok(());
    }
    if a.models.is_empty() && a.few_shot_models.is_empty() {
        bail!("give at least one --model (or --model-few-shot)");
    }
    if !a.few_shot_models.is_empty() && a.few_shot.is_none() {
        bail!("--model-few-shot needs --few-shot FILE (the worked examples)");
    }
    check_price(Some(a.price_per_hour))?;
    let mut specs = Vec::new();
    for m in &a.models {
        specs.push(model_spec(m, false)?);
    }
    for m in &a.few_shot_models {
        specs.push(model_spec(m, true)?);
    }
    let cfg = minnow_distill::eval::EvalConfig {
        data: data_arg(a.cases, a.data, "cases")?,
        models: specs,
        few_shot: a.few_shot,
        n_shot: a.n_shot,
        scorer: minnow_distill::score::Scorer::parse(&a.scorer)?,
        teacher_outputs: a.teacher_outputs,
        agree_with: a.agree_with,
        price_per_hour: a.price_per_hour,
        limit: a.limit,
        max_tokens: a.max_tokens,
        parallel: a.parallel,
        threads: threads(a.threads)?,
        output: a.output,
        progress: std::io::stderr().is_terminal(),
        json_schema: a.json_schema.as_deref().map(minnow_distill::pipeline::read_schema).transpose()?,
    };
    let report = minnow_distill::eval::run(&cfg)?;
    print!("{}", minnow_distill::report::summary_table(&report));
    eprintln!("minnow distill eval: report in {}", cfg.output.display());
    Ok(())
}

#[derive(Args)]
struct RunArgs {
    /// The pipeline's TOML file (see examples/order-extraction/pipeline.toml).
    config: PathBuf,
}

fn run(a: RunArgs) -> Result<()> {
    minnow_distill::pipeline::run(&a.config, &|m: &str| models::resolve(m))
}

pub fn main(a: DistillArgs) -> Result<()> {
    match a.command {
        DistillCommand::Label(a) => label(a),
        DistillCommand::Synth(a) => synth(a),
        DistillCommand::Train(t) => crate::distill_train::main(t),
        DistillCommand::Eval(a) => eval(a),
        DistillCommand::Run(a) => run(a),
        DistillCommand::Export(a) => export(a),
    }
}
