//! Command-line parsing and the commands themselves.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use minnow_engine::chat::ChatMessage;
use minnow_engine::generate::{generate, prefill, GenerateParams, Generation};
use minnow_engine::kv_cache::{CacheTypes, KvCache, KvType};
use minnow_engine::loader::LoadedModel;
use minnow_engine::model::Logits;
use minnow_engine::sampler::SamplingParams;
use minnow_kernels::ops::{argmax, log_softmax};
use minnow_kernels::pool::ThreadPool;
use minnow_models as models;
use serde_json::json;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "minnow", version, about = "Small, fast, cheap language models: run GGUF models on CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it, then a speed summary.
    Run(RunArgs),
    /// Interactive multi-turn chat using the model's chat template.
    Chat(ChatArgs),
    /// Architecture, parameters, quantization mix, context, memory needed.
    Info(InfoArgs),
    /// Token ids of the text read from stdin.
    Tokenize(TokenizeArgs),
    /// Top-K logits after every prompt position.
    Logits(LogitsArgs),
    /// Per-token log-probabilities of a text file and its mean NLL.
    Perplexity(PerplexityArgs),
    /// Prompt-processing and generation speed, like llama-bench.
    Bench(BenchArgs),
    /// Make a mixture-of-experts model from a dense one (sparse upcycling):
    /// every expert a copy of the dense FFN, computing the dense function.
    Upcycle(UpcycleArgs),
    /// Re-encode a model in another block format (llama.cpp's `_M` mixes):
    /// F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_0.
    Quantize(QuantizeArgs),
    /// Importance matrix of a model on your own data (llama.cpp's GGUF
    /// imatrix format), for `quantize --imatrix` or `llama-quantize --imatrix`.
    Imatrix(ImatrixArgs),
    /// Download and verify a model: a Hugging Face Hub name
    /// (hf.co/USER/REPO or hf.co/USER/REPO:QUANT), a test model's short name, or "all".
    Pull(PullArgs),
    /// Models cached on this machine: name, size, quantization, file.
    #[command(visible_alias = "ls")]
    List,
    /// Remove a cached model (hf.co/USER/REPO:QUANT, a whole hf.co/USER/REPO,
    /// or a test model's short name).
    Rm(RmArgs),
    /// OpenAI-compatible HTTP server with continuous batching (and a chat page at /).
    Serve(ServeArgs),
    /// Distillation: a teacher labels data, a student trains on it, eval proves it.
    Distill(crate::distill_cmd::DistillArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// A GGUF file; a Hugging Face Hub model, hf.co/USER/REPO or hf.co/USER/REPO:QUANT
    /// (fetched on first use into the huggingface_hub cache); or a test
    /// model's short name: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b,
    /// qwen2.5-coder-1.5b.
    model: String,
    /// Threads to compute with (default: the number of physical cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// How the KV cache stores keys: f16, or q8_0 (half the memory and the
    /// bytes read at long context; results move by the quantization error).
    #[arg(long = "cache-type-k", visible_alias = "ctk", default_value = "f16")]
    cache_type_k: KvType,
    /// How the KV cache stores values: f16 or q8_0.
    #[arg(long = "cache-type-v", visible_alias = "ctv", default_value = "f16")]
    cache_type_v: KvType,
}

impl ModelArgs {
    /// The model, its caches as `--cache-type-k/-v` say.
    fn load_model(&self) -> Result<LoadedModel> {
        let path = models::resolve(&self.model)?;
        let mut loaded = LoadedModel::load(&path)?;
        let types = CacheTypes { k: self.cache_type_k, v: self.cache_type_v };
        loaded.model.set_cache_types(types).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(loaded)
    }

