//! Text generation outside the server (`minnow run`, `run --n`): prompt
//! processing in chunks, then the one decode loop (`decode`) over
//! [`Sequence`]s, which sample and decide where to stop, streaming text as
//! it is released and timing both phases.

pub use crate::sequence::{FinishReason, GenerateParams};

use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, ModelError, SeqBatch};
use crate::sequence::Sequence;
use crate::tokenizer::Tokenizer;
use minnow_kernels::pool::ThreadPool;
use std::time::Instant;

/// Prompt tokens per forward pass: large enough that weights are read once
/// for many tokens, small enough to bound the activation buffers.
pub const PROMPT_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// Generated ids (an end-of-generation token that ended it is included).
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub gen_tokens: usize,
    pub gen_secs: f64,
    pub finish: FinishReason,
}

impl Generation {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_secs)
    }
    pub fn gen_tps(&self) -> f64 {
        rate(self.gen_tokens, self.gen_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Runs the prompt through the model in chunks; returns the last position's
/// logits. `cache` may already hold a prefix.
pub fn prefill(model: &Model, pool: &ThreadPool, cache: &mut KvCache, prompt: &[u32]) -> Result<Vec<f32>, ModelError> {
    prefill_for(model, pool, cache, prompt, Logits::Last)
}

/// [`prefill`] returning what `last` asks of the last chunk (`Logits::Last`,
/// or `Logits::Hidden` for a caller that applies the output head itself).
pub fn prefill_for(
    model: &Model,
    pool: &ThreadPool,
    cache: &mut KvCache,
    prompt: &[u32],
    last: Logits,
) -> Result<Vec<f32>, ModelError> {
    let mut out = Vec::new();
    let n_chunks = prompt.len().div_ceil(PROMPT_CHUNK);
    for (i, chunk) in prompt.chunks(PROMPT_CHUNK).enumerate() {
        let want = if i + 1 == n_chunks { last } else { Logits::None };
        out = model.forward_one(pool, cache, chunk, want)?;
    }
    Ok(out)
}

/// Generates a continuation of `prompt`, calling `on_text` with each piece of
/// released text as it is produced.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    pool: &ThreadPool,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::new("the prompt is empty: nothing to continue from"));
    }
    params.sampling.validate()?;
    let start = Instant::now();
    let logits = prefill(model, pool, cache, prompt)?;
    let prompt_secs = start.elapsed().as_secs_f64();

    // The cache may have held a prefix before the prompt: it takes room too.
    let prefix = cache.len() - prompt.len();
    let seq = Sequence::new(prompt, params, params.sampling.seed, cache.max_len() - prefix, None);
    let gen_start = Instant::now();
    let mut rows = [Row::new(cache, seq)];
    decode(model, tokenizer, pool, &mut rows, &logits, &mut |_, piece| on_text(piece))?;
    let gen_secs = gen_start.elapsed().as_secs_f64();
    let [row] = rows;
    let ids = row.seq.ids().to_vec();
    let finish = row.seq.finish().unwrap_or(FinishReason::Length);
    Ok(Generation {
        text: row.text,
        gen_tokens: ids.len(),
        ids,
        prompt_tokens: prompt.len(),
        prompt_secs,
        gen_secs,
        finish,
    })
}

/// A sequence being decoded by [`decode`]: its cache (holding everything
/// but the last sampled token), its [`Sequence`] and the text released so far.
pub(crate) struct Row<'c> {
    pub cache: &'c mut KvCache,
    pub seq: Sequence,
    pub text: String,
    /// The last sampled token: the next step's input.
    last: u32,
}

impl<'c> Row<'c> {
    pub fn new(cache: &'c mut KvCache, seq: Sequence) -> Row<'c> {
        Row { cache, seq, text: String::new(), last: 0 }
    }

    /// Samples the next token from `logits` and records it.
    fn step(&mut self, i: usize, logits: &[f32], tokenizer: &Tokenizer, on_text: &mut impl FnMut(usize, &str)) {
        let id = self.seq.sample(logits);
        self.last = id;
        let p = self.seq.push(tokenizer, id, true, None);
        for piece in [&p.text, &p.tail] {
            self.text.push_str(piece);
            on_text(i, piece);
        }
    }
}

/// The decode loop of `minnow run` and `run --n` (the server's scheduler
/// runs the same `Sequence`s in its own batched step): samples every row's
/// first token from the prompt's `first_logits`, then advances all
/// unfinished rows with one batched forward pass per step until each
/// [`Sequence`] has finished. `on_text(i, piece)` gets row `i`'s released
/// text. Returns the number of forward passes.
pub(crate) fn decode(
    model: &Model,
    tokenizer: &Tokenizer,
    pool: &ThreadPool,
    rows: &mut [Row],
    first_logits: &[f32],
    on_text: &mut impl FnMut(usize, &str),
) -> Result<usize, ModelError> {
    for (i, r) in rows.iter_mut().enumerate() {
        if !r.seq.is_done() {
            r.step(i, first_logits, tokenizer, on_text);
        }
    }
    let mut forwards = 0;
    loop {
        let mut active = Vec::new();
        let mut batch = Vec::new();
        for (i, r) in rows.iter_mut().enumerate() {
            if !r.seq.is_done() {
                active.push(i);
                batch.push(SeqBatch {
                    tokens: std::slice::from_ref(&r.last),
                    cache: &mut *r.cache,
                    logits: Logits::Last,
                });
            }
        }
        if batch.is_empty() {
            return Ok(forwards);
        }
        let out = model.forward(pool, &mut batch)?;
        drop(batch);
        forwards += 1;
        for (&i, logits) in active.iter().zip(&out) {
            rows[i].step(i, logits, tokenizer, on_text);
        }
    }
}
