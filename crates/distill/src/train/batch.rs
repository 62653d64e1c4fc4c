//! From dataset records to training batches: tokenizing each conversation
//! the way the engine will prompt the student, marking which tokens the loss
//! sees (the answer only), the validation split, per-epoch shuffling, and
//! sequence packing.
//!
//! An example's prompt is the chat template's rendering of every message but
//! the last, with the assistant header (`add_generation_prompt`), tokenized
//! exactly as `minnow run --chat`/`serve` tokenize a prompt. The answer is
//! the rest of the rendering of the whole conversation; when the prompt's
//! ids are not a prefix of the whole conversation's ids (a merge across the
//! boundary), the two parts are tokenized separately and concatenated, so
//! the student always trains on the very prompt ids it will see.
//!
//! Packing: examples (in the epoch's shuffled order) fill rows of at most
//! `max_seq` tokens, each example keeping its own positions from 0 and a
//! block-diagonal causal mask; consecutive rows form a micro-batch of B rows
//! padded to the longest, with `B·T ≤ batch_tokens` (one row at least).

use super::loss::{LossTargets, TeacherTop};
use super::model::{packed_mask, rope_tables, ForwardInput, StudentShape};
use super::rng::SplitMix64;
use crate::data::DatasetRecord;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use minnow_engine::chat::{ChatMessage, ChatTemplate};
use minnow_engine::tokenizer::Tokenizer;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Prompt then answer ids.
    pub tokens: Vec<u32>,
    /// How many leading tokens are prompt (not in the loss).
    pub n_prompt: usize,
    /// The teacher's top-k for the first answer tokens (those where the
    /// teacher's own tokens agree with `tokens`), when KL is on.
    pub teacher: Vec<Vec<(u32, f32)>>,
}

/// What preparing the examples skipped or found.
#[derive(Debug, Clone, Default)]
pub struct PrepStats {
    pub kept: usize,
    /// Longer than `max_seq`.
    pub too_long: usize,
    /// Answer positions with a teacher distribution / all answer positions.
    pub kl_positions: usize,
    pub answer_positions: usize,
}

/// Renders a conversation (with the tools it offered) the way the engine
/// prompts a model: the one rule, `tools::render_conversation`.
fn render(
    chat: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    tools: Option<&[serde_json::Value]>,
    gen_prompt: bool,
) -> Result<String> {
    Ok(minnow_engine::tools::render_conversation(chat, messages, tools, gen_prompt)?)
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let bos_text = tok.bos_id().map(|b| tok.token_text(b).to_string());
    let template_wrote_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
    Ok(tok.encode(text, !template_wrote_bos, true)?)
}

/// Prompt ids and answer ids of one record (see the module doc).
pub fn tokenize_record(
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    rec: &DatasetRecord,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let n = rec.messages.len();
    if n < 2 || rec.messages[n - 1].role != "assistant" {
        bail!("record '{}': the last message must be the assistant's answer, after at least one other message", rec.id);
    }
    let tools = rec.tools.as_deref();
    let prompt_text = render(chat, &rec.messages[..n - 1], tools, true)?;
    let full_text = render(chat, &rec.messages, tools, false)?;
    let prompt = encode(tok, &prompt_text)?;
    let full = encode(tok, &full_text)?;
    if full.len() > prompt.len() && full[..prompt.len()] == prompt[..] {
        return Ok((prompt.clone(), full[prompt.len()..].to_vec()));
    }
    let Some(rest) = full_text.strip_prefix(&prompt_text) else {
        bail!("record '{}': the chat template's prompt is not a prefix of the rendered conversation", rec.id);
    };
    let answer = tok.encode(rest, false, true)?;
    if answer.is_empty() {
        bail!("record '{}': the answer is empty", rec.id);
    }
    Ok((prompt, answer))
}

/// Tokenizes every record; `kl`: keep the teacher's top-k (the caller has
/// checked the vocabularies match).
pub fn prepare(
    records: &[DatasetRecord],
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    max_seq: usize,
    kl: bool,
) -> Result<(Vec<Example>, PrepStats)> {
    let mut out = Vec::with_capacity(records.len());
    let mut st = PrepStats::default();
    for rec in records {
        let (prompt, answer) = tokenize_record(tok, chat, rec)?;
        if prompt.len() + answer.len() > max_seq {
            st.too_long += 1;
            continue;
        }
        let mut teacher = Vec::new();
        if let (true, Some(t)) = (kl, &rec.teacher_logprobs) {
            // The KL term applies where the teacher's emitted tokens and the
            // student's answer ids agree, from the first answer token on.
            for (i, (&a, &b)) in answer.iter().zip(&t.tokens).enumerate() {
                if a != b || i >= t.top.len() || t.top[i].is_empty() {
                    break;
                }
                teacher.push(t.top[i].clone());
            }
        }
        st.kl_positions += teacher.len();
        st.answer_positions += answer.len();
        let n_prompt = prompt.len();
        let mut tokens = prompt;
        tokens.extend(answer);
        out.push(Example { tokens, n_prompt, teacher });
    }
    st.kept = out.len();
    Ok((out, st))
}