    /// The model and a pool of `--threads` threads.
    fn load(&self) -> Result<(LoadedModel, ThreadPool)> {
        let loaded = self.load_model()?;
        let threads = self.threads.unwrap_or_else(physical_cores);
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        Ok((loaded, ThreadPool::new(threads)))
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than min-p × the most likely (0: off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty over the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// OpenAI-style presence penalty (0: off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// OpenAI-style frequency penalty (0: off).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed: same seed and settings, same output.
    #[arg(long, short = 's', default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self, max_tokens: usize) -> Result<GenerateParams> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        };
        sampling.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(GenerateParams {
            max_tokens,
            sampling,
            stop: self.stop.clone(),
            stop_at_eog: !self.ignore_eos,
            constraint: None,
            logit_bias: Vec::new(),
            adapter: None,
        })
    }
}

/// `--lora NAME=PATH[:SCALE]` (repeatable): LoRA adapters in llama.cpp's
/// GGUF format, kept apart from the base weights.
#[derive(Args)]
struct LoraArgs {
    /// A LoRA adapter (llama.cpp's LoRA GGUF, or a Hugging Face PEFT
    /// directory): `NAME=PATH[:SCALE]`, or `PATH`
    /// (named after the file). Scale 1 by default. `serve` takes several,
    /// each picked by a request's `model`; `run` takes one.
    #[arg(long = "lora", value_name = "NAME=PATH[:SCALE]")]
    lora: Vec<String>,
}

impl LoraArgs {
    /// Loads every adapter for `m`; a bad spec or an adapter for another
    /// model is a one-line error.
    fn load(&self, m: &LoadedModel) -> Result<Vec<std::sync::Arc<minnow_engine::lora::LoraAdapter>>> {
        let mut out: Vec<std::sync::Arc<minnow_engine::lora::LoraAdapter>> = Vec::new();
        for spec in &self.lora {
            let (name, rest) = match spec.split_once('=') {
                Some((n, r)) if !n.is_empty() => (Some(n.to_string()), r),
                _ => (None, spec.as_str()),
            };
            let (path, scale) = match rest.rsplit_once(':') {
                Some((p, s)) if s.parse::<f32>().is_ok() => (p, s.parse::<f32>().unwrap_or(1.0)),
                _ => (rest, 1.0),
            };
            if !scale.is_finite() {
                bail!("--lora {spec}: the scale must be a finite number");
            }
            let path = PathBuf::from(path);
            let name = name.unwrap_or_else(|| {
                path.file_stem().map_or_else(|| "lora".into(), |s| s.to_string_lossy().into_owned())
            });
            if out.iter().any(|a| a.name == name) {
                bail!("--lora: two adapters are named {name:?}");
            }
            let a = minnow_engine::lora::LoraAdapter::open(&path, &name, scale, m.model.config())?;
            out.push(std::sync::Arc::new(a));
        }
        Ok(out)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long, short = 'p')]
    prompt: String,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    max_tokens: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// After the run, print how the routers spread tokens over experts
    /// (stderr; with --json also as "moe_stats").
    #[arg(long)]
    moe_stats: bool,
    #[command(flatten)]
    constraint: ConstraintArgs,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    draft: crate::spec::DraftArgs,
    #[command(flatten)]
    samples: crate::spec::SampleArgs,
}

/// What the answer must be (structured outputs); at most one.
#[derive(Args)]
#[group(multiple = false)]
struct ConstraintArgs {
    /// The answer is JSON valid against the JSON Schema in this file.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// The answer matches this regular expression, whole.
    #[arg(long, value_name = "REGEX")]
    regex: Option<String>,
    /// The answer is exactly one of these comma-separated strings.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    choice: Option<Vec<String>>,
    /// The answer derives from the Lark-style grammar in this file
    /// (llguidance's syntax: a `start` rule; `%json {schema}` embeds a schema).
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
}

impl ConstraintArgs {
    /// The constraint asked for, compiled for `m`.
    fn compile(&self, m: &LoadedModel) -> Result<Option<minnow_engine::constraint::Constraint>> {
        use minnow_engine::constraint::ConstraintSpec;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read the {what} file {}", p.display()))
        };
        let spec = if let Some(p) = &self.json_schema {
            let schema = serde_json::from_str(&read(p, "JSON Schema")?)
                .with_context(|| format!("{} is not JSON", p.display()))?;
            ConstraintSpec::JsonSchema(schema)
        } else if let Some(r) = &self.regex {
            ConstraintSpec::Regex(r.clone())
        } else if let Some(c) = &self.choice {
            ConstraintSpec::Choice(c.clone())
        } else if let Some(p) = &self.grammar {
            ConstraintSpec::Grammar(read(p, "grammar")?)
        } else {
            return Ok(None);
        };
        let flag = format!("--{}", spec.kind().replace('_', "-"));
        let c = m.compile_constraint(&spec).with_context(|| format!("{flag}: the constraint does not compile"))?;
        Ok(Some(c))
    }
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512)]
    max_tokens: usize,
    #[arg(long, short = 'c')]
    ctx: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Do not add BOS/EOS even where the model's metadata asks for them.
    #[arg(long)]
    no_bos: bool,
    /// Parse special-token text (e.g. `<|im_start|>`) as special tokens.
    #[arg(long)]
    parse_special: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text prompt (tokenized with BOS and special tokens parsed).
    #[arg(long, short = 'p', conflicts_with = "ids")]
    prompt: Option<String>,
    /// Token ids, comma-separated, used as they are.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// How many of the best tokens to list per position.
    #[arg(long, default_value_t = 20)]
    top: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    file: std::path::PathBuf,
    /// Score at most this many tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to process.
    #[arg(short = 'p', default_value_t = 128)]
    pp: usize,
    /// Tokens to generate.
    #[arg(short = 'n', default_value_t = 64)]
    tg: usize,
    /// Repeats (the median is reported).
    #[arg(short = 'r', default_value_t = 3)]
    repeats: usize,
    /// Context depth, as llama-bench's `-d`: both tests run after this many
    /// tokens already in the KV cache (filled once, not timed).
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    depth: usize,
    /// Generation only, from two caches at once: one filled to -d, one to
    /// this depth, decode steps alternating between them; reports both
    /// speeds (median step times over -r × -n steps) and the change. On a
    /// machine whose memory bandwidth swings from second to second this
    /// measures the cost of context far more steadily than two runs.
    #[arg(long = "alternate-depth", value_name = "D")]
    alternate_depth: Option<usize>,
    #[arg(long)]
    json: bool,
    /// With --draft/--lookup: plain vs speculative greedy generation of -n
    /// tokens from a real prompt, alternating, medians of -r runs.
    #[command(flatten)]
    draft: crate::spec::BenchDraftArgs,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback: only this machine can connect).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (default: $MINNOW_API_KEY; unset: no key).
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences decoded together in one batch (an `n` > 1 request takes n).
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Context per sequence in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx: Option<usize>,
    /// Requests that may wait for a free slot before new ones get 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Memory for the prefix cache in MiB: the KV of recent prompts and
    /// answers, reused by requests that start the same way (shared system
    /// prompts, later chat turns); 0 turns it off.
    #[arg(long, default_value_t = 512)]
    prefix_cache_mb: usize,
    /// Machine price in USD per hour, for the cost estimate in /metrics.
    #[arg(long, default_value_t = 0.0)]
    price_per_hour: f64,
    /// Another name requests may give as `model` (repeatable); the id in
    /// /v1/models always works, any other name gets 404 model_not_found.
    #[arg(long = "alias", value_name = "NAME")]
    aliases: Vec<String>,
    #[command(flatten)]
    lora: LoraArgs,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT; then they
    /// end with an error (a second signal ends them at once).
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    shutdown_grace: f64,
    /// Open connections beyond which new ones are closed at once.
    #[arg(long, default_value_t = 512, value_name = "N")]
    max_connections: usize,
    /// Seconds a request head may take to arrive (and a body may stall).
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    header_timeout: f64,
    /// Seconds a keep-alive connection may sit idle (or a client leave a
    /// response unread) before it is closed.
    #[arg(long, default_value_t = 60.0, value_name = "S")]
    idle_timeout: f64,
    /// Keep chat completions sent with `"store": true` (and their
    /// `metadata`) in DIR, crash-safe, behind OpenAI's stored-completions API
    /// (`GET /v1/chat/completions`…); `distill --data store:DIR` trains on them.
    #[arg(long, value_name = "DIR")]
    store: Option<std::path::PathBuf>,
    /// With --store: record every chat request, `store` or not.
    #[arg(long)]
    store_all: bool,
    /// With --store: also record each reply token's top-K log-probabilities
    /// (for distillation's KL term), whatever the client asked for.
    #[arg(long, default_value_t = 0, value_name = "K")]
    store_logprobs: usize,
    /// With --store: the most bytes the stored records may take; past it new
    /// answers are not stored (they are still answered; see /metrics and the
    /// log) until records are deleted. Accepts K/M/G suffixes.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    store_max_bytes: Option<u64>,
    /// Speculative decoding while a single sequence decodes (batched
    /// decoding already amortises weight reads over several).
    #[command(flatten)]
    draft: crate::spec::DraftArgs,
}

