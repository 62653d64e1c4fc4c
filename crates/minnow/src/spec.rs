//! The CLI side of speculative decoding and many-sample generation:
//! `run --draft MODEL | --lookup`, `run --n N [--vote ...]`,
//! `serve --draft MODEL | --lookup` and `bench --draft`.

use anyhow::{bail, Result};
use clap::Args;
use minnow_engine::chat::ChatMessage;
use minnow_engine::generate::{generate, GenerateParams, Generation};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_engine::scheduler::Speculation;
use minnow_engine::speculative::memory::LookupMemory;
use minnow_engine::speculative::{check_draft_vocab, generate_speculative, Draft, SpecConfig, SpecStats};
use minnow_engine::vote::{generate_n, vote, AnswerExtractor, JsonField, LastLine, RegexAnswer};
use minnow_kernels::pool::ThreadPool;
use minnow_models as models;
use serde_json::json;
use std::io::Write;

/// Speculative decoding flags (`run` and `bench`).
#[derive(Args, Clone, Default)]
pub struct DraftArgs {
    /// Speculative decoding with a draft model (GGUF file or test-model name)
    /// sharing the target's vocabulary; `--draft ngram` drafts by prompt
    /// lookup instead. Output is the target's: identical when greedy, the
    /// same distribution when sampling.
    #[arg(long)]
    pub draft: Option<String>,
    /// Prompt-lookup (n-gram) drafting, no second model: same as `--draft ngram`.
    #[arg(long, conflicts_with = "draft")]
    pub lookup: bool,
    /// Longest draft; the draft length adapts up to this.
    #[arg(long, default_value_t = 10)]
    pub draft_max: usize,
    /// Always draft exactly --draft-max tokens: no adaptation, never switched off.
    #[arg(long)]
    pub draft_fixed: bool,
    /// Prompt lookup also drafts from earlier answers to similar prompts
    /// kept in this file (JSON lines; created if missing): the skeleton an
    /// answer shares with the others, e.g. `", "product": "` in JSON
    /// extraction. `run` adds its answer to the file (the 64 most recent are
    /// kept); `bench` only reads it.
    #[arg(long, value_name = "FILE")]
    pub lookup_memory: Option<std::path::PathBuf>,
    /// The draft model scores only its first N vocabulary entries (the most
    /// frequent) and the tokens already in the text; 0: all of them.
    #[arg(long, value_name = "N", default_value_t = SpecConfig::default().draft_head_rows)]
    pub draft_head_rows: usize,
}

/// Answers kept in a `--lookup-memory` file.
const LOOKUP_MEMORY_CAP: usize = 64;

impl DraftArgs {
    pub fn enabled(&self) -> bool {
        self.draft.is_some() || self.lookup
    }

    fn memory(&self) -> Result<Option<LookupMemory>> {
        match &self.lookup_memory {
            None => Ok(None),
            Some(p) => Ok(Some(LookupMemory::load(p, LOOKUP_MEMORY_CAP)?)),
        }
    }

    fn config(&self) -> Result<SpecConfig> {
        if self.draft_max == 0 {
            bail!("--draft-max must be at least 1");
        }
        let mut cfg = SpecConfig {
            k_max: self.draft_max,
            k_start: 4.min(self.draft_max),
            draft_head_rows: self.draft_head_rows,
            ..SpecConfig::default()
        };
        if self.draft_fixed {
            cfg = SpecConfig { k_start: self.draft_max, adaptive: false, auto_off: false, ..cfg };
        }
        Ok(cfg)
    }

    /// The draft model, loaded and checked against `target` (None: n-gram).
    fn load(&self, target: &LoadedModel) -> Result<Option<LoadedModel>> {
        match self.draft.as_deref() {
            None | Some("ngram") | Some("lookup") => Ok(None),
            Some(name) => {
                let path = models::resolve(name)?;
                let d = LoadedModel::load(&path)?;
                check_draft_vocab(target, &d).map_err(|e| anyhow::anyhow!("--draft {name}: {e}"))?;
                Ok(Some(d))
            }
        }
    }
}

