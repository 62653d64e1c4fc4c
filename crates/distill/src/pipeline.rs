//! `minnow distill run CONFIG.toml`: synth (optional) → label → train →
//! eval from one file, resumable as a whole.
//!
//! Each stage is skipped when its outputs are complete (synth: `count`
//! inputs; label: every wanted input labeled; train: the student GGUF
//! exists — the trainer writes it last, atomically, and resumes from its
//! own checkpoints; eval: `report.json` exists), so after a crash the same
//! command starts where it stopped. Relative paths are relative to the
//! config file's directory; outputs go under `work_dir`.
//!
//! ```toml
//! work_dir = "work"
//! [label]                # inputs, teacher | teacher_url, examples, n_examples, limit, ...
//! [synth]                # optional: task, seeds, count (label's inputs then default to its output)
//! [train]                # any `minnow distill train` setting (TrainConfig); student is required;
//!                        # `data` (a file or "store:DIR?metadata.KEY=VALUE") instead of [label]
//! [eval]                 # data, models, few_shot_models, few_shot, n_shot, scorer, price_per_hour, ...
//! ```

use crate::data::{read_inputs, DatasetRecord, InputRecord, RecordLog};
use crate::eval::{EvalConfig, ModelSpec};
use crate::label::LabelConfig;
use crate::score::Scorer;
use crate::synth::{Filters, SynthConfig};
use crate::teacher::{GenSettings, LocalModel, RemoteConfig, RemoteTeacher, Teacher};
use crate::train::TrainConfig;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Resolves a model argument (a path or a known short name) to a file.
pub type Resolver<'a> = &'a dyn Fn(&str) -> Result<PathBuf>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_work_dir")]
    work_dir: PathBuf,
    #[serde(default)]
    synth: Option<SynthSection>,
    /// Optional when `[train]` names its own `data` (a file or a store).
    #[serde(default)]
    label: Option<LabelSection>,
    #[serde(default)]
    train: Option<toml::Table>,
    #[serde(default)]
    eval: Option<EvalSection>,
}

fn default_work_dir() -> PathBuf {
    PathBuf::from("work")
}

/// Where the teacher runs (shared by synth and label).
#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct TeacherSection {
    teacher: Option<String>,
    teacher_url: Option<String>,
    model: Option<String>,
    /// Name of an environment variable holding the API key (keys do not
    /// belong in config files).
    api_key_env: Option<String>,
    concurrency: Option<usize>,
    timeout: Option<f64>,
    retries: Option<u32>,
    rpm: Option<f64>,
    parallel: Option<usize>,
    ctx: Option<usize>,
    threads: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelSection {
    inputs: Option<PathBuf>,
    #[serde(default = "default_dataset")]
    output: PathBuf,
    examples: Option<PathBuf>,
    #[serde(default = "three")]
    n_examples: usize,
    system: Option<String>,
    limit: Option<usize>,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default)]
    seed: u64,
    logprobs: Option<usize>,
    price_per_hour: Option<f64>,
    /// A JSON Schema file the teacher's answers must be valid against.
    json_schema: Option<PathBuf>,
    #[serde(flatten)]
    teacher: TeacherSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SynthSection {
    task: String,
    seeds: PathBuf,
    count: usize,
    #[serde(default = "default_synth_output")]
    output: PathBuf,
    #[serde(default = "three")]
    seeds_per_request: usize,
    #[serde(default = "default_synth_temperature")]
    temperature: f32,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default = "default_max_similarity")]
    max_similarity: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalSection {
    data: PathBuf,
    /// Rows answered zero-shot: `MODEL` or `LABEL=MODEL`; the string
    /// `student` means the trained student.
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    few_shot_models: Vec<String>,
    few_shot: Option<PathBuf>,
    #[serde(default = "three")]
    n_shot: usize,
    #[serde(default = "default_scorer")]
    scorer: String,
    #[serde(default = "one_dollar")]
    price_per_hour: f64,
    limit: Option<usize>,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default = "eight")]
    parallel: usize,
    threads: Option<usize>,
    /// A JSON Schema file: every row runs a second time with its answers
    /// constrained to it.
    json_schema: Option<PathBuf>,
    /// Compare every row with the teacher's labels (the dataset), for the
    /// cases whose prompt the dataset has.
    #[serde(default = "yes")]
    teacher_agreement: bool,
    /// Or with the answers of this row (e.g. the teacher with examples).
    agree_with: Option<String>,
    #[serde(default = "default_report")]
    output: PathBuf,
}