#[derive(Args)]
struct PullArgs {
    /// hf.co/USER/REPO, optionally with :QUANT and @REVISION (QUANT: Q4_K_M, q8_0, ...; default
    /// Q4_K_M, else the smallest of at least 4 bits), a test model's short
    /// name, or "all" (every test model).
    name: String,
}

#[derive(Args)]
struct RmArgs {
    /// As `minnow list` names it.
    name: String,
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    // Commands that print for a pipe die quietly when it closes (`minnow
    // tokenize < f | head`), as Unix tools do, instead of panicking in
    // println! (Rust ignores SIGPIPE). Long-running commands that talk to
    // sockets (the server, a remote teacher) keep it ignored: a peer that
    // resets must be an error on that one socket, never the process's end.
    #[cfg(unix)]
    if !matches!(cli.command, Command::Serve(_) | Command::Distill(_)) {
        // SAFETY: restoring the default disposition of a signal before any
        // thread is started has no memory-safety preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat(a),
        Command::Info(a) => info(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Logits(a) => logits(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Bench(a) => bench(a),
        Command::Upcycle(a) => upcycle(a),
        Command::Quantize(a) => quantize(a),
        Command::Imatrix(a) => imatrix(a),
        Command::Distill(a) => crate::distill_cmd::main(a),
        Command::Pull(a) => {
            for p in models::pull(&a.name)? {
                println!("{}", p.display());
            }
            Ok(())
        }
        Command::List => {
            let cached = models::list();
            let width = cached.iter().map(|m| m.name.len()).max().unwrap_or(0).max(4);
            println!("{:width$}  {:>9}  {:8}  PATH", "NAME", "SIZE", "QUANT");
            for m in cached {
                let quant = m.quant.as_deref().unwrap_or("-");
                println!("{:width$}  {:>6} MB  {quant:8}  {}", m.name, m.size / 1_000_000, m.path.display());
            }
            Ok(())
        }
        Command::Rm(a) => {
            for p in models::remove(&a.name)? {
                println!("removed {p}");
            }
            Ok(())
        }
        Command::Serve(a) => {
            let (m, pool) = a.model.load()?;
            let ctx = context_size(&m, a.ctx)?;
            let speculation = crate::spec::serve_speculation(&a.draft, &m)?;
            let adapters = a.lora.load(&m)?;
            if let Some(clash) = adapters.iter().find(|ad| a.aliases.contains(&ad.name)) {
                bail!("--lora {}: the name is also an --alias", clash.name);
            }
            minnow_serve::run(
                m,
                pool,
                minnow_serve::RunConfig {
                    host: a.host,
                    port: a.port,
                    api_key: a.api_key,
                    parallel: a.parallel,
                    ctx,
                    max_queue: a.queue,
                    prefix_cache_bytes: a.prefix_cache_mb.saturating_mul(1 << 20),
                    price_per_hour: a.price_per_hour,
                    model: a.model.model,
                    speculation,
                    aliases: a.aliases,
                    adapters,
                    shutdown_grace: seconds("--shutdown-grace", a.shutdown_grace)?,
                    limits: minnow_serve::Limits {
                        max_connections: a.max_connections,
                        header_timeout: seconds("--header-timeout", a.header_timeout)?,
                        idle_timeout: seconds("--idle-timeout", a.idle_timeout)?,
                    },
                    store_dir: a.store,
                    store_all: a.store_all,
                    store_logprobs: a.store_logprobs,
                    store_max_bytes: a.store_max_bytes,
                },
            )
        }
    }
}

/// A byte count: digits with an optional K, M or G (powers of 1024).
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 500M, 2G, 1048576)"))
}

