//! Speculative decoding and many-sample generation on the real models:
//! greedy output identical to plain decoding (draft model and n-gram
//! drafting, on every golden prompt), the sampled output distribution equal
//! to the target's (chi-square), vocabulary checks, one prefill for `n`
//! samples.
//!
//! Tests run one at a time (a global lock): they share two cores.

mod common;

use minnow_engine::generate::{generate, prefill, GenerateParams, Generation};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::{Sampler, SamplingParams};
use minnow_engine::speculative::{check_draft_vocab, generate_speculative, Draft, SpecConfig, SpecStats};
use minnow_engine::vote::{generate_n, vote, AnswerExtractor, JsonField};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

const SMOLLM: &str = "smollm2-135m-instruct-q4_1";
const GEMMA: &str = "gemma3-270m-q4_k_m";
const QWEN05: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m";
const QWEN15: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m";

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Each model is loaded once per test binary.
fn model(name: &str) -> &'static LoadedModel {
    static LOADED: OnceLock<Mutex<HashMap<String, &'static LoadedModel>>> = OnceLock::new();
    let map = LOADED.get_or_init(Default::default);
    let mut map = map.lock().unwrap();
    map.entry(name.to_string()).or_insert_with(|| {
        let path = common::model_path(&format!("{name}.gguf"));
        Box::leak(Box::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("{e}"))))
    })
}

use common::golden_prompts;

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams { max_tokens, sampling: SamplingParams::greedy(), ..GenerateParams::default() }
}

fn plain(m: &LoadedModel, prompt: &[u32], params: &GenerateParams) -> Generation {
    let mut cache = m.model.new_cache(1024);
    generate(&m.model, &m.tokenizer, common::pool(), &mut cache, prompt, params, |_| {}).unwrap()
}

/// Plain greedy decoding of a golden prompt, computed once per binary: the
/// draft-model and n-gram tests compare against the same reference, and the
/// 1.5B's plain runs are the costliest part of this suite.
fn plain_greedy(name: &str, prompt: &[u32], max_tokens: usize) -> Generation {
    type Key = (String, Vec<u32>, usize); // (model, prompt, max_tokens)
    static DONE: OnceLock<Mutex<HashMap<Key, Generation>>> = OnceLock::new();
    let key = (name.to_string(), prompt.to_vec(), max_tokens);
    if let Some(g) = DONE.get_or_init(Default::default).lock().unwrap().get(&key) {
        return g.clone();
    }
    let g = plain(model(name), prompt, &greedy(max_tokens));
    DONE.get_or_init(Default::default).lock().unwrap().insert(key, g.clone());
    g
}

fn spec(
    target: &LoadedModel,
    draft: Draft,
    prompt: &[u32],
    params: &GenerateParams,
    cfg: &SpecConfig,
) -> (Generation, SpecStats) {
    let mut streamed = String::new();
    let (g, s) = generate_speculative(
        &target.model,
        &target.tokenizer,
        common::pool(),
        draft,
        1024,
        prompt,
        params,
        cfg,
        Vec::new(),
        |piece| streamed.push_str(piece),
    )
    .unwrap();
    assert_eq!(streamed, g.text, "streamed text equals the returned text");
    (g, s)
}

fn fixed_k(k: usize) -> SpecConfig {
    SpecConfig { k_start: k, adaptive: false, auto_off: false, ..SpecConfig::default() }
}

fn assert_same(want: &Generation, got: &Generation, what: &str) {
    assert_eq!(got.ids, want.ids, "{what}: token ids differ");
    assert_eq!(got.text, want.text, "{what}: text differs");
    assert_eq!(got.finish, want.finish, "{what}: finish reason differs");
}

#[test]
fn draft_vocabulary_is_checked() {
    let _g = serial();
    let m = check_draft_vocab(model(QWEN15), model(QWEN05)).expect("Qwen2.5 0.5B can draft for 1.5B");
    assert_eq!((m.target_extra, m.draft_extra), (0, 0), "{m:?}");
    assert!(m.shared > 150_000);
    let err = check_draft_vocab(model(QWEN15), model(SMOLLM)).unwrap_err();
    assert!(err.to_string().contains("vocabulary differs"), "{err}");
    let err = check_draft_vocab(model(SMOLLM), model(GEMMA)).unwrap_err();
    assert!(err.to_string().contains("vocabulary differs"), "{err}");
}