fn default_dataset() -> PathBuf {
    "dataset.jsonl".into()
}
fn default_synth_output() -> PathBuf {
    "synth_inputs.jsonl".into()
}
fn default_report() -> PathBuf {
    "report".into()
}
fn default_scorer() -> String {
    "json-fields".into()
}
fn default_max_tokens() -> usize {
    256
}
fn default_synth_temperature() -> f32 {
    0.9
}
fn default_max_similarity() -> f64 {
    0.7
}
fn three() -> usize {
    3
}
fn eight() -> usize {
    8
}
fn one_dollar() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// Paths in the config are relative to its directory; outputs to `work`.
struct Paths {
    base: PathBuf,
    work: PathBuf,
}

impl Paths {
    fn input(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
    /// A data argument: a file as [`input`](Self::input), or
    /// `store:DIR?…` with a relative DIR taken from the config's directory.
    fn data(&self, p: &Path) -> PathBuf {
        match p.to_str().and_then(|s| s.strip_prefix("store:")) {
            Some(rest) if !Path::new(rest.split('?').next().unwrap_or("")).is_absolute() => {
                PathBuf::from(format!("store:{}", self.base.join(rest).display()))
            }
            Some(_) => p.to_path_buf(),
            None => self.input(p),
        }
    }
    fn output(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.work.join(p)
        }
    }
    /// A model name stays a name unless a file of that name exists here.
    fn model(&self, m: &str, resolve: Resolver) -> Result<PathBuf> {
        let local = self.base.join(m);
        resolve(if local.is_file() { local.to_str().unwrap_or(m) } else { m })
    }
}