/// A duration flag given in seconds (fractions allowed).
fn seconds(flag: &str, s: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow::anyhow!("{flag} must be a non-negative number of seconds, got {s}"))
}

/// Physical cores (hyperthreads share a core's arithmetic units, so more
/// threads than cores only adds contention); falls back to logical CPUs.
fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return logical };
    let mut cores = std::collections::HashSet::new();
    let mut physical = String::new();
    for line in info.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => physical = v.trim().to_string(),
                "core id" => {
                    cores.insert((physical.clone(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

fn context_size(m: &LoadedModel, ctx: Option<usize>) -> Result<usize> {
    let train = m.model.config().context_length;
    match ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(c) if c > train => bail!("--ctx {c} exceeds the model's training context of {train} tokens"),
        Some(c) => Ok(c),
        None => Ok(train.min(4096)),
    }
}

fn check_fits(prompt: usize, max_tokens: usize, ctx: usize) -> Result<()> {
    if prompt >= ctx {
        bail!("the prompt is {prompt} tokens but the context holds {ctx}: shorten it or raise --ctx");
    }
    let _ = max_tokens;
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let (m, pool) = a.model.load()?;
    let ctx = context_size(&m, a.ctx)?;
    let mut params = a.sampling.params(a.max_tokens)?;
    params.constraint = a.constraint.compile(&m)?;
    let mut adapters = a.lora.load(&m)?;
    if adapters.len() > 1 {
        bail!("run takes one --lora (serve takes several, one per request)");
    }
    params.adapter = adapters.pop();
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", a.prompt.clone()));
        m.chat_prompt(&msgs)?
    } else {
        m.tokenizer.encode(&a.prompt, true, false)?
    };
    check_fits(prompt.len(), a.max_tokens, ctx)?;
    if a.draft.enabled() || a.samples.enabled() {
        return crate::spec::run(&m, &pool, ctx, &prompt, &params, &a.draft, &a.samples, a.json);
    }
    let mut cache = m.model.new_cache(ctx);
    let stdout = std::io::stdout();
    let g = generate(&m.model, &m.tokenizer, &pool, &mut cache, &prompt, &params, |piece| {
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if a.json {
        let mut out = json!({
            "text": g.text, "ids": g.ids, "prompt_tokens": g.prompt_tokens,
            "prompt_tps": g.prompt_tps(), "gen_tokens": g.gen_tokens, "gen_tps": g.gen_tps(),
            "finish_reason": g.finish.as_str(),
        });
        if a.moe_stats {
            out["moe_stats"] = moe_stats(&m);
        }
        println!("{out}");
    } else {
        println!();
        eprintln!("{}", summary(&g));
        if a.moe_stats {
            moe_stats(&m);
        }
    }
    Ok(())
}

/// `--moe-stats`: prints the router statistics table to stderr and returns
/// them as JSON. A dense model gets a note rather than an error: the flag
/// can then stay in scripts that run both kinds.
fn moe_stats(m: &LoadedModel) -> serde_json::Value {
    let Some(s) = m.model.router_stats() else {
        eprintln!(
            "note: --moe-stats: this is a dense model ({}), it has no experts to report on",
            m.model.config().arch.name()
        );
        return serde_json::Value::Null;
    };
    eprint!("{}", s.format_table());
    json!({
        "experts_per_token": s.experts_per_token, "tokens": s.tokens(), "counts": s.counts, "layers": s.layers(),
    })
}

/// The one-line speed summary after a generation (`run`, and with `--draft`).
pub(crate) fn summary(g: &Generation) -> String {
    format!(
        "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | finish: {}",
        g.prompt_tokens,
        g.prompt_tps(),
        g.gen_tokens,
        g.gen_tps(),
        g.finish.as_str()
    )
}

fn chat(a: ChatArgs) -> Result<()> {
    let (m, pool) = a.model.load()?;
    let ctx = context_size(&m, a.ctx)?;
    let params = a.sampling.params(a.max_tokens)?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s.clone()));
    }
    eprintln!("minnow chat: type a message and press Enter; /reset clears the history, Ctrl-D quits.");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        if line.trim() == "/reset" {
            messages.retain(|m: &ChatMessage| m.role == "system");
            continue;
        }
        messages.push(ChatMessage::new("user", line.to_string()));
        let prompt = m.chat_prompt(&messages)?;
        if prompt.len() >= ctx {
            eprintln!(
                "the conversation ({} tokens) no longer fits the context of {ctx}; /reset to start over",
                prompt.len()
            );
            messages.pop();
            continue;
        }
        // Re-running the whole conversation keeps the code simple; a prefix
        // cache would avoid recomputing earlier turns.
        let mut cache = m.model.new_cache(ctx);
        let stdout = std::io::stdout();
        let g = generate(&m.model, &m.tokenizer, &pool, &mut cache, &prompt, &params, |piece| {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        eprintln!("[{}]", summary(&g));
        messages.push(ChatMessage::new("assistant", g.text.trim().to_string()));
    }
}

fn info(a: InfoArgs) -> Result<()> {
    let path = models::resolve(&a.model.model)?;
    let m = a.model.load_model()?;
    let cfg = m.model.config();
    let mut params: u64 = 0;
    let mut weight_bytes: u64 = 0;
    let mut mix: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for t in m.file.tensors() {
        params += t.n_elements();
        weight_bytes += t.n_bytes;
        let e = mix.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
    }
    let ctx = cfg.context_length.min(4096);
    let kv_bytes = (KvCache::bytes_per_position(cfg, m.model.cache_types()) * ctx) as u64;
    let name = m.file.get("general.name").and_then(|v| v.as_str()).unwrap_or("").to_string();
    if a.json {
        let mix_json: serde_json::Map<String, serde_json::Value> =
            mix.iter().map(|(k, (n, e))| (k.clone(), json!({"tensors": n, "elements": e}))).collect();
        println!(
            "{}",
            json!({
                "file": path.display().to_string(), "name": name, "architecture": cfg.arch.name(),
                "parameters": params, "file_bytes": m.file.file_size(), "weight_bytes": weight_bytes,
                "quantization": mix_json, "context_length": cfg.context_length, "n_layer": cfg.n_layer,
                "n_embd": cfg.n_embd, "n_ff": cfg.n_ff, "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv,
                "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "rope_base": cfg.rope_base,
                "sliding_window": cfg.sliding_window, "kv_cache_bytes_at_4096": kv_bytes,
                "memory_bytes_at_4096": weight_bytes + kv_bytes,
                "chat_template": m.chat.is_some(),
            })
        );
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!("file:          {}", path.display());
    println!("name:          {name}");
    println!("architecture:  {}", cfg.arch.name());
    println!("parameters:    {:.1} M", params as f64 / 1e6);
    println!(
        "layers:        {} (width {}, FFN {}, heads {} / {} kv, head dim {})",
        cfg.n_layer, cfg.n_embd, cfg.n_ff, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    );
    println!("vocabulary:    {} tokens", cfg.vocab_size);
    println!("context:       {} tokens (trained)", cfg.context_length);
    if let Some(w) = cfg.sliding_window {
        println!("sliding window: {w} tokens on 5 of every 6 layers");
    }
    println!("quantization:");
    for (ty, (n, e)) in &mix {
        println!("  {ty:6} {n:4} tensors, {:6.1}% of parameters", 100.0 * *e as f64 / params as f64);
    }
    let types = m.model.cache_types();
    println!(
        "memory:        {:.1} MiB weights + {:.1} MiB KV cache ({} keys, {} values) at 4096 tokens",
        gib(weight_bytes),
        gib(kv_bytes),
        types.k,
        types.v
    );
    println!("chat template: {}", if m.chat.is_some() { "yes" } else { "no (ChatML is used)" });
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let path = models::resolve(&a.model.model)?;
    let m = LoadedModel::load(&path)?;
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).context("reading the text from stdin")?;
    let ids = m.tokenizer.encode(&text, !a.no_bos, a.parse_special)?;
    if a.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        for id in &ids {
            println!("{id}\t{:?}", m.tokenizer.token_text(*id));
        }
    }
    Ok(())
}

/// The best `k` (id, logit) of a row, best first.
fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, row[i])).collect()
}