/// Qwen2.5-Coder-1.5B with the 0.5B as draft: greedy output identical to the
/// 1.5B alone on every golden prompt.
#[test]
fn greedy_with_draft_model_equals_target_alone() {
    let _g = serial();
    let (target, draft) = (model(QWEN15), model(QWEN05));
    check_draft_vocab(target, draft).unwrap();
    let params = greedy(32);
    let (mut drafted, mut accepted, mut forwards, mut tokens) = (0, 0, 0, 0);
    for (c, prompt) in golden_prompts(QWEN15).iter().enumerate() {
        let want = plain_greedy(QWEN15, prompt, params.max_tokens);
        // Alternate fixed and adaptive draft lengths across the prompts; the
        // fixed ones score the draft's whole vocabulary, the adaptive ones
        // only its most frequent rows and the sequence's own tokens.
        let cfg = if c % 2 == 0 { SpecConfig { draft_head_rows: 0, ..fixed_k(4) } } else { SpecConfig::default() };
        let (got, s) = spec(target, Draft::Model(&draft.model), prompt, &params, &cfg);
        assert_same(&want, &got, &format!("case {c}"));
        eprintln!("case {c}: {}", s.summary(got.gen_tokens, got.gen_secs));
        drafted += s.drafted;
        accepted += s.accepted;
        forwards += s.target_forwards;
        tokens += got.gen_tokens;
    }
    assert!(drafted > 0 && accepted > 0, "speculation ran: {accepted}/{drafted}");
    assert!(forwards < tokens, "fewer target passes ({forwards}) than tokens ({tokens})");
}

/// Prompt-lookup drafting: greedy output identical to plain decoding on
/// every model's golden prompts, with a fixed draft length (so failed drafts
/// are verified and rolled back) and adaptively.
#[test]
fn greedy_with_ngram_drafts_equals_plain_on_every_model() {
    let _g = serial();
    for name in [SMOLLM, GEMMA, QWEN05, QWEN15] {
        let m = model(name);
        let params = greedy(32);
        let (mut drafted, mut rounds) = (0, 0);
        for (c, prompt) in golden_prompts(name).iter().enumerate() {
            let want = plain_greedy(name, prompt, params.max_tokens);
            for cfg in [fixed_k(6), SpecConfig::default()] {
                if cfg.adaptive && (name == QWEN15 || name == QWEN05) {
                    continue; // the slowest models: the fixed length verifies every draft already
                }
                let (got, s) = spec(m, Draft::NGram, prompt, &params, &cfg);
                assert_same(&want, &got, &format!("{name} case {c} (adaptive: {})", cfg.adaptive));
                drafted += s.drafted;
                rounds += s.rounds;
            }
        }
        eprintln!("{name}: {rounds} verifying rounds, {drafted} drafted tokens");
        assert!(rounds > 0, "{name}: n-gram drafts were proposed");
    }
}

/// Output that copies the prompt: n-gram drafts are accepted, several
/// tokens per target pass, still identical to plain greedy; stop strings and
/// the token limit cut where plain decoding cuts.
#[test]
fn ngram_drafts_pay_off_on_copying_and_respect_stops() {
    let _g = serial();
    let m = model(SMOLLM);
    let text = "<|im_start|>user\nRepeat this sentence exactly: The quick brown fox jumps over the lazy dog \
                while the cat sleeps on the warm windowsill.<|im_end|>\n<|im_start|>assistant\n";
    let prompt = m.tokenizer.encode(text, true, true).unwrap();
    let params = greedy(40);
    let want = plain(m, &prompt, &params);
    let (got, s) = spec(m, Draft::NGram, &prompt, &params, &SpecConfig::default());
    assert_same(&want, &got, "copying prompt");
    eprintln!("{:?} → {}", got.text, s.summary(got.gen_tokens, got.gen_secs));
    assert!(s.accepted >= 5, "{s:?}");
    assert!(s.tokens_per_target_forward(got.gen_tokens) > 1.5, "{s:?}");

    for stop in ["lazy", "fox jumps", "\n"] {
        let params = GenerateParams { stop: vec![stop.to_string()], ..greedy(40) };
        let want = plain(m, &prompt, &params);
        let (got, _) = spec(m, Draft::NGram, &prompt, &params, &fixed_k(8));
        assert_same(&want, &got, &format!("stop {stop:?}"));
    }
    for max in [1, 2, 3, 7] {
        let want = plain(m, &prompt, &greedy(max));
        let (got, _) = spec(m, Draft::NGram, &prompt, &greedy(max), &fixed_k(8));
        assert_same(&want, &got, &format!("max_tokens {max}"));
    }
}