/// Splits example indices into (train, validation): a seeded shuffle, the
/// last `round(val_frac·n)` (at least 1 when `val_frac > 0` and n ≥ 2) held out.
pub fn split(n: usize, val_frac: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ 0x5a11_7000).shuffle(&mut idx);
    let mut n_val = (val_frac * n as f64).round() as usize;
    if val_frac > 0.0 && n >= 2 {
        n_val = n_val.max(1);
    }
    n_val = n_val.min(n.saturating_sub(1));
    let val = idx.split_off(n - n_val);
    (idx, val)
}

/// One micro-batch: rows of example indices.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub rows: Vec<Vec<usize>>,
}

/// Packs `order` (example indices) into micro-batches (see the module doc).
pub fn pack(order: &[usize], examples: &[Example], max_seq: usize, batch_tokens: usize) -> Vec<MicroBatch> {
    let mut rows: Vec<(Vec<usize>, usize)> = Vec::new();
    for &i in order {
        let len = examples[i].tokens.len();
        match rows.last_mut() {
            Some((r, used)) if *used + len <= max_seq => {
                r.push(i);
                *used += len;
            }
            _ => rows.push((vec![i], len)),
        }
    }
    let mut out: Vec<MicroBatch> = Vec::new();
    let mut cur: Vec<Vec<usize>> = Vec::new();
    let mut cur_t = 0;
    for (r, used) in rows {
        let t = cur_t.max(used);
        if !cur.is_empty() && (cur.len() + 1) * t > batch_tokens {
            out.push(MicroBatch { rows: std::mem::take(&mut cur) });
            cur_t = 0;
        }
        cur_t = cur_t.max(used);
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(MicroBatch { rows: cur });
    }
    out
}

/// The whole run's optimizer steps: for each epoch, a seeded shuffle of the
/// training examples, packed, grouped `grad_accum` micro-batches per step.
pub fn plan_steps(
    train: &[usize],
    examples: &[Example],
    epochs: usize,
    max_seq: usize,
    batch_tokens: usize,
    grad_accum: usize,
    seed: u64,
) -> Vec<Vec<MicroBatch>> {
    let mut steps = Vec::new();
    for epoch in 0..epochs {
        let mut order = train.to_vec();
        SplitMix64::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)).shuffle(&mut order);
        let mbs = pack(&order, examples, max_seq, batch_tokens);
        for chunk in mbs.chunks(grad_accum.max(1)) {
            steps.push(chunk.to_vec());
        }
    }
    steps
}

/// Answer tokens in a micro-batch (the loss's denominator contribution).
pub fn answer_tokens(mb: &MicroBatch, examples: &[Example]) -> usize {
    mb.rows.iter().flatten().map(|&i| examples[i].tokens.len() - examples[i].n_prompt).sum()
}

/// The model input and loss targets of a micro-batch. Loss rows are the
/// positions that predict an answer token (position j−1 predicts token j).
pub fn build(
    mb: &MicroBatch,
    examples: &[Example],
    shape: &StudentShape,
    kl_k: usize,
    device: &Device,
) -> Result<(ForwardInput, LossTargets)> {
    let b = mb.rows.len();
    let t = mb.rows.iter().map(|r| r.iter().map(|&i| examples[i].tokens.len()).sum::<usize>()).max().unwrap_or(0);
    let mut tokens = vec![0u32; b * t];
    let mut pos = vec![0u32; b * t];
    // Padding is one segment of its own that no example shares.
    let mut seg = vec![u32::MAX; b * t];
    let mut pick = Vec::new();
    let mut targets = Vec::new();
    let mut has = Vec::new();
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    for (r, row) in mb.rows.iter().enumerate() {
        let mut at = r * t;
        for (s, &i) in row.iter().enumerate() {
            let ex = &examples[i];
            for (j, &tok) in ex.tokens.iter().enumerate() {
                tokens[at + j] = tok;
                pos[at + j] = j as u32;
                seg[at + j] = s as u32;
            }
            for j in ex.n_prompt..ex.tokens.len() {
                pick.push((at + j - 1) as u32);
                targets.push(ex.tokens[j]);
                let a = j - ex.n_prompt;
                match ex.teacher.get(a) {
                    Some(top) if kl_k > 0 => {
                        has.push(true);
                        for q in 0..kl_k {
                            // Fewer than k stored: pad with impossible entries.
                            let (id, lp) = top.get(q).copied().unwrap_or((0, f32::NEG_INFINITY));
                            ids.push(id);
                            lps.push(lp);
                        }
                    }
                    _ => {
                        has.push(false);
                        ids.extend(std::iter::repeat_n(0, kl_k));
                        lps.extend(std::iter::repeat_n(f32::NEG_INFINITY, kl_k));
                    }
                }
            }
            at += ex.tokens.len();
        }
    }
    let (cos, sin) = rope_tables(&pos, b, t, shape.cfg.n_rot, shape.cfg.rope_base, device)?;
    let m = pick.len();
    let input = ForwardInput {
        b,
        t,
        tokens: Tensor::from_vec(tokens, b * t, device)?,
        cos,
        sin,
        mask: packed_mask(&seg, b, t, device)?,
        pick: Tensor::from_vec(pick, m, device)?,
    };
    let teacher = (kl_k > 0).then_some(TeacherTop { k: kl_k, ids, logprobs: lps, has });
    Ok((input, LossTargets { targets, mask: vec![1.0; m], teacher }))
}