fn logits(a: LogitsArgs) -> Result<()> {
    let (m, pool) = a.model.load()?;
    let ids = match (&a.prompt, &a.ids) {
        (Some(p), None) => m.tokenizer.encode(p, true, true)?,
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give either -p PROMPT or --ids 1,2,3"),
    };
    if ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let vocab = m.model.config().vocab_size;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab} tokens");
    }
    let mut cache = m.model.new_cache(ids.len());
    let all = m.model.forward_one(&pool, &mut cache, &ids, Logits::All)?;
    let mut lp = vec![0f32; vocab];
    let mut positions = Vec::new();
    for (i, row) in all.chunks_exact(vocab).enumerate() {
        log_softmax(row, &mut lp);
        let top: Vec<_> = top_k(row, a.top)
            .into_iter()
            .map(|(id, logit)| json!({"id": id, "logit": logit, "logprob": lp[id]}))
            .collect();
        if !a.json {
            let best = &top[0];
            println!("{i:4} {:>8} {:?} -> {}", ids[i], m.tokenizer.token_text(ids[i]), best);
        }
        positions.push(json!({ "top": top }));
    }
    if a.json {
        println!("{}", json!({ "ids": ids, "positions": positions }));
    }
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let (m, pool) = a.model.load()?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut ids = m.tokenizer.encode(&text, true, false)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        bail!("{} has fewer than 2 tokens: nothing to score", a.file.display());
    }
    let ctx = m.model.config().context_length;
    if ids.len() > ctx {
        bail!("{} tokens exceed the model's context of {ctx}: pass --max-tokens {ctx}", ids.len());
    }
    let vocab = m.model.config().vocab_size;
    let mut cache = m.model.new_cache(ids.len());
    let mut lp = vec![0f32; vocab];
    let mut next_logprobs = Vec::with_capacity(ids.len() - 1);
    // Chunked so activations stay bounded on long files.
    for chunk_start in (0..ids.len() - 1).step_by(512) {
        let end = (chunk_start + 512).min(ids.len() - 1);
        let all = m.model.forward_one(&pool, &mut cache, &ids[chunk_start..end], Logits::All)?;
        for (k, row) in all.chunks_exact(vocab).enumerate() {
            log_softmax(row, &mut lp);
            next_logprobs.push(lp[ids[chunk_start + k + 1] as usize]);
        }
    }
    let mean_nll = -next_logprobs.iter().map(|&x| x as f64).sum::<f64>() / next_logprobs.len() as f64;
    if a.json {
        println!("{}", json!({ "ids": ids, "next_logprobs": next_logprobs, "mean_nll": mean_nll }));
    } else {
        println!("tokens: {}  mean NLL: {mean_nll:.4}  perplexity: {:.3}", ids.len(), mean_nll.exp());
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Greedy decoding from two caches (each truncated back to its depth before
/// every repeat), one step on each in turn; returns each one's tok/s from
/// its median step time.
fn bench_alternating(
    model: &minnow_engine::model::Model,
    pool: &ThreadPool,
    mut caches: [(&mut KvCache, usize); 2],
    a: &BenchArgs,
    first_token: u32,
) -> Result<(f64, f64)> {
    let mut steps = [Vec::new(), Vec::new()];
    for _ in 0..a.repeats {
        let mut tokens = [first_token; 2];
        for (cache, depth) in caches.iter_mut() {
            cache.truncate(*depth);
        }
        for _ in 0..a.tg {
            for (k, (cache, _)) in caches.iter_mut().enumerate() {
                let t = Instant::now();
                let logits = model.forward_one(pool, cache, &[tokens[k]], Logits::Last)?;
                steps[k].push(t.elapsed().as_secs_f64());
                tokens[k] = argmax(&logits).unwrap_or(0);
            }
        }
    }
    let [s0, s1] = steps;
    Ok((1.0 / median(s0), 1.0 / median(s1)))
}

fn bench(a: BenchArgs) -> Result<()> {
    let (m, pool) = a.model.load()?;
    if a.repeats == 0 || a.pp == 0 || a.tg == 0 {
        bail!("-p, -n and -r must be at least 1");
    }
    if a.draft.draft.enabled() {
        return crate::spec::bench(&m, &pool, &a.model.model, a.tg, a.repeats, &a.draft, a.json);
    }
    let vocab = m.model.config().vocab_size as u32;
    let types = m.model.cache_types();
    // Arbitrary but fixed token ids, as llama-bench uses random ones: the
    // depth's tokens, then the prompt's.
    let token = |i: usize| (i as u32 * 7919 + 13) % vocab;
    let ids: Vec<u32> = (0..a.depth + a.pp).map(token).collect();
    let (context, prompt) = ids.split_at(a.depth);
    let ctx = a.depth.max(a.alternate_depth.unwrap_or(0)) + a.pp.max(a.tg) + 1;
    let max_ctx = m.model.config().context_length;
    if ctx > max_ctx {
        bail!(
            "-d {} with -p {} / -n {} needs {ctx} positions, more than the model's context of {max_ctx}",
            a.depth.max(a.alternate_depth.unwrap_or(0)),
            a.pp,
            a.tg
        );
    }
    // One warm-up pass pages the weights in; the depth is filled once, and
    // each test starts from it (the cache truncated back to it).
    prefill(&m.model, &pool, &mut m.model.new_cache(ctx), &prompt[..prompt.len().min(16)])?;
    let mut cache = m.model.new_cache(ctx);
    if !context.is_empty() {
        prefill(&m.model, &pool, &mut cache, context)?;
    }
    if let Some(alt) = a.alternate_depth {
        let mut other = m.model.new_cache(ctx);
        let alt_context: Vec<u32> = (0..alt).map(token).collect();
        if alt > 0 {
            prefill(&m.model, &pool, &mut other, &alt_context)?;
        }
        let (tg, tg_alt) =
            bench_alternating(&m.model, &pool, [(&mut cache, a.depth), (&mut other, alt)], &a, prompt[0])?;
        let change = 100.0 * (tg / tg_alt - 1.0);
        if a.json {
            println!(
                "{}",
                json!({"model": a.model.model, "threads": pool.n_threads(), "type_k": types.k.to_string(), "type_v": types.v.to_string(), "tg": a.tg, "depth": a.depth, "alternate_depth": alt, "tg_tps": tg, "tg_tps_alternate": tg_alt, "change_pct": change})
            );
        } else {
            println!("model: {}  threads: {}  KV cache: {} / {}", a.model.model, pool.n_threads(), types.k, types.v);
            println!("tg{:<5} {tg:8.2} tok/s @ d{}", a.tg, a.depth);
            println!("tg{:<5} {tg_alt:8.2} tok/s @ d{alt}", a.tg);
            println!("d{alt} → d{}: {change:+.1}% (decode steps alternating between the two caches)", a.depth);
        }
        return Ok(());
    }
    let mut pp_rates = Vec::new();
    let mut tg_rates = Vec::new();
    for _ in 0..a.repeats {
        cache.truncate(a.depth);
        let t = Instant::now();
        prefill(&m.model, &pool, &mut cache, prompt)?;
        pp_rates.push(a.pp as f64 / t.elapsed().as_secs_f64());
        // Generation measured right after the depth (without the prompt), as
        // llama-bench's tg.
        cache.truncate(a.depth);
        let mut tok = prompt[0];
        let t = Instant::now();
        for _ in 0..a.tg {
            let logits = m.model.forward_one(&pool, &mut cache, &[tok], Logits::Last)?;
            tok = argmax(&logits).unwrap_or(0);
        }
        tg_rates.push(a.tg as f64 / t.elapsed().as_secs_f64());
    }
    let (pp, tg) = (median(pp_rates), median(tg_rates));
    // The integer-dot kernels' instruction set (MINNOW_SIMD caps it).
    let simd = minnow_kernels::formats::simd_level();
    if a.json {
        println!(
            "{}",
            json!({"model": a.model.model, "threads": pool.n_threads(), "simd": format!("{simd:?}"), "type_k": types.k.to_string(), "type_v": types.v.to_string(), "pp": a.pp, "tg": a.tg, "depth": a.depth, "pp_tps": pp, "tg_tps": tg})
        );
    } else {
        println!(
            "model: {}  threads: {}  kernels: {simd:?}  KV cache: {} / {}",
            a.model.model,
            pool.n_threads(),
            types.k,
            types.v
        );
        let at = if a.depth > 0 { format!(" @ d{}", a.depth) } else { String::new() };
        println!("pp{:<5} {:8.2} tok/s{at}", a.pp, pp);
        println!("tg{:<5} {:8.2} tok/s{at}", a.tg, tg);
    }
    Ok(())
}

#[derive(Args)]
struct ImatrixArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL of texts: each record's `text`, `prompt` (+ `completion` or
    /// `answer`), or `messages` (rendered with the chat template).
    #[arg(long)]
    data: PathBuf,
    /// Where to write the importance matrix (GGUF, atomically).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Tokens per forward pass (a record longer than this goes in pieces).
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Stop after this many tokens in all.
    #[arg(long)]
    max_tokens: Option<usize>,
}

/// One record of `imatrix --data` as text.
fn record_text(m: &LoadedModel, v: &serde_json::Value, line: usize) -> Result<String> {
    if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
        return Ok(t.to_string());
    }
    if let Some(p) = v.get("prompt").and_then(|t| t.as_str()) {
        let answer = v.get("completion").or_else(|| v.get("answer")).and_then(|t| t.as_str()).unwrap_or("");
        return Ok(format!("{p}{answer}"));
    }
    if let Some(msgs) = v.get("messages") {
        let msgs: Vec<ChatMessage> = serde_json::from_value(msgs.clone())
            .with_context(|| format!("line {line}: `messages` is not a list of {{role, content}}"))?;
        return Ok(match &m.chat {
            Some(t) => t.render(&msgs, false).map_err(|e| anyhow!("line {line}: {e}"))?,
            None => msgs.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        });
    }
    bail!("line {line}: a record needs `text`, `prompt` or `messages`")
}