/// Chi-square statistic of `counts` against probabilities `p` (token →
/// probability, summing to 1) over `n` draws: tokens with an expected count
/// of at least 5 get a bin each, the rest share one. Returns (statistic,
/// degrees of freedom).
fn chi_square(counts: &HashMap<u32, usize>, p: &[(u32, f32)], n: usize) -> (f64, usize) {
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (expected, observed)
    let (mut rest_e, mut rest_o) = (0.0, 0.0);
    let mut seen = 0usize;
    for &(t, pt) in p {
        let e = pt as f64 * n as f64;
        let o = *counts.get(&t).unwrap_or(&0) as f64;
        seen += o as usize;
        if e >= 5.0 {
            bins.push((e, o));
        } else {
            rest_e += e;
            rest_o += o;
        }
    }
    // Draws outside p's support (impossible if correct) land in the rest bin.
    rest_o += (n - seen) as f64;
    if rest_e >= 5.0 {
        bins.push((rest_e, rest_o));
    } else if let Some(last) = bins.last_mut() {
        last.0 += rest_e;
        last.1 += rest_o;
    }
    let stat = bins.iter().map(|(e, o)| (o - e) * (o - e) / e).sum();
    (stat, bins.len() - 1)
}

/// The chi-square quantile at 1 − 0.001 (Wilson–Hilferty).
fn chi_square_critical(df: usize) -> f64 {
    let z = 3.090; // standard normal 0.999 quantile
    let d = df as f64;
    let h = 2.0 / (9.0 * d);
    d * (1.0 - h + z * h.sqrt()).powi(3)
}

fn sampling_t1() -> SamplingParams {
    SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..SamplingParams::greedy() }
}

/// First-token frequencies of speculative sampling over many seeds: `draft`
/// proposes, the rejection rule decides, and the result must follow the
/// target's distribution `p`. Returns (statistic, critical value).
fn first_token_test(m: &LoadedModel, prompt: &[u32], draft: Draft, cfg: &SpecConfig, n: usize) -> (f64, f64) {
    let pool = common::pool();
    // The target's distribution at the end of the prompt.
    let mut cache = m.model.new_cache(64);
    let logits = prefill(&m.model, pool, &mut cache, prompt).unwrap();
    let p = Sampler::new(sampling_t1()).distribution(&logits);

    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut rejected = 0;
    for seed in 0..n as u64 {
        let sampling = SamplingParams { seed, ..sampling_t1() };
        let params = GenerateParams {
            max_tokens: 1,
            sampling,
            stop: Vec::new(),
            stop_at_eog: false,
            constraint: None,
            logit_bias: Vec::new(),
            adapter: None,
        };
        let (g, st) =
            generate_speculative(&m.model, &m.tokenizer, pool, draft, 64, prompt, &params, cfg, Vec::new(), |_| {})
                .unwrap();
        assert_eq!(st.rounds, 1, "the token went through verification");
        rejected += st.drafted.saturating_sub(st.accepted).min(1);
        *counts.entry(g.ids[0]).or_default() += 1;
    }
    let (stat, df) = chi_square(&counts, &p, n);
    let crit = chi_square_critical(df);
    eprintln!(
        "{} drafts: chi-square {stat:.1} on {df} df (critical {crit:.1} at 0.001); {rejected}/{n} first drafts rejected; top p {:?}",
        draft.method(),
        &p[..3.min(p.len())]
    );
    assert!(rejected > n / 20, "the rejection path was exercised ({rejected}/{n})");
    (stat, crit)
}