/// `serve --draft/--lookup`: the scheduler's speculation, the draft model
/// loaded and checked.
pub fn serve_speculation(a: &DraftArgs, target: &LoadedModel) -> Result<Option<Speculation>> {
    if !a.enabled() {
        return Ok(None);
    }
    let config = a.config()?;
    let draft = a.load(target)?.map(std::sync::Arc::new);
    Ok(Some(Speculation { draft, config }))
}

/// `run --n` / `--vote` flags.
#[derive(Args, Clone)]
pub struct SampleArgs {
    /// Samples of the prompt: one prefill, decoded together as one batch
    /// (sample i uses seed + i).
    #[arg(long = "n", default_value_t = 1, value_name = "N")]
    pub samples: usize,
    /// Self-consistency: print the majority answer among the --n samples and
    /// the vote counts. The answer is a sample's last line unless
    /// --vote-regex or --vote-json-field says otherwise.
    #[arg(long)]
    pub vote: bool,
    /// The answer is the last match of this regex (its first group if any).
    #[arg(long, requires = "vote")]
    pub vote_regex: Option<String>,
    /// The answer is this field of the first JSON value in the text
    /// (dot path, e.g. `city` or `order.items.0`; `.` for the whole value).
    #[arg(long, requires = "vote", conflicts_with = "vote_regex")]
    pub vote_json_field: Option<String>,
}

impl SampleArgs {
    pub fn enabled(&self) -> bool {
        self.samples != 1 || self.vote
    }

    fn extractor(&self) -> Result<Box<dyn AnswerExtractor>> {
        Ok(match (&self.vote_regex, &self.vote_json_field) {
            (Some(r), _) => Box::new(RegexAnswer::new(r)?),
            (_, Some(f)) => Box::new(JsonField(f.clone())),
            _ => Box::new(LastLine),
        })
    }
}