fn imatrix(a: ImatrixArgs) -> Result<()> {
    use minnow_engine::imatrix::Imatrix;
    let (m, pool) = a.model.load()?;
    if a.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let text = std::fs::read_to_string(&a.data).with_context(|| format!("{}", a.data.display()))?;
    let t0 = Instant::now();
    let mut seqs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("line {}: not JSON", i + 1))?;
        seqs.push(m.tokenizer.encode(&record_text(&m, &v, i + 1)?, true, true)?);
    }
    let (total, tokens) = Imatrix::collect(
        &m.model,
        &pool,
        seqs.iter().map(|s| &s[..]),
        a.chunk,
        a.max_tokens,
        &a.data.display().to_string(),
    )?;
    if tokens == 0 {
        bail!("{} has no records", a.data.display());
    }
    total.write(&a.output)?;
    println!(
        "wrote {} in {:.1} s: {} matrices, {tokens} tokens in {} chunks",
        a.output.display(),
        t0.elapsed().as_secs_f64(),
        total.sums.len(),
        total.chunks
    );
    Ok(())
}

#[derive(Args)]
struct QuantizeArgs {
    /// The model to re-encode: a GGUF file or a test model's short name.
    input: String,
    /// Where to write it (atomically).
    output: PathBuf,
    /// The type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_0.
    #[arg(value_name = "TYPE")]
    ty: String,
    /// Threads to quantize with (default: the number of physical cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// An importance matrix (`minnow imatrix` or `llama-imatrix`, GGUF):
    /// the k-quant fits weigh each weight by its column's activations.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    use minnow_engine::quantize::{quantize_file, QuantType};
    let ty = QuantType::parse(&a.ty).map_err(|e| anyhow!("{e}"))?;
    let input = models::resolve(&a.input)?;
    let file = minnow_gguf::GgufFile::open(&input).with_context(|| format!("{}", input.display()))?;
    let t = Instant::now();
    let imatrix = a.imatrix.as_deref().map(minnow_engine::imatrix::Imatrix::read).transpose()?;
    let threads = a.threads.unwrap_or_else(physical_cores).max(1);
    let r = quantize_file(&file, &a.output, ty, imatrix.as_ref(), threads, |_| {})?;
    if imatrix.is_some() && r.weighted == 0 {
        eprintln!("warning: the importance matrix matched none of the k-quant tensors (another model's?)");
    }
    if r.requantized > 0 {
        eprintln!(
            "warning: {} of {} tensors were already quantized in {}: they were dequantized and quantized again \
             (two roundings); quantize from an F32, F16 or BF16 file for the best result",
            r.requantized,
            r.tensors,
            input.display()
        );
    }
    let mix: Vec<String> = r.mix.iter().map(|(t, (n, _))| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({}) in {:.1} s: {:.1} MB from {:.1} MB; tensors: {}; {} weighted by the importance matrix",
        a.output.display(),
        ty.name(),
        t.elapsed().as_secs_f64(),
        r.out_bytes as f64 / 1e6,
        r.in_bytes as f64 / 1e6,
        mix.join(", "),
        r.weighted
    );
    Ok(())
}