/// Sampled speculative output follows the target's distribution: the target
/// samples at temperature 1; the draft is the same network at temperature
/// 1.6 (a different `q`, so drafts are rejected and resampled from the
/// residual). 800 fixed seeds; the first token's frequencies pass a
/// chi-square test at the 0.001 level, while tokens drawn from the draft's own
/// distribution fail it (the test can tell the difference).
#[test]
fn sampled_output_follows_the_target_distribution() {
    let _g = serial();
    let m = model(SMOLLM);
    let prompt = m.tokenizer.encode("The capital of France is", true, false).unwrap();
    let n = 800;
    let draft_sampling = SamplingParams { temperature: 1.6, ..sampling_t1() };
    let cfg = SpecConfig { draft_sampling: Some(draft_sampling.clone()), ..fixed_k(1) };
    let (stat, crit) = first_token_test(m, &prompt, Draft::Model(&m.model), &cfg, n);
    assert!(stat < crit, "speculative samples do not follow the target: chi-square {stat:.1} >= {crit:.1}");

    // Power: n draws straight from the draft's q fail the same test.
    let pool = common::pool();
    let mut cache = m.model.new_cache(64);
    let logits = prefill(&m.model, pool, &mut cache, &prompt).unwrap();
    let p = Sampler::new(sampling_t1()).distribution(&logits);
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for seed in 0..n as u64 {
        let mut q = Sampler::new(SamplingParams { seed, ..draft_sampling.clone() });
        *counts.entry(q.sample(&logits)).or_default() += 1;
    }
    let (stat_q, df) = chi_square(&counts, &p, n);
    eprintln!("draft's own samples: chi-square {stat_q:.1} on {df} df");
    assert!(stat_q > chi_square_critical(df), "the test cannot tell q from p");
}

/// The same with n-gram drafts (deterministic, accepted with probability
/// p(x)): the prompt ends with a token seen earlier, so the first token is
/// always drafted.
#[test]
fn sampled_output_with_ngram_drafts_follows_the_target_distribution() {
    let _g = serial();
    let m = model(SMOLLM);
    let prompt = m.tokenizer.encode("I like red apples. You like red apples. We like", true, false).unwrap();
    let (stat, crit) = first_token_test(m, &prompt, Draft::NGram, &fixed_k(1), 600);
    assert!(stat < crit, "speculative samples do not follow the target: chi-square {stat:.1} >= {crit:.1}");
}

/// `n` samples read the prompt once and decode as one batch; sample `i`
/// is exactly the single-sequence generation with seed `seed + i`.
#[test]
fn n_samples_share_one_prefill() {
    let _g = serial();
    let m = model(SMOLLM);
    let prompt = m.tokenizer.encode("Once upon a time, in a small village,", true, false).unwrap();
    let params = GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams { seed: 7, ..SamplingParams::default() },
        stop: Vec::new(),
        stop_at_eog: true,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    };
    let mut streamed = vec![String::new(); 8];
    let g = generate_n(&m.model, &m.tokenizer, common::pool(), 1024, &prompt, &params, 8, |i, piece| {
        streamed[i].push_str(piece)
    })
    .unwrap();
    assert_eq!(g.samples.len(), 8);
    assert_eq!(g.prefills, 1);
    assert_eq!(g.prompt_tokens, prompt.len());
    assert_eq!(g.prompt_tokens_processed, prompt.len(), "the prompt is processed once for 8 samples");
    let longest = g.samples.iter().map(|s| s.ids.len()).max().unwrap();
    assert_eq!(g.decode_forwards, longest - 1, "one batched pass per step");
    for i in [0usize, 3, 7] {
        let want = plain(
            m,
            &prompt,
            &GenerateParams {
                sampling: SamplingParams { seed: 7 + i as u64, ..params.sampling.clone() },
                ..params.clone()
            },
        );
        assert_eq!(g.samples[i].ids, want.ids, "sample {i}");
        assert_eq!(g.samples[i].text, want.text, "sample {i}");
        assert_eq!(streamed[i], want.text, "sample {i} streamed");
    }
    let distinct: std::collections::HashSet<_> = g.samples.iter().map(|s| &s.ids).collect();
    assert!(distinct.len() > 1, "different seeds give different samples");
}