/// `run` with `--draft`/`--lookup` or `--n`/`--vote`.
pub fn run(
    m: &LoadedModel,
    pool: &ThreadPool,
    ctx: usize,
    prompt: &[u32],
    params: &GenerateParams,
    draft: &DraftArgs,
    samples: &SampleArgs,
    json_out: bool,
) -> Result<()> {
    if samples.enabled() {
        if draft.enabled() {
            bail!("--n/--vote cannot be combined with --draft/--lookup yet");
        }
        return run_n(m, pool, ctx, prompt, params, samples, json_out);
    }
    let cfg = draft.config()?;
    let draft_model = draft.load(m)?;
    let source = match &draft_model {
        Some(d) => Draft::Model(&d.model),
        None => Draft::NGram,
    };
    let mut memory = draft.memory()?;
    let refs = memory.as_ref().map(|mem| mem.references_for(prompt)).unwrap_or_default();
    let stdout = std::io::stdout();
    let (g, s) =
        generate_speculative(&m.model, &m.tokenizer, pool, source, ctx, prompt, params, &cfg, refs, |piece| {
            if !json_out {
                let mut out = stdout.lock();
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        })?;
    if let (Some(mem), Some(path)) = (memory.as_mut(), &draft.lookup_memory) {
        mem.record(prompt, &g.text);
        mem.save(path)?;
    }
    if json_out {
        println!(
            "{}",
            json!({
                "text": g.text, "ids": g.ids, "prompt_tokens": g.prompt_tokens,
                "prompt_tps": g.prompt_tps(), "gen_tokens": g.gen_tokens, "gen_tps": g.gen_tps(),
                "finish_reason": g.finish.as_str(), "speculative": s.to_json(g.gen_tokens, g.gen_secs),
            })
        );
    } else {
        println!();
        eprintln!("{}", crate::cli::summary(&g));
        eprintln!("{}", s.summary(g.gen_tokens, g.gen_secs));
    }
    Ok(())
}

fn run_n(
    m: &LoadedModel,
    pool: &ThreadPool,
    ctx: usize,
    prompt: &[u32],
    params: &GenerateParams,
    a: &SampleArgs,
    json_out: bool,
) -> Result<()> {
    if a.samples == 0 {
        bail!("--n must be at least 1");
    }
    if a.vote && a.samples < 2 {
        bail!("--vote needs several samples: add --n 5 (or more)");
    }
    let extractor = a.extractor()?;
    let g = generate_n(&m.model, &m.tokenizer, pool, ctx, prompt, params, a.samples, |_, _| {})?;
    let texts: Vec<&str> = g.samples.iter().map(|s| s.text.as_str()).collect();
    let v = a.vote.then(|| vote(&texts, extractor.as_ref()));
    let prompt_tps = if g.prompt_secs > 0.0 { g.prompt_tokens_processed as f64 / g.prompt_secs } else { 0.0 };
    let seed = params.sampling.seed;
    if json_out {
        let samples: Vec<_> = g
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"index": i, "seed": seed.wrapping_add(i as u64), "text": s.text, "ids": s.ids,
                       "gen_tokens": s.ids.len(), "finish_reason": s.finish.as_str()})
            })
            .collect();
        let mut out = json!({
            "samples": samples, "n": a.samples, "prompt_tokens": g.prompt_tokens,
            "prompt_tokens_processed": g.prompt_tokens_processed, "prefills": g.prefills,
            "prompt_tps": prompt_tps, "gen_tokens": g.gen_tokens, "gen_tps": g.gen_tps(),
            "decode_forwards": g.decode_forwards,
        });
        if let Some(v) = &v {
            out["vote"] = json!({
                "answer": v.answer, "winner": v.winner, "no_answer": v.no_answer,
                "counts": v.counts.iter().map(|(a, c)| json!({"answer": a, "count": c})).collect::<Vec<_>>(),
            });
        }
        println!("{out}");
        return Ok(());
    }
    // Samples on stdout; with --vote the answer is stdout and the samples stderr.
    let mut listing = String::new();
    for (i, s) in g.samples.iter().enumerate() {
        listing += &format!(
            "=== sample {i} (seed {}, {} tokens, {}) ===\n{}\n",
            seed.wrapping_add(i as u64),
            s.ids.len(),
            s.finish.as_str(),
            s.text
        );
    }
    match &v {
        None => print!("{listing}"),
        Some(v) => {
            eprint!("{listing}");
            println!("{}", v.answer.as_deref().unwrap_or(""));
        }
    }
    eprintln!(
        "prompt: {} tokens read once for {} samples ({:.1} tok/s) | generated: {} tokens in {} batched steps, {:.1} tok/s",
        g.prompt_tokens,
        a.samples,
        prompt_tps,
        g.gen_tokens,
        g.decode_forwards,
        g.gen_tps()
    );
    if let Some(v) = &v {
        let counts: Vec<String> = v.counts.iter().map(|(a, c)| format!("{c}x {a:?}")).collect();
        match &v.answer {
            Some(ans) => eprintln!(
                "vote: {ans:?} with {} of {} samples (sample {}) | counts: {}{}",
                v.counts[0].1,
                a.samples,
                v.winner.unwrap_or(0),
                counts.join(", "),
                if v.no_answer > 0 { format!(" | no answer: {}", v.no_answer) } else { String::new() }
            ),
            None => eprintln!("vote: no sample gave an answer"),
        }
    }
    Ok(())
}