#[derive(Args)]
struct UpcycleArgs {
    /// The dense model: a GGUF file or a test model's short name.
    model: String,
    /// Where to write the mixture-of-experts model (atomically).
    #[arg(long, short = 'o')]
    output: std::path::PathBuf,
    /// Experts per layer.
    #[arg(long)]
    experts: usize,
    /// Experts each token is routed to.
    #[arg(long)]
    top_k: usize,
    /// Relative Gaussian noise on the expert weights, also the scale of a
    /// random router (0: exact copies and a zero router).
    #[arg(long, default_value_t = 0.0)]
    noise: f32,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Expert tensor type: keep (the dense bytes, copied), q8_0, q6_k, q5_k,
    /// q4_0, q4_k, q4_1, q5_0, q5_1, f16, bf16, f32.
    #[arg(long = "type", default_value = "keep")]
    expert_type: String,
    /// Experts are n_ff/k-wide slices of the dense FFN (expert e is slice
    /// e mod k) instead of full copies: a token's k experts then hold exactly
    /// the dense FFN's parameters (same cost per token as the dense model);
    /// the function is the dense one at zero noise.
    #[arg(long)]
    fine_grained: bool,
    /// Threads for requantizing (default: the number of physical cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
}

fn upcycle(a: UpcycleArgs) -> Result<()> {
    use minnow_engine::upcycle::{upcycle_file, ExpertType, UpcycleOptions};
    let input = models::resolve(&a.model)?;
    let opts = UpcycleOptions {
        experts: a.experts,
        top_k: a.top_k,
        noise: a.noise,
        seed: a.seed,
        expert_type: ExpertType::parse(&a.expert_type)?,
        fine_grained: a.fine_grained,
        threads: a.threads.unwrap_or_else(physical_cores),
    };
    let t = Instant::now();
    let s = upcycle_file(&input, &a.output, &opts)?;
    let b = |n: u64| n as f64 / 1e9;
    println!(
        "wrote {} in {:.1} s: {} ({} from {}), {} layers × {} experts, top-{}, expert width {}",
        a.output.display(),
        t.elapsed().as_secs_f64(),
        s.arch,
        match (s.arch, s.fine_grained) {
            ("llama", false) => "Mixtral-style",
            ("llama", true) => "Mixtral-style, fine-grained",
            (_, false) => "with a zero-output shared expert",
            (_, true) => "fine-grained, with a zero-output shared expert",
        },
        s.source_arch,
        s.n_layer,
        s.experts,
        s.top_k,
        s.n_ff
    );
    let types: Vec<String> = s.expert_types.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
    println!("expert stacks: {}", types.join(", "));
    println!(
        "parameters: {:.3} B stored, {:.3} B active per token (dense: {:.3} B, so {:.2}× the dense model's work per token)",
        b(s.total_params),
        b(s.active_params),
        b(s.dense_params),
        s.active_params as f64 / s.dense_params as f64
    );
    if s.down_scale != 1.0 {
        println!("down projections scaled by {} (so the chosen experts' weights add back to one)", s.down_scale);
    }
    for n in &s.notes {
        println!("note: {n}");
    }
    println!("file: {:.1} MiB", s.file_bytes as f64 / (1u64 << 20) as f64);
    Ok(())
}