/// Self-consistency end to end: samples of a question, the majority answer.
#[test]
fn vote_over_samples() {
    let _g = serial();
    let m = model(QWEN05);
    let text = "<|im_start|>user\nWhat is 6 times 7? Reply with JSON like {\"answer\": N} only.<|im_end|>\n<|im_start|>assistant\n";
    let prompt = m.tokenizer.encode(text, true, true).unwrap();
    let params = GenerateParams {
        max_tokens: 16,
        sampling: SamplingParams { temperature: 0.7, seed: 1, ..SamplingParams::default() },
        stop: Vec::new(),
        stop_at_eog: true,
        constraint: None,
        logit_bias: Vec::new(),
        adapter: None,
    };
    let g = generate_n(&m.model, &m.tokenizer, common::pool(), 512, &prompt, &params, 5, |_, _| {}).unwrap();
    let texts: Vec<&str> = g.samples.iter().map(|s| s.text.as_str()).collect();
    let v = vote(&texts, &JsonField("answer".into()));
    eprintln!("{texts:?} → {v:?}");
    assert_eq!(v.answer.as_deref(), Some("42"));
    assert_eq!(v.counts.iter().map(|c| c.1).sum::<usize>() + v.no_answer, 5);
    let w = v.winner.unwrap();
    assert_eq!(JsonField("answer".into()).extract(texts[w]).as_deref(), Some("42"));
}

/// Earlier answers to the same instruction as drafts (`--lookup-memory`):
/// the output is still exactly the plain greedy output, and the skeleton the
/// answers share is drafted from them and accepted. Messages written for
/// this test (not the task's).
#[test]
fn earlier_answers_draft_the_skeleton_and_output_is_unchanged() {
    use minnow_engine::speculative::memory::LookupMemory;
    let _g = serial();
    let m = model(QWEN05);
    let ask = |msg: &str| -> Vec<u32> {
        let text = format!(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nExtract the booking from the \
             message as JSON with keys guest (full name), room (lower case), nights (integer), city. Reply with the JSON \
             only.\n\nMessage: {msg}<|im_end|>\n<|im_start|>assistant\n"
        );
        m.tokenizer.encode(&text, true, true).unwrap()
    };
    let earlier = [
        "Hello, this is Marta Lindqvist. I need a double room in Porto for three nights from May 2.",
        "Booking for Kenji Watanabe: suite, 5 nights, Vienna. Thanks!",
    ];
    let mut memory = LookupMemory::new(8);
    for msg in earlier {
        let p = ask(msg);
        memory.record(&p, &plain_greedy(QWEN05, &p, 64).text);
    }
    let prompt = ask("Hi! Please reserve a single room for Olu Adeyemi in Nairobi, two nights.");
    let refs = memory.references_for(&prompt);
    assert_eq!(refs.len(), 2, "both earlier answers share the instruction");
    let want = plain_greedy(QWEN05, &prompt, 64);
    for cfg in [fixed_k(6), SpecConfig::default()] {
        let (got, st) = generate_speculative(
            &m.model,
            &m.tokenizer,
            common::pool(),
            Draft::NGram,
            1024,
            &prompt,
            &greedy(64),
            &cfg,
            refs.clone(),
            |_| {},
        )
        .unwrap();
        assert_same(&want, &got, "greedy with earlier answers as drafts");
        assert!(
            st.memory_accepted >= 8 && st.memory_accepted * 10 >= st.memory_drafted * 7,
            "the shared skeleton is drafted and accepted: {}/{} ({:?} after {:?})",
            st.memory_accepted,
            st.memory_drafted,
            want.text,
            earlier
        );
    }
}

/// A draft model that scores only part of its vocabulary (`DraftHead`)
/// still gives exactly the target's greedy output, however small the part:
/// SmolLM2 drafting for itself, with its whole head, the default 32,768
/// most frequent rows, and only 1,000 (most tokens then come from the
/// target). Drafting for itself with the whole head, every draft is right.
#[test]
fn a_cut_draft_head_keeps_the_output_exact() {
    let _g = serial();
    let m = model(SMOLLM);
    let params = greedy(40);
    let prompt = &golden_prompts(SMOLLM)[0];
    let want = plain_greedy(SMOLLM, prompt, params.max_tokens);
    let mut rates = Vec::new();
    for rows in [0, 32_768, 1_000] {
        let cfg = SpecConfig { draft_head_rows: rows, ..fixed_k(3) };
        let (got, s) = spec(m, Draft::Model(&m.model), prompt, &params, &cfg);
        assert_same(&want, &got, &format!("draft head of {rows} rows"));
        rates.push(s.acceptance_rate());
    }
    assert_eq!(rates[0], 1.0, "a model drafting for itself with its whole head is always right");
    assert!(rates[2] < rates[0], "1,000 rows cannot draft every token: acceptance {rates:?}");
}