/// Runs the pipeline described by `config_path`.
pub fn run(config_path: &Path, resolve: Resolver) -> Result<()> {
    let text =
        std::fs::read_to_string(config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let cfg: Config = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", config_path.display(), e.to_string().lines().collect::<Vec<_>>().join(" ")))?;
    let base = config_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let paths =
        Paths { work: if cfg.work_dir.is_absolute() { cfg.work_dir.clone() } else { base.join(&cfg.work_dir) }, base };
    std::fs::create_dir_all(&paths.work).with_context(|| format!("cannot create {}", paths.work.display()))?;
    let t_all = Instant::now();

    // `[train] data = "…"` (a file, or the server's store) trains on that;
    // otherwise the label stage makes the dataset.
    let train_data = cfg.train.as_ref().and_then(|t| t.get("data")).and_then(|v| v.as_str()).map(PathBuf::from);
    let dataset = match (&train_data, &cfg.label) {
        (Some(d), _) => paths.data(d),
        (None, Some(label)) => {
            let label_inputs = match (&cfg.synth, &label.inputs) {
                (Some(s), _) => stage("synth", || run_synth(s, &label.teacher, &paths, resolve))?,
                (None, Some(i)) => paths.data(i),
                (None, None) => bail!("{}: [label] needs `inputs` (or add a [synth] section)", config_path.display()),
            };
            stage("label", || run_label(label, &label_inputs, &paths, resolve))?
        }
        (None, None) => bail!("{}: give a [label] section, or `data` in [train]", config_path.display()),
    };
    let student = match &cfg.train {
        Some(t) => Some(stage("train", || run_train(t, &dataset, &paths, resolve))?),
        None => None,
    };
    if let Some(e) = &cfg.eval {
        stage("eval", || run_eval(e, student.as_deref(), &dataset, &paths, resolve))?;
    }
    eprintln!(
        "minnow distill run: done in {:.1} s; everything is under {}",
        t_all.elapsed().as_secs_f64(),
        paths.work.display()
    );
    Ok(())
}

/// Runs one stage, timing it and naming it in errors.
fn stage<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = Instant::now();
    let out = f().with_context(|| format!("stage {name}"))?;
    eprintln!("minnow distill run: stage {name} finished in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(out)
}

fn build_teacher(t: &TeacherSection, paths: &Paths, resolve: Resolver) -> Result<Box<dyn Teacher>> {
    match (&t.teacher, &t.teacher_url) {
        (Some(m), None) => {
            let path = paths.model(m, resolve)?;
            let threads =
                t.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            Ok(Box::new(LocalModel::load(&path, threads, t.parallel.unwrap_or(8), t.ctx.unwrap_or(2048))?))
        }
        (None, Some(url)) => {
            let api_key = match &t.api_key_env {
                Some(var) => Some(std::env::var(var).map_err(|_| anyhow!("api_key_env: ${var} is not set"))?),
                None => std::env::var("OPENAI_API_KEY").ok(),
            };
            let d = RemoteConfig::new(url);
            let cfg = RemoteConfig {
                model: t.model.clone(),
                api_key: api_key.filter(|k| !k.is_empty()),
                concurrency: t.concurrency.unwrap_or(d.concurrency),
                timeout: t.timeout.map_or(d.timeout, Duration::from_secs_f64),
                max_retries: t.retries.unwrap_or(d.max_retries),
                requests_per_minute: t.rpm,
                ..d
            };
            Ok(Box::new(RemoteTeacher::new(cfg, None)?))
        }
        _ => bail!("give exactly one of `teacher` (a local GGUF) and `teacher_url`"),
    }
}

fn run_synth(s: &SynthSection, t: &TeacherSection, paths: &Paths, resolve: Resolver) -> Result<PathBuf> {
    let output = paths.output(&s.output);
    if output.exists() && RecordLog::<InputRecord>::open(&output)?.0.len() >= s.count {
        eprintln!("minnow distill run: synth: complete, skipped ({})", output.display());
        return Ok(output);
    }
    let cfg = SynthConfig {
        task: s.task.clone(),
        seeds: paths.input(&s.seeds),
        output: output.clone(),
        count: s.count,
        seeds_per_request: s.seeds_per_request,
        settings: GenSettings {
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            top_p: 0.95,
            seed: s.seed,
            logprobs: None,
            json_schema: None,
        },
        filters: Filters { min_chars: 20, max_chars: 2000, max_similarity: s.max_similarity },
        progress: std::io::stderr().is_terminal(),
    };
    let teacher = build_teacher(t, paths, resolve)?;
    let sum = crate::synth::synth(&cfg, teacher.as_ref())?;
    eprintln!("minnow distill run: synth: {}", crate::synth::describe(&sum, &output));
    Ok(output)
}

fn run_label(l: &LabelSection, inputs: &Path, paths: &Paths, resolve: Resolver) -> Result<PathBuf> {
    let output = paths.output(&l.output);
    let mut wanted = read_inputs(inputs)?;
    if let Some(n) = l.limit {
        wanted.truncate(n);
    }
    if output.exists() {
        let (log, _) = RecordLog::<DatasetRecord>::open(&output)?;
        if wanted.iter().all(|i| log.contains(&i.id)) {
            eprintln!("minnow distill run: label: complete, skipped ({})", output.display());
            return Ok(output);
        }
    }
    let examples = match &l.examples {
        Some(p) => {
            let mut ex = crate::data::read_eval_cases(&paths.input(p))?;
            if ex.len() < l.n_examples {
                bail!("[label] examples has {} cases, fewer than n_examples = {}", ex.len(), l.n_examples);
            }
            ex.truncate(l.n_examples);
            ex
        }
        None => Vec::new(),
    };
    let cfg = LabelConfig {
        inputs: inputs.to_path_buf(),
        output: output.clone(),
        examples,
        system: l.system.clone(),
        settings: GenSettings {
            max_tokens: l.max_tokens,
            temperature: l.temperature,
            top_p: 1.0,
            seed: l.seed,
            logprobs: l.logprobs,
            json_schema: l.json_schema.as_ref().map(|p| read_schema(&paths.input(p))).transpose()?,
        },
        limit: l.limit,
        price_per_hour: l.price_per_hour,
        progress: std::io::stderr().is_terminal(),
    };
    let teacher = build_teacher(&l.teacher, paths, resolve)?;
    let sum = crate::label::label(&cfg, teacher.as_ref())?;
    eprintln!("minnow distill run: label: {}", crate::label::describe(&sum, &output));
    crate::label::check_failures(&sum)?;
    Ok(output)
}

fn run_train(t: &toml::Table, dataset: &Path, paths: &Paths, resolve: Resolver) -> Result<PathBuf> {
    let mut table = t.clone();
    let student = table
        .remove("student")
        .and_then(|v| v.as_str().map(str::to_string))
        .ok_or_else(|| anyhow!("[train] needs `student` (a GGUF or a model name)"))?;
    let output =
        table.remove("output").and_then(|v| v.as_str().map(PathBuf::from)).unwrap_or_else(|| "student.gguf".into());
    let checkpoints = table
        .remove("checkpoint_dir")
        .and_then(|v| v.as_str().map(PathBuf::from))
        .unwrap_or_else(|| "checkpoints".into());
    let mut cfg: TrainConfig = table.try_into().map_err(|e: toml::de::Error| anyhow!("[train]: {}", e.message()))?;
    cfg.student = paths.model(&student, resolve)?;
    cfg.data = dataset.to_path_buf();
    cfg.output = paths.output(&output);
    cfg.checkpoint_dir = Some(paths.output(&checkpoints));
    cfg.progress = std::io::stderr().is_terminal();
    if cfg.output.exists() {
        eprintln!("minnow distill run: train: complete, skipped ({})", cfg.output.display());
        return Ok(cfg.output);
    }
    let report = crate::train::train(&cfg)?;
    eprintln!(
        "minnow distill run: train: {} steps, validation loss {:?} -> {:?}; student in {}",
        report.steps,
        report.initial_val_loss,
        report.final_val_loss,
        cfg.output.display()
    );
    Ok(cfg.output)
}

fn run_eval(e: &EvalSection, student: Option<&Path>, dataset: &Path, paths: &Paths, resolve: Resolver) -> Result<()> {
    let output = paths.output(&e.output);
    if output.join("report.json").exists() {
        eprintln!("minnow distill run: eval: complete, skipped ({})", output.join("report.md").display());
        return Ok(());
    }
    let spec = |s: &str, few_shot: bool| -> Result<ModelSpec> {
        let (label, model) = match s.split_once('=') {
            Some((l, m)) if !l.is_empty() => (Some(l.to_string()), m),
            _ => (None, s),
        };
        let path = if model == "student" {
            student.ok_or_else(|| anyhow!("[eval] names `student` but there is no [train] section"))?.to_path_buf()
        } else {
            paths.model(model, resolve)?
        };
        Ok(ModelSpec::new(label, path, few_shot))
    };
    let mut models = Vec::new();
    for m in &e.models {
        models.push(spec(m, false)?);
    }
    for m in &e.few_shot_models {
        models.push(spec(m, true)?);
    }
    if models.is_empty() {
        bail!("[eval] needs `models` (or `few_shot_models`)");
    }
    let cfg = EvalConfig {
        data: paths.data(&e.data),
        models,
        few_shot: e.few_shot.as_ref().map(|p| paths.input(p)),
        n_shot: e.n_shot,
        scorer: Scorer::parse(&e.scorer)?,
        teacher_outputs: e.teacher_agreement.then(|| dataset.to_path_buf()),
        agree_with: e.agree_with.clone(),
        price_per_hour: e.price_per_hour,
        limit: e.limit,
        max_tokens: e.max_tokens,
        parallel: e.parallel,
        threads: e.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        output: output.clone(),
        progress: std::io::stderr().is_terminal(),
        json_schema: e.json_schema.as_ref().map(|p| read_schema(&paths.input(p))).transpose()?,
    };
    let report = crate::eval::run(&cfg)?;
    eprint!("{}", crate::report::summary_table(&report));
    eprintln!("minnow distill run: eval: report in {}", output.join("report.md").display());
    Ok(())
}

/// A JSON Schema file, parsed.
pub fn read_schema(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the JSON Schema {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}