/// `bench --draft` flags.
#[derive(Args, Clone, Default)]
pub struct BenchDraftArgs {
    #[command(flatten)]
    pub draft: DraftArgs,
    /// Prompt text for `--draft`/`--lookup` (default: a Python class to
    /// write). Special tokens written out (`<|im_start|>`) are parsed, so a
    /// prompt already in a chat template can be given as is.
    #[arg(long)]
    pub draft_prompt: Option<String>,
    /// Wrap --draft-prompt as a user message in the chat template.
    #[arg(long)]
    pub draft_chat: bool,
}

const BENCH_PROMPT: &str = "# A Python class for a bank account with deposits, withdrawals, interest and a transaction history.\n\nclass BankAccount:\n";

/// `bench --draft`: greedy generation of `tg` tokens from a real prompt,
/// plain and speculative alternately, `repeats` times each; medians.
pub fn bench(
    m: &LoadedModel,
    pool: &ThreadPool,
    name: &str,
    tg: usize,
    repeats: usize,
    a: &BenchDraftArgs,
    json_out: bool,
) -> Result<()> {
    let cfg = a.draft.config()?;
    let draft_model = a.draft.load(m)?;
    let source = match &draft_model {
        Some(d) => Draft::Model(&d.model),
        None => Draft::NGram,
    };
    let text = a.draft_prompt.as_deref().unwrap_or(BENCH_PROMPT);
    let prompt = if a.draft_chat {
        m.chat_prompt(&[ChatMessage::new("user", text.to_string())])?
    } else {
        m.tokenizer.encode(text, true, true)?
    };
    let ctx = prompt.len() + tg + 1;
    let params = GenerateParams {
        max_tokens: tg,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_at_eog: true,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    };
    // Warm-up: pages the weights of both models in.
    let warm = GenerateParams { max_tokens: 2, ..params.clone() };
    let refs = a.draft.memory()?.map(|mem| mem.references_for(&prompt)).unwrap_or_default();
    generate_speculative(&m.model, &m.tokenizer, pool, source, ctx, &prompt, &warm, &cfg, refs.clone(), |_| {})?;
    let (mut plain_tps, mut spec_tps, mut last) = (Vec::new(), Vec::new(), None::<(Generation, SpecStats)>);
    for _ in 0..repeats {
        let mut cache = m.model.new_cache(ctx);
        let g = generate(&m.model, &m.tokenizer, pool, &mut cache, &prompt, &params, |_| {})?;
        plain_tps.push(g.gen_tps());
        let (gs, s) = generate_speculative(
            &m.model,
            &m.tokenizer,
            pool,
            source,
            ctx,
            &prompt,
            &params,
            &cfg,
            refs.clone(),
            |_| {},
        )?;
        if gs.ids != g.ids {
            bail!("speculative output differs from plain greedy output: this is a bug");
        }
        spec_tps.push(gs.gen_tps());
        last = Some((gs, s));
    }
    let (gs, s) = last.expect("repeats >= 1");
    let (p, sp) = (median(plain_tps.clone()), median(spec_tps.clone()));
    let draft_name = a.draft.draft.clone().unwrap_or_else(|| "ngram".to_string());
    if json_out {
        println!(
            "{}",
            json!({
                "model": name, "draft": draft_name, "threads": pool.n_threads(), "prompt_tokens": prompt.len(),
                "lookup_references": refs.len(),
                "gen_tokens": gs.gen_tokens, "plain_tps": p, "speculative_tps": sp, "speedup": sp / p,
                "plain_tps_runs": plain_tps, "speculative_tps_runs": spec_tps,
                "speculative": s.to_json(gs.gen_tokens, gs.gen_secs),
            })
        );
    } else {
        println!(
            "model: {name}  draft: {draft_name}  threads: {}  prompt: {} tokens  generated: {} tokens",
            pool.n_threads(),
            prompt.len(),
            gs.gen_tokens
        );
        println!("plain        {p:8.2} tok/s");
        println!("speculative  {sp:8.2} tok/s   speed-up {:.2}x", sp / p);
        println!("{}", s.summary(gs.gen_tokens, gs.gen_secs));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
